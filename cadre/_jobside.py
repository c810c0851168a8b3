"""The ``cadre`` package a job sees: ``from cadre import Run``, then ``Run.get_context()``, in any environment.

The node agent writes this file as ``cadre/__init__.py`` (beside a copy of ``_context.py``) into a read-only
folder of its own and puts that folder first on every rank's ``PYTHONPATH``: the agent's environment, a pip venv,
or any container image (mounted at the same path), even one with no cadre, another Python (3.8 or newer) or no
pip. Nothing is installed into the job's environment. So: standard library only, and Python 3.8 syntax.

When the job's environment has a cadre of its own (any version, installed in any way), ``Run`` and
``cadre._context`` stay the agent's, which speak its protocol; every other name (``Workspace``, ``Dataset``, ...)
and submodule comes from that installed cadre, loaded on first use. Without one, those names raise an
ImportError that says so.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from typing import Any

from cadre._context import RunContext, RunContextError, get_context

_HERE = os.path.dirname(os.path.abspath(__file__))
_BUNDLE = os.path.dirname(_HERE)
_installed: Any = None


class Run:
    """The run this process belongs to (Azure ML's ``Run.get_context()``)."""

    @staticmethod
    def get_context() -> RunContext:
        """The current run: metrics, tags, properties and files. Offline (prints, ./logs) outside cadre."""
        return get_context()


def _installed_locations() -> list[str]:
    """Where the environment's own cadre package lives, if it has one (a path entry or an import hook)."""
    path = [p for p in sys.path if os.path.abspath(p or ".") != _BUNDLE]
    for finder in sys.meta_path:
        try:
            if finder is importlib.machinery.PathFinder:
                spec = finder.find_spec("cadre", path)
            else:
                find = getattr(finder, "find_spec", None)
                spec = find("cadre", None) if find is not None else None
        except (ImportError, ValueError, AttributeError, TypeError):
            continue
        locations = [loc for loc in (spec.submodule_search_locations or []) if loc != _HERE] if spec else []
        if locations:
            return locations
    return []


__path__.extend(loc for loc in _installed_locations() if loc not in __path__)  # noqa: F821 (a package's own)


def _client() -> Any | None:
    global _installed
    if _installed is None:
        others = [loc for loc in __path__ if loc != _HERE]  # noqa: F821
        init = os.path.join(others[0], "__init__.py") if others else ""
        if not os.path.isfile(init):
            return None
        spec = importlib.util.spec_from_file_location("cadre._installed", init)
        if spec is None or spec.loader is None:
            return None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _installed = module
    return _installed


def _is_submodule(name: str) -> bool:
    here = __path__  # noqa: F821
    return any(os.path.isfile(os.path.join(d, f"{name}.py")) or os.path.isdir(os.path.join(d, name)) for d in here)


def __getattr__(name: str) -> Any:
    if name.startswith("__") or _is_submodule(name):
        raise AttributeError(name)  # ``from cadre import _run``: the import system loads the submodule then
    client = _client()
    if client is None or not hasattr(client, name):
        raise ImportError(
            f"cadre.{name} is not available in this job: the node agent brings only Run.get_context() into a "
            "job's environment. Add cadre to the job's environment to use the rest of its client.",
            name="cadre",
        )
    return getattr(client, name)


__all__ = ["Run", "RunContext", "RunContextError"]

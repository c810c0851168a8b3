"""Fixtures: one real local cluster per session (nats-server with JetStream, SeaweedFS S3, five services, agents).

Every process is started by ``cadre._local.up`` on free loopback ports and stopped by ``down`` (process-group
kills), whatever the tests do; each test also runs under pytest-timeout's hard limit.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import AGENT_SLOTS

from cadre import Workspace, _local


@pytest.fixture(scope="session")
def cluster_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("cadre-home")
    _local.up(home=home, agents=1, slots_per_agent=AGENT_SLOTS, gpus_per_agent=0, timeout=120)
    os.environ["CADRE_HOME"] = str(home)  # for the CLI tests: the profile is found with no arguments
    try:
        yield home
    finally:
        _local.down(home=home)
        os.environ.pop("CADRE_HOME", None)


@pytest.fixture(scope="session")
def ws(cluster_home: Path) -> Iterator[Workspace]:
    with Workspace.from_config(cluster_home / "profile.json") as workspace:
        yield workspace


@pytest.fixture
def make_project(tmp_path: Path) -> Callable[..., Path]:
    """Write a small project folder: ``make_project(train="print(1)", **other_files)``."""

    def make(**files: str) -> Path:
        root = tmp_path / f"proj{len(list(tmp_path.iterdir()))}"
        root.mkdir()
        for name, body in files.items():
            path = root / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(body))
        return root

    return make

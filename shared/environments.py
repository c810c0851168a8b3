"""A job's environment: image + pip packages + conda packages + environment variables.

The client validates it (a bad image name or package spec fails at ``Estimator(...)``), the scheduler places runs
that need a container only on nodes with the Docker runtime, and the node agent builds what the environment needs
once per content hash and reuses it (a derived image for the Docker runtime, a venv for the process runtime).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import msgspec

from shared import schemas, subjects
from shared.errors import ValidationError

# Docker's reference grammar, simplified: [registry[:port]/]path[:tag][@digest], lower-case path components.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
# The first component is a registry only if it has a dot or a port, or is localhost (as Docker decides).
_HOST = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"(?:(?:localhost|{_HOST}(?:\.{_HOST})+)(?::[0-9]+)?/|{_HOST}:[0-9]+/)"
IMAGE_RE = re.compile(
    rf"^{_DOMAIN}?{_COMPONENT}(?:/{_COMPONENT})*(?::[\w][\w.-]{{0,127}})?(?:@sha256:[0-9a-f]{{64}})?$"
)
# A requirement as pip or conda reads it, without options: pip flags in a package list could point pip anywhere.
PACKAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-\[\],]*(?:\s*(?:[=<>!~]=?|===)\s*[A-Za-z0-9.*+!_\-]+,?)*$")
SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
PULL_POLICIES = ("never", "if-not-present", "always")


def parse_size(value: str | int, what: str, minimum: int = 1 << 20) -> int:
    """``"2g"``, ``"512m"``, ``"1.5GiB"`` or a number of bytes; raises a ValidationError naming ``what``."""
    if isinstance(value, bool):
        raise ValidationError(f"{what} must be a size such as '2g' or '512m', not {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = SIZE_RE.match(str(value))
        if not match:
            raise ValidationError(f"{what} must be a size such as '2g' or '512m', not {value!r}")
        size = int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])
    if size < minimum:
        raise ValidationError(f"{what} must be at least {minimum} bytes, not {value!r}")
    return size


def check_image(image: str) -> None:
    if not isinstance(image, str) or len(image) > 512 or not IMAGE_RE.match(image):
        raise ValidationError(
            f"custom_docker_image {image!r} is not a valid image reference "
            "(expected e.g. 'pytorch/pytorch:2.3.0-cuda12.1-cudnn8-runtime' or 'registry:5000/team/image:tag')"
        )


def check_packages(packages: list[str], what: str) -> None:
    if not isinstance(packages, list):
        raise ValidationError(f"{what} must be a list of package requirements, not {type(packages).__name__}")
    for pkg in packages:
        if not isinstance(pkg, str) or not PACKAGE_RE.match(pkg.strip()):
            raise ValidationError(
                f"{what} entry {pkg!r} is not a package requirement (expected e.g. 'numpy' or 'scikit-learn==1.5.0'; "
                "options and URLs are not accepted: the node's operator configures the package index)"
            )


def needs_container(spec: schemas.RunSpec) -> bool:
    """Only the Docker runtime can run another image, or conda packages (conda must be in the image)."""
    return spec.custom_docker_image is not None or bool(spec.conda_packages)


@dataclass(frozen=True)
class Environment:
    image: str | None
    pip_packages: tuple[str, ...]
    conda_packages: tuple[str, ...]
    variables: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, spec: schemas.RunSpec) -> Environment:
        return cls(
            image=spec.custom_docker_image,
            pip_packages=tuple(p.strip() for p in spec.pip_packages),
            conda_packages=tuple(p.strip() for p in spec.conda_packages),
            variables=tuple(sorted(spec.environment_variables.items())),
        )

    @property
    def needs_build(self) -> bool:
        return bool(self.pip_packages or self.conda_packages)

    def digest(self) -> str:
        """What identifies the environment as the user defined it (shown in run details and lineage)."""
        return _hash(
            {"image": self.image, "pip": self.pip_packages, "conda": self.conda_packages, "env": self.variables}
        )

    def build_key(self, base: str, index: str = "") -> str:
        """What a built environment depends on: the base (an image id, or the agent's Python) and the packages.

        Environment variables are left out on purpose: changing one must not rebuild an image.
        """
        return _hash({"base": base, "pip": self.pip_packages, "conda": self.conda_packages, "index": index})[:24]

    def describe(self) -> str:
        parts = [f"image {self.image}" if self.image else "the node's default environment"]
        if self.pip_packages:
            parts.append(f"pip: {' '.join(self.pip_packages)}")
        if self.conda_packages:
            parts.append(f"conda: {' '.join(self.conda_packages)}")
        return "; ".join(parts)


def _hash(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def check_definition(d: schemas.EnvironmentDefinition) -> None:
    """What the registry checks before storing a named environment (the client checked the same already)."""
    if not subjects.NAME_RE.match(d.name):
        raise ValidationError(f"environment name {d.name!r} is invalid: use letters, digits, '_' or '-' (at most 128)")
    check_packages(d.pip_packages, "pip_packages")
    check_packages(d.conda_packages, "conda_packages")
    if d.base_image is not None:
        check_image(d.base_image)
    if d.user_managed_dependencies and (d.pip_packages or d.conda_packages):
        raise ValidationError("user_managed_dependencies environments install nothing: list no packages")


def definition_digest(d: schemas.EnvironmentDefinition) -> str:
    """The same definition registered again is the same version (as datasets do with the same content)."""
    return _hash(msgspec.to_builtins(d))

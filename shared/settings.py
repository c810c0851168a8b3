"""Settings every process reads from its environment (``CADRE_*``), one struct per concern.

Secrets come from the environment or from ``*_FILE`` variables naming a file (docker secrets style);
they are never logged: ``__repr__`` masks them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from shared.errors import ValidationError


def _env(name: str, default: str | None = None) -> str | None:
    file_var = os.environ.get(f"{name}_FILE")
    if file_var:
        with open(file_var, encoding="utf-8") as fh:
            return fh.read().strip()
    return os.environ.get(name, default)


def secret_env(name: str) -> str | None:
    """A setting that may be a secret: from ``NAME`` or from the file ``NAME_FILE`` names."""
    return _env(name)


def _require(name: str) -> str:
    value = _env(name)
    if not value:
        raise ValidationError(f"environment variable {name} (or {name}_FILE) must be set")
    return value


@dataclass(frozen=True)
class BusSettings:
    """How a process reaches the bus: a user and password, or a NATS ``.creds`` file's text (``creds``) on a
    bus that trusts an operator (:mod:`shared.trust`)."""

    url: str
    user: str = ""
    password: str = field(default="", repr=False)
    name: str = "cadre"
    creds: str | None = field(default=None, repr=False)

    @property
    def who(self) -> str:
        """The user, for messages (a creds file's user is named in its JWT)."""
        if self.creds:
            from shared.trust import Creds

            try:
                return Creds.parse(self.creds).name or "the credentials file's user"
            except ValidationError:
                return "the credentials file's user"
        return self.user

    @classmethod
    def from_env(cls, name: str) -> BusSettings:
        url = _env("CADRE_NATS_URL", "nats://127.0.0.1:4222") or ""
        creds_path = os.environ.get("CADRE_NATS_CREDS")
        jwt, seed = _env("CADRE_NATS_JWT"), _env("CADRE_NATS_SEED")  # a creds file as two one-line secrets
        if not creds_path and not (jwt or seed):
            return cls(url=url, user=_require("CADRE_NATS_USER"), password=_require("CADRE_NATS_PASSWORD"), name=name)
        from shared.trust import Creds, creds_text

        if creds_path:
            try:
                creds = Path(creds_path).read_text(encoding="utf-8")
            except OSError as exc:
                raise ValidationError(f"CADRE_NATS_CREDS names {creds_path}, which cannot be read: {exc}") from None
        elif jwt and seed:
            creds = creds_text(jwt, seed)
        else:
            raise ValidationError("CADRE_NATS_JWT and CADRE_NATS_SEED (or their _FILE forms) go together")
        Creds.parse(creds)  # a clear error for what is not one, before any connection
        return cls(url=url, name=name, creds=creds)


@dataclass(frozen=True)
class StoreSettings:
    endpoint: str  # host:port, as the services reach it
    access_key: str
    secret_key: str = field(repr=False)
    bucket: str = "cadre"
    secure: bool = False
    region: str = "us-east-1"
    # host:port that presigned URLs name, as agents and clients on other hosts reach the store (default: endpoint)
    public_endpoint: str | None = None

    @classmethod
    def from_env(cls) -> StoreSettings:
        return cls(
            endpoint=_require("CADRE_S3_ENDPOINT"),
            access_key=_require("CADRE_S3_ACCESS_KEY"),
            secret_key=_require("CADRE_S3_SECRET_KEY"),
            bucket=_env("CADRE_S3_BUCKET", "cadre") or "cadre",
            secure=(_env("CADRE_S3_SECURE", "false") or "").lower() in ("1", "true", "yes"),
            region=_env("CADRE_S3_REGION", "us-east-1") or "us-east-1",
            public_endpoint=_env("CADRE_S3_PUBLIC_ENDPOINT", None) or None,
        )


@dataclass(frozen=True)
class Limits:
    """Limits the submitter enforces (Azure ML's defaults)."""

    snapshot_max_bytes: int = 300 * 1024 * 1024
    snapshot_max_files: int = 2000

    @classmethod
    def from_env(cls) -> Limits:
        return cls(
            snapshot_max_bytes=int(_env("CADRE_SNAPSHOT_MAX_BYTES", str(cls.snapshot_max_bytes)) or 0),
            snapshot_max_files=int(_env("CADRE_SNAPSHOT_MAX_FILES", str(cls.snapshot_max_files)) or 0),
        )


NODE_GRACE_DEFAULT = 60.0  # seconds a silent node's runs go on before the node is given up
FENCE_AFTER_DEFAULT = 300.0  # seconds an agent cut off from the bus keeps its ranks (outlasts a bus restart)


def node_grace() -> float:
    return float(_env("CADRE_NODE_GRACE", str(NODE_GRACE_DEFAULT)) or NODE_GRACE_DEFAULT)


def stream_replicas() -> int:
    """Copies of every stream and KV bucket (``CADRE_BUS_REPLICAS``: 1 on one server, 3 on a three-server bus)."""
    value = int(_env("CADRE_BUS_REPLICAS", "1") or 1)
    if value not in (1, 3, 5):
        raise ValueError(f"CADRE_BUS_REPLICAS must be 1, 3 or 5, not {value}")
    return value


def log_level() -> str:
    return (_env("CADRE_LOG_LEVEL", "info") or "info").lower()


def retention_days() -> tuple[int, int]:
    """(run history, log lines) retention in days; 0 keeps forever."""
    return (
        int(_env("CADRE_HISTORY_DAYS", "0") or 0),
        int(_env("CADRE_LOG_RETENTION_DAYS", "30") or 0),
    )

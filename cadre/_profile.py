"""The connection profile: how a client finds a cluster with no arguments.

``cadre up`` writes it to ``$CADRE_HOME/profile.json`` (``~/.cadre`` by default, mode 0600);
:meth:`cadre.Workspace.from_config` reads it.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from shared.errors import ClusterNotRunningError
from shared.settings import BusSettings


class Profile(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str
    user: str = ""
    password: str = ""
    creds: str | None = None  # a NATS .creds file's text, on a bus that trusts an operator (instead of a password)
    name: str = "local"
    portal_url: str | None = None  # the portal's address (run.get_portal_url())

    def bus(self, name: str) -> BusSettings:
        return BusSettings(url=self.nats_url, user=self.user, password=self.password, creds=self.creds, name=name)


def cadre_home() -> Path:
    return Path(os.environ.get("CADRE_HOME") or Path.home() / ".cadre")


def profile_path(home: Path | None = None) -> Path:
    return (home or cadre_home()) / "profile.json"


def load_profile(path: Path | None = None) -> Profile:
    path = path or profile_path()
    if not path.exists():
        raise ClusterNotRunningError(
            f"no cadre cluster profile at {path}: start a local cluster with `cadre up` "
            "(or pass a profile path to Workspace.from_config)"
        )
    return msgspec.json.decode(path.read_bytes(), type=Profile)


def save_profile(profile: Profile, path: Path | None = None) -> Path:
    path = path or profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(msgspec.json.format(msgspec.json.encode(profile)))
    tmp.replace(path)
    return path

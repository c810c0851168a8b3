"""``cadre admin``: the bus's keys and who may connect, on a bus that trusts an operator (:mod:`shared.trust`).

    cadre admin init --keys ~/.cadre/keys          # an operator and its accounts (once per bus)
    cadre admin add-agent gpu-07 -o gpu-07.creds   # a new GPU host joins with this file alone
    cadre admin add-user alice -o alice.creds      # a person: submit and follow runs
    cadre admin revoke gpu-07 --nats nats://bus:4222
    cadre admin users

Revoking re-signs the account with the user's key in its revocations and pushes it to the servers, which close
that user's connections at once and refuse it from then on; nothing else is restarted.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from shared import bus
from shared.auth import Permissions, agent_permissions, client_permissions, service_permissions
from shared.errors import CadreError, ValidationError
from shared.settings import BusSettings
from shared.subjects import NAME_RE
from shared.trust import Keystore

# An agent's own user writes no run: each run it is given comes with credentials for that run alone.
ROLES = {"agent": lambda name: agent_permissions(name, run_writes=False), "user": lambda _name: client_permissions(),
         "service": lambda _name: service_permissions()}  # fmt: skip


def default_keys() -> Path:
    return Path(os.environ.get("CADRE_KEYS") or Path.home() / ".cadre" / "keys")


def permissions(role: str, name: str) -> Permissions:
    if role not in ROLES:
        raise ValidationError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if role == "agent" and not NAME_RE.match(name):
        raise ValidationError(f"node id {name!r}: letters, digits, '_' or '-', starting with a letter or digit")
    return ROLES[role](name)


def add(keys: Path, role: str, name: str, rotate: bool = False, nats_url: str | None = None) -> str:
    """Creds for a new ``role`` user ``name``. Rotating pushes the revocation of its old key when ``nats_url``
    is given (else the old key stays valid until the account is next pushed)."""
    store = Keystore.open(keys)
    creds = store.issue(name, role, permissions(role, name), rotate=rotate)
    if rotate and nats_url:
        push_account(store, nats_url)
    return creds


def revoke(keys: Path, name: str, nats_url: str) -> str:
    """Revoke ``name`` and tell the servers; returns what the server answered."""
    store = Keystore.open(keys)
    store.revoke(name)
    return push_account(store, nats_url)


def push_account(store: Keystore, nats_url: str, timeout: float = 10.0) -> str:
    """Send the freshly signed account JWT to the bus ($SYS.REQ.CLAIMS.UPDATE); the cluster passes it on."""

    async def push() -> str:
        settings = BusSettings(url=nats_url, creds=store.system_creds(), name="cadre-admin")
        nc = await bus.connect(settings)
        try:
            msg = await nc.request("$SYS.REQ.CLAIMS.UPDATE", store.account_jwt().encode(), timeout=timeout)
        finally:
            await nc.close()
        reply = json.loads(msg.data)
        if "error" in reply:
            raise CadreError(f"the bus refused the account update: {reply['error'].get('description', reply)}")
        return str(reply.get("data", {}).get("message", "updated"))

    return asyncio.run(push())


def write_creds(text: str, path: Path) -> Path:
    """Write a creds file with mode 0600 (it holds the user's secret seed); refuses to overwrite one."""
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path

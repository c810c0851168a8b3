"""No anonymous bus access, per-role permissions, and no secret in any log."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest

from shared import schemas, subjects
from shared.bus import connect, request
from shared.errors import ServiceUnavailableError
from shared.settings import BusSettings


def creds(home: Path, name: str) -> BusSettings:
    if name == "client":
        p = json.loads((home / "profile.json").read_text())
        return BusSettings(url=p["nats_url"], user="client", password=p["password"])
    env = json.loads((home / "cluster" / "process-env.json").read_text())[name]
    return BusSettings(url=env["CADRE_NATS_URL"], user=name, password=env["CADRE_NATS_PASSWORD"])


async def violations(settings: BusSettings, action) -> list[str]:
    """Run ``action(nc)`` and return the permission violations the server reported meanwhile."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await connect(settings, error_cb=on_error)
    try:
        await action(nc)
        await nc.flush()
        await asyncio.sleep(0.2)
    finally:
        await nc.close()
    return [e for e in errors if "permissions violation" in e.lower()]


def test_anonymous_access_is_refused(cluster_home: Path) -> None:
    url = creds(cluster_home, "client").url

    async def go() -> None:
        await nats.connect(url, allow_reconnect=False, connect_timeout=2)

    with pytest.raises(Exception, match="Authorization"):
        asyncio.run(go())


def test_client_cannot_forge_run_events_or_write_state(cluster_home: Path) -> None:
    async def forge(nc: nats.NATS) -> None:
        await nc.publish(subjects.run_events("forged_1_x"), b"{}")
        await nc.publish(f"$KV.{subjects.MODELS_BUCKET}.m.latest", b"99")
        await nc.publish(subjects.node_assignments("agent-0"), b"{}")
        await nc.publish(f"$JS.API.DIRECT.GET.KV_{subjects.SECRETS_BUCKET}.$KV.{subjects.SECRETS_BUCKET}.run.x", b"")

    found = asyncio.run(violations(creds(cluster_home, "client"), forge))
    assert len(found) == 4, found


def test_agent_may_publish_only_as_itself_and_not_call_client_apis(cluster_home: Path) -> None:
    agent = creds(cluster_home, "agent-0")

    async def impersonate(nc: nats.NATS) -> None:
        await nc.publish(f"$KV.{subjects.NODES_BUCKET}.agent-7", b"{}")
        await nc.publish(subjects.agent_registry_credential("agent-7"), b"{}")  # another node's registry password
        with pytest.raises(ServiceUnavailableError):
            await request(nc, subjects.Api.MODEL_LIST, schemas.ModelListRequest(), schemas.ModelList, timeout=1)

    found = asyncio.run(violations(agent, impersonate))
    assert len(found) == 3, found


def test_secrets_never_reach_logs_or_events(cluster_home: Path, ws) -> None:
    env = json.loads((cluster_home / "cluster" / "process-env.json").read_text())
    secrets = {v for e in env.values() for k, v in e.items() if k.endswith(("PASSWORD", "SECRET_KEY"))}
    secrets.add(json.loads((cluster_home / "profile.json").read_text())["password"])
    logs = "".join(p.read_text(errors="replace") for p in (cluster_home / "cluster" / "logs").glob("*.log"))
    assert logs and not [s for s in secrets if s in logs]
    assert oct((cluster_home / "profile.json").stat().st_mode & 0o777) == "0o600"

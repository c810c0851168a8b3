"""No anonymous bus access, per-role permissions, and no secret in any log."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from pathlib import Path

import nats
import pytest
from helpers import violations

from shared import schemas, subjects
from shared.bus import connect, request
from shared.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    ServiceUnavailableError,
    ValidationError,
)
from shared.settings import BusSettings


def creds(home: Path, name: str) -> BusSettings:
    if name == "client":
        p = json.loads((home / "profile.json").read_text())
        return BusSettings(url=p["nats_url"], user="client", password=p["password"])
    env = json.loads((home / "cluster" / "process-env.json").read_text())[name]
    return BusSettings(url=env["CADRE_NATS_URL"], user=name, password=env["CADRE_NATS_PASSWORD"])


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


# --- a bus that trusts an operator (decentralized auth, shared/trust.py) ----------------------------------------
@pytest.fixture
def operator_bus(tmp_path: Path):
    """A nats-server that knows no user: it trusts the keystore's operator, and every user brings a JWT."""
    from cadre import _local
    from shared.auth import render_nats_config
    from shared.trust import Keystore

    store = Keystore.create(tmp_path / "keys")
    port, monitor = _local._free_ports(plain=2, with_grpc=0)
    conf = tmp_path / "nats.conf"
    conf.write_text(
        render_nats_config(
            [], listen=f"127.0.0.1:{port}", http=f"127.0.0.1:{monitor}", store_dir=str(tmp_path / "js"),
            server_name="trust", header="test", trust=store.server_config(str(tmp_path / "jwt")),
        )
    )  # fmt: skip
    proc = subprocess.Popen([_local._binary("nats-server"), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "nats-server did not start"
                time.sleep(0.1)
        yield store, f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_on_an_operator_bus_each_role_joins_with_its_creds_file_and_a_revoked_one_is_cut_off(
    operator_bus, tmp_path: Path
) -> None:
    from cadre import admin
    from shared.auth import agent_permissions
    from shared.trust import Creds, Keystore

    store, url = operator_bus
    service = BusSettings(url=url, creds=admin.add(store.root, "service", "submitter"), name="t")
    agent = BusSettings(url=url, creds=admin.add(store.root, "agent", "gpu-1"), name="t")
    foreign = Keystore.create(tmp_path / "other").issue("gpu-1", "agent", agent_permissions("gpu-1"))

    async def go() -> None:
        nc = await connect(service)  # a service: JetStream works in the account the operator signed
        js = nc.jetstream()
        await js.add_stream(name="TRUST_T", subjects=["trust.t"])
        assert (await js.publish("trust.t", b"x")).seq == 1
        await nc.close()

        async def as_someone_else(a: nats.NATS) -> None:
            await a.publish(subjects.node_events("gpu-2"), b"{}")
            await a.publish(subjects.Api.SUBMIT, b"{}")

        assert len(await violations(agent, as_someone_else)) == 2  # the JWT carries the role's permissions

        closed = asyncio.Event()

        async def on_closed() -> None:
            closed.set()

        a = await connect(agent, closed_cb=on_closed)
        answer = await asyncio.to_thread(admin.revoke, store.root, "gpu-1", url)
        assert "jwt updated" in answer
        await asyncio.wait_for(closed.wait(), 10)  # its connection is closed at once
        assert "revoked" in str(a.last_error)
        for refused in (agent, BusSettings(url=url, creds=foreign)):
            with pytest.raises(AuthenticationError, match="refused 'gpu-1'.*revoked or replaced"):
                await connect(refused)

    asyncio.run(go())
    with pytest.raises(ConflictError, match="already has bus credentials"):
        admin.add(store.root, "service", "submitter")
    rotated = Creds.parse(admin.add(store.root, "service", "submitter", rotate=True, nats_url=url))
    assert rotated.name == "submitter" and rotated.claims["sub"] in str(store.users())


def test_creds_files_and_keystores_that_are_wrong_say_so(tmp_path: Path, monkeypatch) -> None:
    from cadre import admin
    from shared.trust import Creds, Keystore

    with pytest.raises(ValidationError, match="not a NATS credentials file"):
        Creds.parse("user: alice\npassword: hunter2\n")
    bad = tmp_path / "bad.creds"
    bad.write_text("nonsense")
    monkeypatch.setenv("CADRE_NATS_CREDS", str(bad))
    with pytest.raises(ValidationError, match="not a NATS credentials file"):
        BusSettings.from_env("t")
    monkeypatch.setenv("CADRE_NATS_CREDS", str(tmp_path / "missing.creds"))
    with pytest.raises(ValidationError, match="CADRE_NATS_CREDS names .*missing.creds, which cannot be read"):
        BusSettings.from_env("t")
    with pytest.raises(NotFoundError, match="holds no cadre bus keys: create them with `cadre admin init"):
        admin.add(tmp_path / "nokeys", "agent", "gpu-1")
    store = Keystore.create(tmp_path / "keys")
    with pytest.raises(ConflictError, match="already holds"):
        Keystore.create(tmp_path / "keys")
    with pytest.raises(ValidationError, match="node id 'gpu 1'"):
        admin.add(store.root, "agent", "gpu 1")
    with pytest.raises(NotFoundError, match="no bus user 'ghost' was issued here"):
        store.revoke("ghost")
    assert all((store.root / f).stat().st_mode & 0o077 == 0 for f in ("operator.nk", "account.nk", "system.nk"))
    text = admin.add(store.root, "user", "alice")
    assert Creds.parse(text).seed not in json.dumps(store.users())  # a user's seed is only in its file

"""The production deployment's bus, as deploy/README.md sets it up: rendered by deploy/render_nats_conf.py, it
trusts an operator; each compose container joins with the JWT and seed compose hands it from deploy/.env, a new
GPU host with the creds file `cadre admin add-agent` writes, and `cadre admin revoke` cuts a host off."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cadre import _local
from cadre._profile import load_profile
from shared import bus
from shared.errors import AuthenticationError
from shared.settings import BusSettings

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "deploy"))
import render_nats_conf  # noqa: E402


def _render(tmp: Path, port: int, monitor: int, agents: str) -> None:
    argv = [
        "--agents", agents, "--keys", str(tmp / "keys"), "--env-file", str(tmp / ".env"),
        "--out", str(tmp / "nats.conf"), "--store-dir", str(tmp / "js"), "--resolver-dir", str(tmp / "jwt"),
        "--listen", f"127.0.0.1:{port}", "--http-port", str(monitor),
        "--client-profile", str(tmp / "prod.json"), "--nats-url", f"nats://127.0.0.1:{port}",
    ]  # fmt: skip
    assert render_nats_conf.main(argv) == 0


def _compose_env(service: dict, env: dict[str, str]) -> dict[str, str]:
    """A container's environment as compose interpolates it from deploy/.env (``${VAR:?message}`` forms)."""
    out = {}
    for key, value in (service.get("environment") or {}).items():
        m = re.fullmatch(r"\$\{([A-Z0-9_]+):\?[^}]*\}", str(value))
        if m:
            assert m.group(1) in env, f"{key}: deploy/.env lacks {m.group(1)}"
            value = env[m.group(1)]
        out[key] = str(value)
    return out


def test_the_rendered_bus_takes_each_container_its_own_creds_and_a_host_added_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc, port, monitor = _start_rendered_bus(tmp_path, "agent-0,agent-1")
    conf = (tmp_path / "nats.conf").read_text()
    assert "authorization" not in conf and "operator:" in conf and (tmp_path / "nats.conf").stat().st_mode & 0o077 == 0
    env = render_nats_conf.read_env(tmp_path / ".env")
    url = f"nats://127.0.0.1:{port}"
    try:
        compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
        joined = []
        for name, service in compose["services"].items():
            container = _compose_env(service, env)
            if "CADRE_NATS_JWT" not in container:
                continue
            assert "CADRE_NATS_PASSWORD" not in container
            monkeypatch.setenv("CADRE_NATS_URL", url)
            monkeypatch.setenv("CADRE_NATS_JWT", container["CADRE_NATS_JWT"])
            monkeypatch.setenv("CADRE_NATS_SEED", container["CADRE_NATS_SEED"])
            settings = BusSettings.from_env(name)
            assert settings.who == name  # each container its own user
            asyncio.run(_connects(settings))
            joined.append(name)
        assert sorted(joined) == sorted([*render_nats_conf.SERVICES, "agent-0", "agent-1"])
        asyncio.run(_connects(load_profile(tmp_path / "prod.json").bus("client")))

        # deploy/README "Add an agent on another GPU host": its creds file, made without touching the bus.
        cli = [sys.executable, "-m", "cadre.cli", "admin"]
        keys = ["--keys", str(tmp_path / "keys")]
        out = subprocess.run([*cli, "add-agent", "gpu-1", "-o", str(tmp_path / "gpu-1.creds"), *keys],
                             capture_output=True, text=True)  # fmt: skip
        assert out.returncode == 0, out.stderr
        monkeypatch.delenv("CADRE_NATS_JWT")
        monkeypatch.delenv("CADRE_NATS_SEED")
        monkeypatch.setenv("CADRE_NATS_CREDS", str(tmp_path / "gpu-1.creds"))
        gpu = BusSettings.from_env("agent-gpu-1")
        asyncio.run(_connects(gpu))
        out = subprocess.run([*cli, "revoke", "gpu-1", "--nats", url, *keys], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        with pytest.raises(AuthenticationError, match="refused 'gpu-1'"):
            asyncio.run(_connects(gpu))

        # Re-rendering with one more agent changes nobody's credentials.
        before = render_nats_conf.read_env(tmp_path / ".env")
        _render(tmp_path, port, monitor, "agent-0,agent-1,agent-2")
        after = render_nats_conf.read_env(tmp_path / ".env")
        assert {k: after[k] for k in before} == before and "NATS_JWT_AGENT_2" in after
    finally:
        proc.terminate()
        proc.wait(10)


def _start_rendered_bus(tmp: Path, agents: str) -> tuple[subprocess.Popen[bytes], int, int]:
    """Render the deployment on free ports and start nats-server from it, until its port answers. A port found
    free can be taken by another process before the server binds it (a fresh-clone CI run here lost the race
    once, and the server's words went nowhere): then it is rendered again on other ports; any other exit fails
    with what the server said."""
    log = tmp / "nats-server.log"
    for _ in range(3):
        port, monitor = _local._free_ports(plain=2, with_grpc=0)
        _render(tmp, port, monitor, agents)
        with open(log, "wb") as out:
            proc = subprocess.Popen([_local._binary("nats-server"), "-c", str(tmp / "nats.conf")],
                                    stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return proc, port, monitor
            time.sleep(0.1)
        said = log.read_text(errors="replace")
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"the rendered bus did not listen on {port} within 20 s:\n{said[-2000:]}")
        if "address already in use" not in said:
            raise AssertionError(f"the rendered bus exited with code {proc.returncode}:\n{said[-2000:]}")
    raise AssertionError(f"the rendered bus found its ports taken three times:\n{said[-2000:]}")


async def _connects(settings: BusSettings) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            nc = await bus.connect(settings)
            break
        except AuthenticationError:
            raise
        except Exception:
            assert time.monotonic() < deadline, "the rendered bus did not start"
            await asyncio.sleep(0.2)
    try:
        await nc.flush()
    finally:
        await nc.close()


def test_the_readme_and_the_systemd_example_use_what_the_bus_takes() -> None:
    readme = (REPO / "deploy" / "README.md").read_text()
    host = readme[readme.index("## 4. Add an agent on another GPU host") : readme.index("## 5. Connect a client")]
    # The commands the test above runs, as the section gives them; and no password left to hand out.
    assert "cadre admin add-agent gpu-1 --keys deploy/keys -o gpu-1.creds" in host
    assert "cadre admin revoke gpu-1 --keys deploy/keys --nats" in host
    assert "PASSWORD" not in host
    example = render_nats_conf.read_env(REPO / "deploy" / "systemd" / "agent.env.example")
    assert (
        example["CADRE_NATS_CREDS"] == "/etc/cadre/agent.creds"
        and "install -m 0600 gpu-1.creds /etc/cadre/agent.creds" in host
    )
    assert not any(k.startswith("CADRE_NATS_PASSWORD") or k == "CADRE_NATS_USER" for k in example)
    compose = (REPO / "docker-compose.yml").read_text()
    assert "NATS_PASSWORD" not in compose


def test_a_local_cluster_whose_s3_port_is_taken_before_weed_binds_it_starts_weed_on_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ports `cadre up` picks are free when picked, but in the ephemeral range: a CI run lost weed's S3 port to
    another process in between ("Port allocation failed"). weed is started again on other ports."""
    picked = _local._free_ports
    blocker = socket.socket()
    taken: list[int] = []

    def first_s3_port_taken(plain: int, with_grpc: int) -> list[int]:
        ports = picked(plain, with_grpc)
        if not taken:  # the first pick: nats-server's 3 ports, then weed's, the S3 port first
            taken.append(ports[plain])
            blocker.bind(("127.0.0.1", ports[plain]))
            blocker.listen()
        return ports

    monkeypatch.setattr(_local, "_free_ports", first_s3_port_taken)
    said: list[str] = []
    try:
        _local.up(home=tmp_path, agents=0, timeout=120, echo=said.append)
        try:
            state = json.loads((tmp_path / "cluster" / "state.json").read_text())
            assert state["s3_endpoint"] != f"127.0.0.1:{taken[0]}"
            assert [p["name"] for p in state["processes"]].count("weed") == 1
            assert any("weed lost a port" in line for line in said), said
        finally:
            _local.down(home=tmp_path)
    finally:
        blocker.close()

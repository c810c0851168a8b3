"""Fixtures: one real local cluster per session (nats-server with JetStream, SeaweedFS S3, five services, agents).

Every process is started by ``cadre._local.up`` on free loopback ports and stopped by ``down`` (process-group
kills), whatever the tests do; each test also runs under pytest-timeout's hard limit.

The whole session runs in a network namespace of its own with no route out (when the tests run as root, as in
CI): nothing a test starts can reach another machine, and an accidental image pull or package download fails at
once instead of leaving the machine. Set CADRE_TEST_NETNS=0 to run in the host's namespace. Besides loopback the
namespace has one virtual NIC whose other end stays inside it, as a host has a NIC: UCX (MPICH's network layer)
will not connect processes in different containers over loopback.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import AGENT_SLOTS, TEST_WHEELS, PackageIndex, private_mounts

from cadre import Workspace, _local

CLONE_NEWNET = 0x40000000
SIOCSIFFLAGS = 0x8914
IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40
TEST_NIC_ADDRESS = "10.203.0.1"


def _loopback_only_network() -> bool:
    """Move this (still single-threaded) process into a new network namespace and bring its loopback up."""
    if os.environ.get("CADRE_TEST_NETNS", "1") == "0" or not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        print(f"tests: no network namespace ({os.strerror(ctypes.get_errno())}); using the host's", file=sys.stderr)
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", b"lo", IFF_UP | IFF_LOOPBACK | IFF_RUNNING))
    for cmd in (
        "link add cadre0 type veth peer name cadre1",
        f"addr add {TEST_NIC_ADDRESS}/24 dev cadre0",
        "link set cadre0 up",
        "link set cadre1 up",
    ):
        try:
            subprocess.run(["ip", *cmd.split()], check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            print(f"tests: no virtual NIC ({detail}); MPI across containers will fail", file=sys.stderr)
            break
    return True


ISOLATED = _loopback_only_network()
PRIVATE_MOUNTS = private_mounts()  # while single-threaded, as the network namespace


@pytest.fixture(scope="session")
def package_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PackageIndex]:
    """A PEP 503 package index on loopback (what an operator's mirror is): small wheels built here, and the wheels
    `make test` downloaded into .cache/test-wheels when they are there."""
    wheels = TEST_WHEELS if TEST_WHEELS.is_dir() else None
    index = PackageIndex(tmp_path_factory.mktemp("package-index"), wheels=wheels)
    try:
        yield index
    finally:
        index.close()


@pytest.fixture(scope="session")
def cluster_home(tmp_path_factory: pytest.TempPathFactory, package_index: PackageIndex) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("cadre-home")
    _local.up(
        home=home,
        agents=1,
        slots_per_agent=AGENT_SLOTS,
        gpus_per_agent=0,
        timeout=120,
        agent_args=["--pip-index-url", package_index.url],
    )
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

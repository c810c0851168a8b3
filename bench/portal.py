"""The portal: an experiment page with many runs, a printed line to a real browser (Debian's chromium), and what
many browsers following one run cost the cluster."""

from __future__ import annotations

import http.cookiejar
import json
import os
import selectors
import socket
import statistics
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from bench.cluster_costs import _ticks_and_rss
from bench.latency import pct
from cadre import Estimator, Experiment, Workspace

CHROMIUM = Path("/usr/bin/chromium")
PRINTER = """
import time
for i in range({lines}):
    print(f"line {{i}} {{time.time():.6f}}", flush=True)
    time.sleep({pause})
"""


def _login(ws: Workspace, next_page: str = "/") -> tuple[urllib.request.OpenerDirector, http.cookiejar.CookieJar]:
    """A logged-in client of the portal and its cookies; the login's redirect to ``next_page`` is followed ("/":
    the experiments page, which lists every run)."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    body = urllib.parse.urlencode({"user": ws.profile.user, "password": ws.profile.password, "next": next_page})
    opener.open(urllib.request.Request(f"{ws.profile.portal_url}/login", data=body.encode()), timeout=10)
    return opener, jar


def _cookie(ws: Workspace) -> str:
    """A logged-in browser's session cookie (``name=value``); its login lands on a light page."""
    return "; ".join(f"{c.name}={c.value}" for c in _login(ws, "/login")[1])


def experiment_page(ws: Workspace, project: Path, runs: int) -> list[float]:
    est = Estimator(project, "p.py", arguments=[])
    exp = Experiment(ws, "bench-portal-page")
    submitted = [exp.submit(est) for _ in range(runs)]
    for r in submitted:
        r.wait_for_completion(raise_on_error=False)  # a failed run is listed all the same
    opener, _ = _login(ws)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        with opener.open(f"{ws.profile.portal_url}/experiments/bench-portal-page", timeout=30) as page:
            body = page.read()
        times.append(time.perf_counter() - t0)
        assert body.count(b'class="compare"') == runs
    return times


def browser_latency(ws: Workspace, project: Path) -> list[float]:
    """Printed (the job's clock) -> on the page (the browser's), for lines printed 20 a second."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # The browser starts and logs in first: on a loaded machine its start can outlast the printer's 10 s.
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(f"{ws.profile.portal_url}/login?next=/")
        page.fill("input[name=user]", ws.profile.user)
        page.fill("input[name=password]", ws.profile.password)
        page.click("button[type=submit]")
        page.wait_for_load_state()
        run = Experiment(ws, "bench-portal").submit(Estimator(project, "printer.py"))
        page.goto(f"{ws.profile.portal_url}/runs/{run.id}")
        opened = time.time()
        run.wait_for_completion()
        page.wait_for_function("document.getElementById('status').dataset.state === 'Completed'", timeout=30000)
        pairs = page.evaluate("""() => [...document.querySelectorAll('#log .line')]
            .map(n => [n.textContent, Number(n.dataset.shown)])""")
        browser.close()
    delays = []
    for text, shown in pairs:
        parts = text.split()
        if len(parts) >= 4 and parts[1] == "line" and float(parts[3]) > opened + 0.5:
            delays.append(shown - float(parts[3]))
    if not delays:
        raise RuntimeError(f"no line of run {run.id} reached the page after it opened ({len(pairs)} on it)")
    return delays


class _Follower:
    """One browser's log stream, read raw off its socket: the HTTP/1.1 chunked body, split into SSE lines."""

    def __init__(self, base: str, path: str, cookie: str) -> None:
        url = urllib.parse.urlsplit(base)
        self.sock = socket.create_connection((url.hostname, url.port or 80), timeout=10)
        request = f"GET {path} HTTP/1.1\r\nHost: {url.netloc}\r\nCookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n"
        self.sock.sendall(request.encode())
        self.sock.setblocking(False)
        self.raw = b""
        self.body = b""
        self.headers_done = False
        self.lines = 0

    def read(self) -> bool:
        """What arrived; False once the server closed the stream."""
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return True
        if not data:
            return False
        self.raw += data
        if not self.headers_done:
            head, sep, rest = self.raw.partition(b"\r\n\r\n")
            if not sep:
                return True
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"the portal answered the log stream with {head.splitlines()[0]!r}")
            self.raw, self.headers_done = rest, True
        while True:  # chunked transfer coding: <hex size>\r\n<data>\r\n
            size_line, sep, rest = self.raw.partition(b"\r\n")
            if not sep:
                break
            size = int(size_line.split(b";")[0], 16)
            if len(rest) < size + 2:
                break
            self.body += rest[:size]
            self.raw = rest[size + 2 :]
        *complete, self.body = self.body.split(b"\n")
        for line in complete:
            if line.startswith(b"data: "):
                self.lines += len(json.loads(line[6:])["lines"])
        return True


def followers_cost(
    ws: Workspace, home: Path, project: Path, clients: int, seconds: float, repeats: int = 3
) -> tuple[float, int]:
    """CPU of every process of the cluster (the services, the agents, nats-server and the S3 server) while
    ``clients`` follow one run's log stream, minus the same run alone. What is measured is following: the browsers
    have logged in before, and each has had its first lines (its replay is done) when the measurement starts.
    The browsers are one thread reading every stream off its socket (a selector): fifty reading threads on a
    2-CPU machine took CPU from what they measured, and their switches made its work slower."""
    procs = json.loads((home / "cluster" / "state.json").read_text())["processes"]
    pids = [p["pid"] for p in procs]

    def cpu_during(followers: int) -> tuple[float, int]:
        cookies = [_cookie(ws) for _ in range(followers)]
        run = Experiment(ws, "bench-portal").submit(Estimator(project, "printer.py"))
        streams = [_Follower(ws.profile.portal_url or "", f"/runs/{run.id}/logs/stream", c) for c in cookies]
        selector = selectors.DefaultSelector()
        for stream in streams:
            selector.register(stream.sock, selectors.EVENT_READ, stream)

        def pump(until: float, stop_when_all_had_lines: bool = False) -> None:
            while time.monotonic() < until:
                if stop_when_all_had_lines and all(s.lines for s in streams):
                    return
                for key, _ in selector.select(timeout=0.5):
                    if not key.data.read():
                        raise RuntimeError(f"the portal closed a log stream of run {run.id}")

        try:
            pump(time.monotonic() + 60, stop_when_all_had_lines=True)
            if not all(s.lines for s in streams):
                raise RuntimeError(f"not every one of {followers} browsers got a line of run {run.id} within 60 s")
            pump(time.monotonic() + 2)  # the run (and, alone, its start) is past its first lines
            before = sum(_ticks_and_rss(pid)[0] for pid in pids)
            t0 = time.monotonic()
            pump(t0 + seconds)
            used = (sum(_ticks_and_rss(pid)[0] for pid in pids) - before) / os.sysconf("SC_CLK_TCK")
            elapsed = time.monotonic() - t0
        finally:
            for stream in streams:
                selector.unregister(stream.sock)
                stream.sock.close()
            selector.close()
            run.cancel()
            run.wait_for_completion(raise_on_error=False)
        return used / elapsed * 100, min((s.lines for s in streams), default=0)

    # Alternating pairs, the median of their differences: one pair swings 3-12 % on a 2-CPU machine.
    costs, least = [], None
    for _ in range(repeats):
        alone, _ = cpu_during(0)
        busy, got = cpu_during(clients)
        costs.append(busy - alone)
        least = got if least is None else min(least, got)
    return statistics.median(costs), least or 0


def run(ws: Workspace, home: Path, quick: bool) -> list[dict[str, object]]:
    if not CHROMIUM.exists() or not ws.profile.portal_url:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "p.py").write_text("print('hi')")
        (project / "printer.py").write_text(PRINTER.format(lines=200 if quick else 600, pause=0.05))
        runs = 1000  # the target's size, quick mode too (about a minute of short runs)
        page = experiment_page(ws, project, runs)
        delays = browser_latency(ws, project)
        (project / "printer.py").write_text(PRINTER.format(lines=100000, pause=0.01))
        cost, least = followers_cost(ws, home, project, 50, 10, repeats=3 if quick else 5)
    p50 = pct(page, 50) * 1e3
    return [
        {"metric": f"portal: experiment page with {runs} runs, p50", "value": p50, "unit": "ms",
         "target": "< 300", "ok": p50 < 300, "note": f"p99 {pct(page, 99) * 1e3:.0f} ms over 10 loads"},
        {"metric": "portal: printed line -> on the page in chromium, p99", "value": pct(delays, 99) * 1e3,
         "unit": "ms", "target": "< 250", "ok": pct(delays, 99) * 1e3 < 250,
         "note": f"p50 {pct(delays, 50) * 1e3:.0f} ms over {len(delays)} lines at 20 lines/s"},
        {"metric": "portal: 50 followers of one run (100 lines/s), extra CPU", "value": cost, "unit": "% core",
         "target": "< 5", "ok": cost < 5,
         "note": f"every process of the cluster (services, agents, nats-server, S3 server), over the same run with no "
                 f"follower (median of 3 alternating pairs of 10 s, once every browser had its first lines); every "
                 f"follower got >= {least} lines"},
    ]  # fmt: skip

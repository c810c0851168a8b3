"""The portal in a real browser: Debian's chromium driven by Playwright (never a browser download), against the
session cluster's portal on loopback. Screenshots are kept in .cache/portal-screenshots."""

from __future__ import annotations

import http.cookiejar
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from cadre import Estimator, Experiment, Workspace
from cadre.hyperdrive import GridParameterSampling, HyperDriveConfig, choice

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / ".cache" / "portal-screenshots"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip

TICKS = """
import time
from cadre import Run
run = Run.get_context()
print("begin", flush=True)
for i in range(400):
    print(f"tick {i}", flush=True)
    run.log("loss", 1.0 / (i + 1))
    time.sleep(0.1)
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "Debian's chromium is needed: apt-get install chromium (.ci/run does)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000})
    yield ctx
    ctx.close()


def _portal(ws: Workspace) -> str:
    assert ws.profile.portal_url
    return ws.profile.portal_url


def _login(page: Page, ws: Workspace, path: str) -> None:
    page.goto(_portal(ws) + path)
    assert "/login" in page.url
    page.fill("input[name=user]", ws.profile.user)
    page.fill("input[name=password]", ws.profile.password)
    page.click("button[type=submit]")
    page.wait_for_url(_portal(ws) + path)


def _logged_in(ws: Workspace) -> urllib.request.OpenerDirector:
    """An HTTP client with a session, as a browser has after the login form (for reading streams raw)."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    body = f"user={ws.profile.user}&password={urllib.parse.quote(ws.profile.password)}&next=/".encode()
    opener.open(urllib.request.Request(_portal(ws) + "/login", data=body), timeout=10)
    return opener


def _shot(page: Page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    colors = Image.open(path).convert("RGB").getcolors(maxcolors=1 << 20) or []
    assert len(colors) > 20, f"{path} looks blank ({len(colors)} colors)"
    return path


def test_every_page_needs_a_session_and_a_wrong_password_is_refused(
    context: BrowserContext, ws: Workspace, make_project: Callable[..., Path]
) -> None:
    run = Experiment(ws, "portal").submit(Estimator(make_project(**{"a.py": "print('hi')"}), "a.py"))
    run.wait_for_completion()
    page = context.new_page()
    page.goto(run.get_portal_url())
    assert "/login?next=" in page.url
    page.fill("input[name=user]", ws.profile.user)
    page.fill("input[name=password]", "not-the-password")
    page.click("button[type=submit]")
    assert "refused" in page.text_content("p.error")
    # A forged or malformed session goes back to the login page, and so do the streams (401, not a page).
    context.add_cookies([{"name": "cadre_session", "value": "e30.forged", "url": _portal(ws)}])
    page.goto(run.get_portal_url())
    assert "/login" in page.url
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{_portal(ws)}/runs/{run.id}/live", timeout=10)
    assert err.value.code == 401
    _login(page, ws, f"/runs/{run.id}")
    cookie = next(c for c in context.cookies() if c["name"] == "cadre_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # State changes need the CSRF token of the session, not only its cookie.
    refused = page.request.post(f"{_portal(ws)}/runs/{run.id}/cancel")
    assert refused.status == 403


def test_a_run_page_follows_logs_and_metrics_live_and_cancels_the_run(
    context: BrowserContext, ws: Workspace, make_project: Callable[..., Path]
) -> None:
    run = Experiment(ws, "portal").submit(Estimator(make_project(**{"ticks.py": TICKS}), "ticks.py"))
    page = context.new_page()
    _login(page, ws, f"/runs/{run.id}")
    opened = time.time()
    page.wait_for_function("document.querySelectorAll('#log .line').length >= 10", timeout=30000)
    # Each line printed after the page opened was on it within 1 s (the shim's print time to the browser's).
    delays = page.evaluate("""() => [...document.querySelectorAll('#log .line')]
        .map(n => [Number(n.dataset.printed), Number(n.dataset.shown)])""")
    fresh = [shown - printed for printed, shown in delays if printed > opened]
    assert fresh and max(fresh) < 1.0, fresh
    # A chart gains points while the run goes on.
    chart = "svg.chart[data-metric=loss]"
    page.wait_for_selector(chart, timeout=15000)
    before = int(page.get_attribute(chart, "data-points") or 0)
    page.wait_for_function(f"Number(document.querySelector('{chart}').dataset.points) > {before}", timeout=10000)
    # Search keeps only the matching lines in view.
    page.fill("#search", "tick 3")
    shown = page.evaluate("[...document.querySelectorAll('#log .line')].filter(n => !n.hidden).map(n => n.textContent)")
    assert shown and all("tick 3" in line for line in shown)
    page.fill("#search", "")
    _shot(page, "run-live")
    page.click("#cancel")
    page.wait_for_function("['CancelRequested', 'Canceled'].includes(document.getElementById('status').dataset.state)")
    assert run.wait_for_completion(timeout=60, raise_on_error=False)["status"] == "Canceled"
    page.wait_for_function("document.getElementById('status').dataset.state === 'Canceled'", timeout=15000)
    # No credential and no presigned URL in what the browser got.
    source = page.content()
    assert ws.profile.password not in source and "X-Amz-" not in source and "Signature=" not in source


def test_the_other_pages_load_and_bad_requests_get_clear_pages(
    context: BrowserContext, ws: Workspace, make_project: Callable[..., Path]
) -> None:
    project = make_project(**{"out.py": """
        import os
        from cadre import Run
        os.makedirs("outputs", exist_ok=True)
        open("outputs/result.txt", "w").write("forty-two")
        for step in range(3):
            Run.get_context().log("acc", 0.5 + step / 10)
    """})  # fmt: skip
    runs = [Experiment(ws, "portal-pages").submit(Estimator(project, "out.py")) for _ in range(2)]
    for run in runs:
        assert run.wait_for_completion()["status"] == "Completed"
    page = context.new_page()
    _login(page, ws, "/experiments")
    assert page.locator("a[href='/experiments/portal-pages']").count() == 1
    page.goto(f"{_portal(ws)}/experiments/portal-pages")
    for run in runs:
        page.check(f"input.compare[value='{run.id}']")
    page.fill("#compare-metric", "acc")
    page.click("#compare")
    page.wait_for_selector("#compare-chart svg.chart")
    assert page.get_attribute("#compare-chart svg.chart", "data-points") == "6"  # two runs, three values each
    _shot(page, "experiment-compare")
    # Chosen metric columns (each run's last value) and durations.
    page.goto(f"{_portal(ws)}/experiments/portal-pages?metrics=acc")
    page.wait_for_function("[...document.querySelectorAll('span.metric')].every(c => c.textContent === '0.7')")
    assert page.locator("span.metric").count() == 2
    durations = page.locator("#runs tbody tr td:nth-child(5)").all_text_contents()
    assert len(durations) == 2 and all(d.endswith(" s") for d in durations), durations
    # The run's file downloads through the portal (a redirect to a short-lived URL the page never holds).
    page.goto(runs[0].get_portal_url())
    link = page.locator("#files a", has_text="outputs/result.txt")
    assert page.request.get(_portal(ws) + (link.get_attribute("href") or "")).text() == "forty-two"
    # A sweep's page: its children and the primary metric against a parameter.
    sampling = GridParameterSampling({"--scale": choice(1, 2, 3)})
    job = make_project(**{"s.py": """
        import argparse
        from cadre import Run
        p = argparse.ArgumentParser(); p.add_argument("--scale", type=int); a = p.parse_args()
        Run.get_context().log("acc", a.scale / 10)
    """})  # fmt: skip
    hd = HyperDriveConfig(run_config=Estimator(job, "s.py"), hyperparameter_sampling=sampling,
                          primary_metric_name="acc", max_total_runs=3)  # fmt: skip
    sweep = Experiment(ws, "portal-pages").submit(hd)
    assert sweep.wait_for_completion(timeout=120)["status"] == "Completed"
    page.goto(sweep.get_portal_url())
    page.wait_for_selector("#scatter svg")
    assert page.locator("#scatter circle").count() == 3
    assert page.locator("table tbody tr").count() == 3
    page.goto(f"{_portal(ws)}/cluster")
    assert "agent-0" in page.text_content("#nodes")
    _shot(page, "cluster")
    page.goto(f"{_portal(ws)}/models")
    assert page.locator("h1").text_content() == "Models"
    missing = page.goto(f"{_portal(ws)}/runs/portal_0_deadbeef")
    assert missing is not None and missing.status == 404 and "not found" in page.text_content("p.error")
    for path in (f"/runs/{runs[0].id}/files/..%2F..%2Fetc%2Fpasswd", f"/runs/{runs[0].id}/logs/stream?rank=abc",
                 f"/runs/{runs[0].id}/logs/stream?from=1;drop", "/runs/NOT%20AN%20ID"):  # fmt: skip
        response = page.request.get(_portal(ws) + path)
        assert response.status == 400, (path, response.status)


def test_a_log_stream_resumes_from_the_last_line_it_sent(ws: Workspace, make_project: Callable[..., Path]) -> None:
    """What EventSource does on a reconnect: Last-Event-ID holds each rank's next line; nothing is sent twice."""
    lines = "\n".join(f"print('line {i}')" for i in range(30))
    run = Experiment(ws, "portal").submit(Estimator(make_project(**{"l.py": lines}), "l.py"))
    run.wait_for_completion()
    opener = _logged_in(ws)
    request = urllib.request.Request(
        f"{_portal(ws)}/runs/{run.id}/logs/stream?rank=0", headers={"Last-Event-ID": "0:25"}
    )
    with opener.open(request, timeout=10) as stream:
        got: list[str] = []
        while len(got) < 5:
            line = stream.readline().decode()
            if line.startswith("data: "):
                got += [text for _, _, text in json.loads(line[6:])["lines"]]
    assert got == [f"line {i}" for i in range(25, 30)]


def test_a_log_stream_resumes_right_after_the_event_id_a_browser_got_last(
    ws: Workspace, make_project: Callable[..., Path]
) -> None:
    """Event ids are stream sequences: EventSource's Last-Event-ID picks up after that batch, every rank at once."""
    job = "import time\nfor i in range(30):\n    print(f'line {i}', flush=True)\n    time.sleep(0.02)\n"
    run = Experiment(ws, "portal").submit(Estimator(make_project(**{"l.py": job}), "l.py"))
    run.wait_for_completion()
    opener = _logged_in(ws)

    def read(last_event_id: str | None, want: int) -> list[tuple[str, list[str]]]:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        request = urllib.request.Request(f"{_portal(ws)}/runs/{run.id}/logs/stream", headers=headers)
        events, got, event_id = [], 0, ""
        with opener.open(request, timeout=10) as stream:
            while got < want:
                line = stream.readline().decode()
                if line.startswith("id: "):
                    event_id = line[4:].strip()
                elif line.startswith("data: "):
                    texts = [text for _, _, text in json.loads(line[6:])["lines"]]
                    events.append((event_id, texts))
                    got += len(texts)
        return events

    first = read(None, 30)
    assert [t for _, texts in first for t in texts] == [f"line {i}" for i in range(30)]
    assert len(first) > 2 and all(re.fullmatch(r"s\d+", i) for i, _ in first)
    cut = len(first) // 2
    had = sum(len(texts) for _, texts in first[: cut + 1])
    again = read(first[cut][0], 30 - had)
    assert [t for _, texts in again for t in texts] == [f"line {i}" for i in range(had, 30)]


def test_a_browser_that_falls_behind_a_fast_stream_still_gets_every_line_once(
    ws: Workspace, make_project: Callable[..., Path], cluster_home: Path
) -> None:
    """It stops reading for a while: its queue fills, it is dropped from the live feed and catches up from the
    stream, so the portal holds a bounded amount for it and it misses nothing."""
    flood = (
        "import time\npad = 'x' * 4000\nfor i in range(4000):\n    print(f'line {i} {pad}', flush=True)\n"
        "    time.sleep(0.001)\n"
    )  # 16 MB in many small batches: more than the socket holds, and than 256 batches
    run = Experiment(ws, "portal").submit(Estimator(make_project(**{"flood.py": flood}), "flood.py"))
    opener = _logged_in(ws)
    numbers: list[int] = []
    with opener.open(f"{_portal(ws)}/runs/{run.id}/logs/stream?rank=0", timeout=60) as stream:
        time.sleep(6)  # not reading: the socket's buffers fill, then the portal's queue for it
        while len(numbers) < 4000:
            line = stream.readline().decode()
            if line.startswith("data: "):
                numbers += [int(text.split()[1]) for _, _, text in json.loads(line[6:])["lines"]]
    assert numbers == list(range(4000))
    log = (cluster_home / "cluster" / "logs" / "portal.log").read_text()
    assert "follower_lagged" in log  # the path above was taken, not a fast reader's

"""The portal's pages: HTML from the services' own schemas, every value escaped. The live parts (logs, charts,
state) are filled in by static/portal.js from the streams."""

from __future__ import annotations

import html
import json
import time
from typing import Any

from shared import schemas, sweeps
from shared.files import human_size

TERMINAL = ("Completed", "Failed", "Canceled")


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def layout(session: dict[str, Any] | None, title: str, body: str, main_attrs: str = "") -> str:
    nav = ""
    csrf = ""
    if session is not None:
        csrf = f'<meta name="csrf" content="{e(session["csrf"])}">'
        nav = (
            '<nav><a href="/experiments">Experiments</a><a href="/cluster">Cluster</a><a href="/models">Models</a>'
            f'<span class="who">{e(session["u"])}</span>'
            '<button id="logout" type="button">Log out</button></nav>'
        )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)} - cadre</title>{csrf}'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="stylesheet" href="/static/portal.css"><script src="/static/portal.js" defer></script>'
        f'</head><body><header><a class="brand" href="/">cadre</a>{nav}</header>'
        f"<main {main_attrs}><h1>{e(title)}</h1>{body}</main></body></html>"
    )


def login_page(next_path: str, error: str | None) -> str:
    message = f'<p class="error" role="alert">{e(error)}</p>' if error else ""
    body = (
        f'{message}<form method="post" action="/login" class="login">'
        f'<input type="hidden" name="next" value="{e(next_path)}">'
        '<label>User <input name="user" autocomplete="username"></label>'
        '<label>Password <input name="password" type="password" autocomplete="current-password"></label>'
        "<details><summary>Or your credentials file</summary>"
        '<label>.creds file <textarea name="creds" rows="6" spellcheck="false" autocomplete="off"></textarea></label>'
        "</details>"
        '<button type="submit">Log in</button></form>'
        '<p class="hint">Your bus credentials: the user and password of your cadre profile, or, on a bus that '
        "trusts an operator, the .creds file <code>cadre admin add-user</code> gave you.</p>"
    )
    return layout(None, "Log in", body)


def error_page(session: dict[str, Any] | None, title: str, message: str) -> str:
    return layout(session, title, f'<p class="error">{e(message)}</p><p><a href="/">Back to the experiments</a></p>')


def _badge(state: str) -> str:
    return f'<span class="badge s-{e(state)}">{e(state)}</span>'


def _table(headers: list[str], rows: list[list[str]], attrs: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table {attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def experiments_page(session: dict[str, Any], runs: list[schemas.RunSummary]) -> str:
    groups: dict[str, list[schemas.RunSummary]] = {}
    for run in runs:
        groups.setdefault(run.experiment, []).append(run)

    def states(rs: list[schemas.RunSummary]) -> str:
        counts: dict[str, int] = {}
        for r in rs:
            counts[r.state.value] = counts.get(r.state.value, 0) + 1
        return " ".join(f"{_badge(s)} {n}" for s, n in sorted(counts.items()))

    rows = [
        [f'<a href="/experiments/{e(name)}">{e(name)}</a>', str(len(rs)), _when(max(r.at for r in rs)), states(rs)]
        for name, rs in sorted(groups.items())
    ]
    return layout(session, "Experiments", _table(["experiment", "runs", "latest", "states"], rows))


def _duration(r: schemas.RunSummary, now: float) -> str:
    if not r.submitted_at:
        return "-"
    seconds = (r.at if r.state.value in TERMINAL else now) - r.submitted_at
    text = f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
    return text if r.state.value in TERMINAL else f"{text} so far"


def experiment_page(session: dict[str, Any], name: str, runs: list[schemas.RunSummary], metrics: list[str]) -> str:
    now = time.time()
    rows = [
        [f'<input type="checkbox" class="compare" value="{e(r.run_id)}" aria-label="compare {e(r.run_id)}">',
         f'<a href="/runs/{e(r.run_id)}">{e(r.run_id)}</a>', _badge(r.state.value), _when(r.submitted_at),
         _duration(r, now), *(f'<span class="metric" data-run="{e(r.run_id)}" data-metric="{e(m)}"></span>'
                              for m in metrics)]
        for r in runs
    ]  # fmt: skip
    chosen = e(",".join(metrics))
    body = (
        '<form class="columns" method="get"><label>Metric columns <input name="metrics" value="'
        f'{chosen}" placeholder="loss,accuracy"></label><button type="submit">Show</button></form>'
        '<section class="compare-box"><label>Metric <input id="compare-metric" placeholder="loss"></label>'
        '<button id="compare" type="button">Compare the checked runs</button><div id="compare-chart"></div></section>'
        + _table(["", "run", "status", "submitted", "duration", *(e(m) for m in metrics)], rows, 'id="runs"')
    )
    return layout(session, f"Experiment {name}", body, f'data-experiment="{e(name)}"')


def run_page(session: dict[str, Any], d: schemas.RunDetails, files: schemas.FilesList) -> str:
    spec = d.spec
    state = d.state.value
    ranks = spec.node_count * spec.process_count_per_node
    cancel = "" if state in TERMINAL else '<button id="cancel" type="button">Cancel the run</button>'
    timeline = _table(
        ["at", "state", "event"],
        [[_when(h.at), _badge(h.state.value), e(h.kind)] for h in d.history],
        'id="timeline"',
    )
    rank_map = _table(
        ["rank", "node", "host", "local rank", "GPUs"],
        [[str(s.rank), e(s.node_id), e(s.host or "-"), str(s.local_rank), e(",".join(map(str, s.gpu_ids)) or "-")]
         for s in d.placement],
        'id="ranks"',
    )  # fmt: skip
    error = ""
    if d.error is not None:
        error = f'<p class="error" id="error"><b>{e(d.error.code)}</b>: {e(d.error.message)}</p>'
    error += "".join(f'<p class="warning">warning: {e(w)}</p>' for w in d.warnings)
    attempts = ""
    if d.attempts:
        attempts = "<h2>Attempts</h2>" + _table(
            ["attempt", "cause", "nodes", "ended", "message"],
            [[str(a.attempt), e(a.cause), e(", ".join(a.nodes)), _when(a.ended_at), e(a.message)] for a in d.attempts],
        )
    env = spec.environment.name if spec.environment else ("custom image" if spec.custom_docker_image else "-")
    facts = [
        ["experiment", f'<a href="/experiments/{e(d.experiment)}">{e(d.experiment)}</a>'],
        ["script", f"<code>{e(spec.entry_script)} {e(' '.join(spec.arguments))}</code>"],
        ["layout", f"{spec.node_count} node(s) x {spec.process_count_per_node} process(es), {e(spec.distributed)}"],
        ["target", e(spec.compute_target)],
        ["environment", e(env)],
        ["submitted", _when(d.submitted_at)],
        ["attempt", str(d.attempt)],
    ]
    if spec.git is not None:
        dirty = " (dirty)" if spec.git.dirty else ""
        facts.append(["git", e(f"{(spec.git.commit or '-')[:12]} on {spec.git.branch or '-'}{dirty}")])
    if d.parent is not None:
        facts.append(["sweep", f'<a href="/sweeps/{e(d.parent.sweep_id)}">{e(d.parent.sweep_id)}</a> trial '
                               f"{d.parent.trial}"])  # fmt: skip
    file_rows = [
        [f'<a href="/runs/{e(d.run_id)}/files/{e(f.name)}" download>{e(f.name)}</a>', human_size(f.size)]
        for f in files.files
    ]
    options = "".join(f'<option value="{r}">rank {r}</option>' for r in range(ranks))
    body = (
        f'<p>{_badge(state)} <span id="status" data-state="{e(state)}">{e(state)}</span> {cancel}</p>{error}'
        f'<table class="facts">{"".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)}</table>'
        '<h2>Logs</h2><div class="log-tools">'
        f'<select id="rank"><option value="all">all ranks</option>{options}</select>'
        '<input id="search" type="search" placeholder="search the lines">'
        '<label><input id="follow" type="checkbox" checked> follow</label></div>'
        '<pre id="log" aria-live="polite"></pre>'
        '<h2>Metrics</h2><div id="charts"></div><div id="tables"></div><div id="images"></div>'
        '<h2>Tags and properties</h2><dl id="tags"></dl>'
        f"<h2>Timeline</h2>{timeline}<h2>Ranks</h2>{rank_map}{attempts}"
        f"<h2>Files</h2>{_table(['file', 'size'], file_rows, 'id=files')}"
    )
    attrs = f'data-run="{e(d.run_id)}" data-terminal="{"1" if state in TERMINAL else "0"}"'
    return layout(session, f"Run {d.run_id}", body, attrs)


def cluster_page(session: dict[str, Any], state: schemas.SchedulerState, now: float) -> str:
    nodes = [
        [e(n.advert.node_id), _badge(n.state), e(n.advert.compute_target), e(n.advert.address),
         f"{n.used_slots} / {n.advert.slots}", e(", ".join(g.name for g in n.advert.gpus) or "-"),
         f"{max(0.0, now - n.advert.heartbeat_at):.1f} s ago", e(", ".join(n.runs) or "-")]
        for n in state.nodes
    ]  # fmt: skip
    queue = [
        [str(q.position), f'<a href="/runs/{e(q.run_id)}">{e(q.run_id)}</a>', e(q.compute_target), e(q.reason)]
        for q in state.queue
    ]
    body = (
        "<h2>Nodes</h2>"
        + _table(["node", "state", "target", "address", "slots used", "GPUs", "heartbeat", "runs"], nodes, 'id="nodes"')
        + "<h2>Queue</h2>"
        + _table(["position", "run", "target", "why it waits"], queue, 'id="queue"')
    )
    return layout(session, "Cluster", body)


def models_page(session: dict[str, Any], models: list[schemas.ModelVersion]) -> str:
    rows = [
        [e(m.name), str(m.version), e(", ".join(m.aliases) or "-"), _when(m.registered_at),
         f'<a href="/runs/{e(m.lineage.run_id)}">{e(m.lineage.run_id)}</a>' if m.lineage.run_id else "-",
         e(", ".join(f"{k}={v}" for k, v in m.tags.items()) or "-")]
        for m in models
    ]  # fmt: skip
    return layout(session, "Models", _table(["model", "version", "aliases", "registered", "run", "tags"], rows))


def sweep_page(session: dict[str, Any], d: schemas.SweepDetails) -> str:
    spec = d.spec
    names = list(spec.parameter_space)
    rows = [
        [f'<a href="/runs/{e(c.run_id)}">{e(c.run_id)}</a>', _badge(c.state if c.state != "Submitted" else "Running"),
         e(f"{c.value:g}" if c.value is not None else "-"),
         *(e(sweeps.render(c.params[n])) for n in names), e(c.terminated or "")]
        for c in d.children
    ]  # fmt: skip
    points = [{"params": c.params, "value": c.value, "run": c.run_id} for c in d.children if c.value is not None]
    body = (
        f"<p>{_badge(d.state)} {e(sweeps.SAMPLING_NAMES[spec.sampling])}, {e(sweeps.POLICY_NAMES[spec.policy.kind])}, "
        f"{e(spec.primary_metric_goal)} {e(spec.primary_metric_name)}</p>"
        f'<div id="scatter" data-points="{e(json.dumps(points))}" data-params="{e(json.dumps(names))}"></div>'
        + _table(["child", "status", e(spec.primary_metric_name), *(e(n) for n in names), "stopped early"], rows)
    )
    return layout(session, f"Sweep {d.sweep_id}", body)

"""The ``cadre`` command."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from shared.errors import CadreError, ValidationError


def _ws():
    from cadre import Workspace

    return Workspace.from_config()


def cmd_up(args: argparse.Namespace) -> int:
    from cadre import _local

    started = time.monotonic()
    agent_args = ["--runtime", args.runtime]
    if args.image:
        agent_args += ["--image", args.image]
    if args.pull:
        agent_args += ["--pull", args.pull]
    _local.up(
        agents=args.agents,
        gpus_per_agent=args.gpus_per_agent,
        slots_per_agent=args.slots_per_agent,
        timeout=args.timeout,
        echo=print,
        agent_args=agent_args,
        node_grace=args.node_grace,
    )
    print(f"cadre cluster up ({args.agents} agent(s)) in {time.monotonic() - started:.1f}s; stop it with `cadre down`")
    return 0


def cmd_down(_: argparse.Namespace) -> int:
    from cadre import _local

    print("cadre cluster stopped" if _local.down() else "no cadre cluster was running")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from cadre import Estimator, Experiment

    params: dict[str, str] = {}
    rest = list(args.args)
    # Arguments after "--" go to the script: "--flag value" pairs, or a bare "--flag".
    while rest:
        key = rest.pop(0)
        if rest and not rest[0].startswith("-"):
            params[key] = rest.pop(0)
        else:
            params[key] = ""
    with _ws() as ws:
        est = Estimator(
            source_directory=args.directory,
            entry_script=args.entry,
            script_params=params,
            compute_target=args.target,
            node_count=args.nodes,
            process_count_per_node=args.processes,
        )
        run = Experiment(ws, args.experiment).submit(est)
        print(run.id)
        if args.detach:
            return 0
        details = run.wait_for_completion(show_output=True, raise_on_error=False)
        return 0 if details["status"] == "Completed" else 1


def cmd_logs(args: argparse.Namespace) -> int:
    from cadre import Run

    with _ws() as ws:
        Run.get(ws, args.run_id).stream_logs(follow=args.follow, output=sys.stdout, from_line=args.from_line)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from shared import schemas, subjects

    with _ws() as ws:
        runs = ws._request(
            subjects.Api.RUN_LIST, schemas.RunListRequest(experiment=args.experiment, limit=args.limit), schemas.RunList
        ).runs
    print(f"{'RUN ID':<44} {'EXPERIMENT':<20} {'STATUS':<16} UPDATED")
    for r in runs:
        if args.status and r.state.value != args.status:
            continue
        print(f"{r.run_id:<44} {r.experiment:<20} {r.state.value:<16} {time.strftime('%F %T', time.localtime(r.at))}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cadre import Run

    with _ws() as ws:
        d = Run.get(ws, args.run_id).get_details()
    print(f"run:        {d['runId']}\nexperiment: {d['experiment']}\nstatus:     {d['status']}")
    if d["queueReason"]:
        print(f"waiting:    {d['queueReason']}")
    for slot in d["placement"]:
        where = f" on {slot['host']}" if slot.get("host") else ""
        print(f"rank {slot['rank']}:     node {slot['node_id']}{where} local rank {slot['local_rank']}")
    if d["exitCodes"]:
        print("exit codes: " + ", ".join(f"rank {r}: {c}" for r, c in sorted(d["exitCodes"].items())))
    if d["error"]:
        print(f"error:      [{d['error']['code']}] {d['error']['message']}")
    for w in d["warnings"]:
        print(f"warning:    {w['message']}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from cadre import Run

    with _ws() as ws:
        path = Run.get(ws, args.run_id).download_file(args.name, args.dest, progress=progress_bar("downloading"))
    print(path)
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from cadre import _events

    emit = (lambda item: print(_events.as_json(item), flush=True)) if args.json else (
        lambda item: print(item.line(), flush=True))  # fmt: skip
    with _ws() as ws:
        _events.follow(ws, emit, follow=args.follow, since=args.since, run_id=args.run, node_id=args.node,
                       kind=args.type)  # fmt: skip
    return 0


def _scheduler_state(ws):
    return ws._scheduler_state()


def cmd_nodes(_: argparse.Namespace) -> int:
    with _ws() as ws:
        state = _scheduler_state(ws)
    now = time.time()
    print(f"{'NODE':<20} {'TARGET':<14} {'STATE':<28} {'SLOTS':>7} {'GPUS':>7} {'HEARTBEAT':>10}  RUNS")
    for n in state.nodes:
        a = n.advert
        gpus = f"{len(n.used_gpus)}/{len(a.gpus)}" if a.gpus else "-"
        beat = f"{now - a.heartbeat_at:.1f}s ago"
        state = f"{n.state} (lost in {n.lost_in:.0f}s)" if n.lost_in is not None else n.state
        print(f"{a.node_id:<20} {a.compute_target:<14} {state:<28} {f'{n.used_slots}/{a.slots}':>7} {gpus:>7} "
              f"{beat:>10}  {', '.join(n.runs) or '-'}")  # fmt: skip
    return 0


def cmd_services(_: argparse.Namespace) -> int:
    from cadre import _local
    from cadre._profile import cadre_home

    state = _local.read_state(cadre_home() / "cluster")
    local = {r.name: r for r in state.processes} if state else {}
    with _ws() as ws:
        rows = ws._loop.call(_service_rows(ws, [*_local.SERVICES, *(n for n in local if n not in _local.SERVICES)]))
    now = time.time()
    print(f"{'NAME':<14} {'PROCESS':<16} {'PING':<22} {'RESTARTS':>8}  LAST RESTART")
    for name, ping, last in rows:
        rec = local.get(name)
        process = (f"up (pid {rec.pid})" if _local._is_ours(rec) else "DOWN") if rec else "-"
        restarts = str(last.restarts) if last else "0"
        when = f"{now - last.at:.0f}s ago: {last.detail}" if last else "-"
        print(f"{name:<14} {process:<16} {ping:<22} {restarts:>8}  {when}")
    return 0


async def _service_rows(ws, names: list[str]) -> list[tuple[str, str, object]]:
    """Per process: whether it answers its ping (services; agents heartbeat instead), and its last restart."""
    from nats.js.errors import NotFoundError as JsNotFound

    from cadre import _local
    from shared import bus, schemas, subjects

    rows = []
    for name in names:
        ping = "-"
        if name in _local.SERVICES:
            started = time.perf_counter()
            try:
                reply = await bus.request(ws._nc, subjects.service_ping(name), schemas.Empty(), schemas.Ping, 1.0)
                ping = f"ok {(time.perf_counter() - started) * 1e3:.1f} ms {reply.instance}"
            except CadreError:
                ping = "NO ANSWER"
        last = None
        try:
            msg = await ws._js.get_last_msg(subjects.SERVICES_STREAM, subjects.service_events(name))
            last = schemas.service_event_decoder.decode(msg.data or b"")
        except JsNotFound:
            pass
        rows.append((name, ping, last))
    return rows


def cmd_queue(_: argparse.Namespace) -> int:
    with _ws() as ws:
        state = _scheduler_state(ws)
    now = time.time()
    print(f"{'POS':>3}  {'RUN ID':<44} {'TARGET':<12} {'WAITING':>8}  REASON")
    for q in state.queue:
        print(f"{q.position:>3}  {q.run_id:<44} {q.compute_target:<12} {now - q.queued_at:>7.0f}s  {q.reason}")
    if not state.queue:
        print("(no run is waiting)")
    return 0


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARKS[int((v - lo) / span * (len(SPARKS) - 1))] for v in values[-40:])


def cmd_tensorboard(args: argparse.Namespace) -> int:
    from cadre import Run
    from cadre.tensorboard import Tensorboard

    with _ws() as ws:
        tb = Tensorboard([Run.get(ws, run_id) for run_id in args.run_ids], local_root=args.logdir, port=args.port)
        print(f"TensorBoard on {tb.start()} ({', '.join(args.run_ids)}, synced into {tb.local_root}); Ctrl-C stops it")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            tb.stop()
    return 0


def cmd_sweeps(args: argparse.Namespace) -> int:
    from shared import schemas, subjects

    with _ws() as ws:
        request = schemas.SweepListRequest(experiment=args.experiment, limit=args.limit)
        found = ws._request(subjects.Api.SWEEP_LIST, request, schemas.SweepList).sweeps
    print(f"{'SWEEP ID':<16} {'EXPERIMENT':<20} {'STATUS':<16} {'CHILDREN':>8} {'BEST':>12}  SUBMITTED")
    for sw in found:
        best = f"{sw.best_value:g}" if sw.best_value is not None else "-"
        when = time.strftime("%F %T", time.localtime(sw.submitted_at))
        print(f"{sw.sweep_id:<16} {sw.experiment:<20} {sw.state:<16} {sw.children:>8} {best:>12}  {when}")
    return 0


def _show_sweep(ws, sweep_id: str) -> int:
    from cadre.hyperdrive import HyperDriveRun
    from shared import sweeps

    hd = HyperDriveRun.get(ws, sweep_id)
    d = hd._details()
    spec = d.spec
    rows = {r["run_id"]: r for r in hd._ranked(d)}
    reason = f"  {d.reason}" if d.reason else ""
    print(f"sweep:       {d.sweep_id}  ({d.experiment})\nstatus:      {d.state}{reason}")
    print(f"sampling:    {sweeps.SAMPLING_NAMES[spec.sampling]}, policy {sweeps.POLICY_NAMES[spec.policy.kind]}, "
          f"{len(d.children)} of {spec.max_total_runs} children, {spec.max_concurrent_runs} at once")  # fmt: skip
    print(f"script:      {spec.run.entry_script} {' '.join(spec.run.arguments)}")
    print(f"metric:      {spec.primary_metric_goal} {spec.primary_metric_name}")
    if d.error:
        print(f"error:       [{d.error.code}] {d.error.message}")
    names = list(spec.parameter_space)
    width = max([len(sweeps.argument(n)) for n in names] + [8])
    head = " ".join(f"{sweeps.argument(n):>{width}}" for n in names)
    print(f"{'CHILD':<20} {'STATUS':<10} {spec.primary_metric_name[:12]:>12} {head}")
    for child in d.children:
        row = rows[child.run_id]
        value = f"{row['best_primary_metric']:g}" if row["best_primary_metric"] is not None else "-"
        cells = " ".join(f"{sweeps.render(child.params[n]):>{width}}" for n in names)
        mark = "  (stopped early)" if child.terminated else ""
        print(f"{child.run_id:<20} {row['status']:<10} {value:>12} {cells}{mark}")
    if d.best_run_id:
        best = next(c for c in d.children if c.run_id == d.best_run_id)
        args = " ".join(f"{sweeps.argument(k)} {sweeps.render(v)}" for k, v in best.params.items())
        print(f"best:        {d.best_run_id}  {spec.primary_metric_name} {d.best_value:g}  {args}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from cadre import Run
    from shared import sweeps

    if sweeps.is_sweep_id(args.run_id):
        with _ws() as ws:
            return _show_sweep(ws, args.run_id)
    with _ws() as ws:
        run = Run.get(ws, args.run_id)
        d = run.get_details()
        metrics, tags, props = run._run_data()
        names = run.get_file_names()
    spec = d["runDefinition"]
    print(f"run:         {d['runId']}  ({d['experiment']})\nstatus:      {d['status']}")
    if ws.profile.portal_url:
        print(f"portal:      {run.get_portal_url()}")
    if d.get("parent"):
        print(f"sweep:       {d['parent']['sweep_id']} (trial {d['parent']['trial']})")
    print(f"script:      {spec['entry_script']} {' '.join(spec['arguments'])}")
    print(f"layout:      {spec['node_count']} node(s) x {spec['process_count_per_node']} process(es), "
          f"target {spec['compute_target']}, distributed {spec['distributed']}")  # fmt: skip
    if spec.get("git"):
        print(f"git:         {_git_text(spec['git'])}")
    print("timeline:")
    start = d["history"][0]["at"] if d["history"] else 0
    for h in d["history"]:
        print(f"  +{h['at'] - start:8.3f}s  {h['state']}")
    for slot in d["placement"]:
        where = f" on {slot['host']}" if slot.get("host") else ""
        rank, node, local = slot["rank"], slot["node_id"], slot["local_rank"]
        print(f"  rank {rank}: node {node}{where} local rank {local} gpus {slot['gpu_ids']}")
    if d["queueReason"]:
        print(f"waiting:     {d['queueReason']}")
    if d["exitCodes"]:
        print("exit codes:  " + ", ".join(f"rank {r}: {c}" for r, c in sorted(d["exitCodes"].items())))
    if d["error"]:
        print(f"error:       [{d['error']['code']}] {d['error']['message']}")
    for w in d["warnings"]:
        print(f"warning:     {w['message']}")
    if tags or props:
        print(f"tags:        {tags}\nproperties:  {props}")
    if metrics:
        print("metrics:")
        for name, value in sorted(metrics.items()):
            if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                stats = f"last {value[-1]:<12g} min {min(value):<12g} max {max(value):<12g}"
                print(f"  {name:<24} {stats} {sparkline(value)}")
            else:
                print(f"  {name:<24} {value}")
    print(f"files:       {len(names)}" + "".join(f"\n  {n}" for n in names[:50]))
    return 0


def progress_bar(label: str) -> Callable[[int, int], None]:
    """A one-line progress bar on stderr for large transfers (silent when stderr is not a terminal)."""

    def show(done: int, total: int) -> None:
        if not sys.stderr.isatty() or total <= 0:
            return
        width = 30
        filled = int(width * done / total)
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done / 1e6:.1f}/{total / 1e6:.1f} MB")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def cmd_dataset_upload(args: argparse.Namespace) -> int:
    from cadre import Dataset

    with _ws() as ws:
        ds = Dataset.upload(ws, args.directory, args.name, args.description, progress=progress_bar("uploading"))
    print(f"dataset {ds.name} version {ds.version}: {len(ds.files)} file(s), {ds.total_bytes} bytes, "
          f"content {ds.content_hash[:16]}")  # fmt: skip
    return 0


def cmd_dataset_list(_: argparse.Namespace) -> int:
    from cadre import Dataset

    with _ws() as ws:
        datasets = Dataset.list(ws)
    print(f"{'NAME':<28} {'VERSION':>7} {'FILES':>7} {'BYTES':>14}  CONTENT")
    for d in datasets:
        print(f"{d.name:<28} {d.version:>7} {len(d.files):>7} {d.total_bytes:>14}  {d.content_hash[:16]}")
    return 0


def _git_text(git: dict[str, object]) -> str:
    dirty = " (dirty)" if git.get("dirty") else ""
    return f"{git.get('repository')} {git.get('branch')} {git.get('commit')}{dirty}"


def _model(ws, text: str):
    """The model version named NAME, NAME:VERSION or NAME@ALIAS."""
    from cadre import Model

    name, version, alias = _model_ref(text)
    return Model(ws, name, version=version, alias=alias)


def _model_ref(text: str) -> tuple[str, int | None, str | None]:
    """NAME, NAME:VERSION or NAME@ALIAS."""
    if "@" in text:
        name, alias = text.split("@", 1)
        return name, None, alias
    if ":" in text:
        name, version = text.split(":", 1)
        if not version.isdigit():
            raise ValidationError(f"{text!r}: the version after ':' must be a number")
        return name, int(version), None
    return text, None, None


def _pairs(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValidationError(f"{item!r} must look like KEY=VALUE")
        out[key] = value
    return out


def cmd_models_list(args: argparse.Namespace) -> int:
    from cadre import Model

    with _ws() as ws:
        models = Model.list(ws, args.name, tags=_pairs(args.tag), include_archived=args.all)
    print(f"{'NAME':<28} {'VERSION':>7}  {'ALIASES':<16} {'RUN':<36} TAGS")
    for m in models:
        tags = ", ".join(f"{k}={v}" for k, v in sorted(m.tags.items()))
        flag = " (archived)" if m.archived else ""
        print(f"{m.name:<28} {m.version:>7}  {','.join(m.aliases):<16} {m.run_id or 'local files':<36} {tags}{flag}")
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    with _ws() as ws:
        m = _model(ws, args.model)
    git = m.lineage.get("git") or {}
    print(f"model:       {m.name} version {m.version}{' (archived)' if m.archived else ''}")
    print(f"aliases:     {', '.join(m.aliases) or '-'}")
    print(f"registered:  {time.strftime('%F %T', time.localtime(m.created_time))} by {m.created_by or '?'}")
    print(f"from:        run {m.run_id} ({m.experiment_name})  path {m.source_path}" if m.run_id else
          f"from:        local files ({m.source_path})")  # fmt: skip
    if git:
        print(f"git:         {_git_text(git)}")
    print(f"tags:        {m.tags}\nproperties:  {m.properties}")
    for f in m._v.files:
        print(f"  {f.name}  {f.size} bytes  sha256 {f.sha256}")
    return 0


def cmd_models_download(args: argparse.Namespace) -> int:
    with _ws() as ws:
        m = _model(ws, args.model)
        path = m.download(args.dest, exist_ok=args.overwrite)
    print(f"{m.name}:{m.version} -> {path}")
    return 0


def cmd_models_alias(args: argparse.Namespace) -> int:
    from cadre import Model

    with _ws() as ws:
        m = Model(ws, args.name, version=args.version).set_alias(args.alias)
    print(f"{m.name}@{args.alias} -> version {m.version}")
    return 0


def cmd_models_archive(args: argparse.Namespace) -> int:
    from cadre import Model

    with _ws() as ws:
        m = Model(ws, args.name, version=args.version).archive()
    print(f"{m.name}:{m.version} archived")
    return 0


def cmd_admin_init(args: argparse.Namespace) -> int:
    from shared.trust import Keystore

    store = Keystore.create(args.keys, operator=args.operator)
    print(f"{store.root}: operator {args.operator!r} {store.operator_key}, account {store.account_key}")
    print("render the servers' config from these keys (deploy/render_nats_conf.py --keys), then add users")
    return 0


def cmd_admin_add(args: argparse.Namespace) -> int:
    from cadre import admin

    creds = admin.add(args.keys, args.role, args.name, rotate=args.rotate, nats_url=args.nats)
    if args.output is None:
        print(creds, end="")
        return 0
    try:
        path = admin.write_creds(creds, args.output)
    except FileExistsError:
        raise ValidationError(f"{args.output} exists: pick another path (a creds file is never overwritten)") from None
    print(f"{path}: bus credentials for {args.role} {args.name!r} (mode 0600; the only copy of its secret)")
    if args.role == "agent":
        print(f"on the host: CADRE_NATS_CREDS={path.name} python -m services.node_agent --node-id {args.name} ...")
    return 0


def cmd_admin_revoke(args: argparse.Namespace) -> int:
    from cadre import admin

    answer = admin.revoke(args.keys, args.name, args.nats or _profile_url())
    print(f"{args.name}: revoked ({answer}); its connections are closed and it is refused from now on")
    return 0


def cmd_admin_users(args: argparse.Namespace) -> int:
    from shared.trust import Keystore

    users = Keystore.open(args.keys).users()
    print(f"{'NAME':<24} {'ROLE':<8} {'ISSUED (UTC)':<17} STATE")
    for name, u in sorted(users.items()):
        issued = time.strftime("%Y-%m-%d %H:%M", time.gmtime(u["issued_at"]))
        revoked = u["revoked_at"]
        state = "revoked " + time.strftime("%Y-%m-%d %H:%M", time.gmtime(revoked)) if revoked else "valid"
        print(f"{name:<24} {u['role']:<8} {issued:<17} {state}")
    return 0


def _profile_url() -> str:
    from cadre._profile import load_profile

    return load_profile().nats_url


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cadre", description="Train models on a cadre cluster.")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the embedded local cluster in the background")
    up.add_argument("--agents", type=int, default=1)
    up.add_argument(
        "--gpus-per-agent", type=int, default=None, help="GPUs each agent declares (default: detect, one agent only)"
    )
    up.add_argument("--slots-per-agent", type=int, default=None, help="processes each agent runs at once")
    up.add_argument("--timeout", type=float, default=90.0)
    up.add_argument(
        "--runtime", choices=("process", "docker", "auto"), default="process", help="how agents run jobs (process)"
    )
    up.add_argument("--image", default=None, help="Docker runtime: the image for runs that name none")
    up.add_argument("--pull", choices=("never", "if-not-present", "always"), default=None, help="image pull policy")
    up.add_argument(
        "--node-grace", type=float, default=None, help="seconds a silent node's runs go on before it is lost (60)"
    )
    up.set_defaults(fn=cmd_up)

    sub.add_parser("down", help="stop the embedded local cluster").set_defaults(fn=cmd_down)

    s = sub.add_parser("submit", help="submit a training script folder")
    s.add_argument("directory", type=Path)
    s.add_argument("--entry", required=True, help="script inside DIRECTORY")
    s.add_argument("--experiment", default="default")
    s.add_argument("--target", default="local")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--processes", type=int, default=1, help="processes per node")
    s.add_argument("--detach", action="store_true", help="print the run id and return")
    s.epilog = "Arguments after `--` go to the script: cadre submit proj --entry train.py -- --lr 0.1 --verbose"
    s.set_defaults(fn=cmd_submit)

    lg = sub.add_parser("logs", help="print a run's logs")
    lg.add_argument("run_id")
    lg.add_argument("-f", "--follow", action="store_true", help="keep following until the run ends")
    lg.add_argument("--from-line", type=int, default=0, help="resume at this line number (per rank, from 0)")
    lg.set_defaults(fn=cmd_logs)

    r = sub.add_parser("runs", help="list runs")
    r.add_argument("--experiment")
    r.add_argument("--status", help="only runs in this state (Queued, Running, Failed, ...)")
    r.add_argument("--limit", type=int, default=50)
    r.set_defaults(fn=cmd_runs)

    st = sub.add_parser("status", help="a run's state, placement and error")
    st.add_argument("run_id")
    st.set_defaults(fn=cmd_status)

    ev = sub.add_parser("events", help="the event stream: runs, nodes, models (replay, then --follow)")
    ev.add_argument("-f", "--follow", action="store_true")
    ev.add_argument("--since", help="stream sequence, duration (10m, 2h) or ISO time")
    ev.add_argument("--run", help="only this run's events")
    ev.add_argument("--node", help="only events about this node")
    ev.add_argument("--type", help="only this kind of event (queued, assigned, node_lost, joined, ...)")
    ev.add_argument("--json", action="store_true", help="one JSON object per line")
    ev.set_defaults(fn=cmd_events)
    sub.add_parser("nodes", help="nodes: capacity, use, heartbeat, state").set_defaults(fn=cmd_nodes)
    sub.add_parser("queue", help="waiting runs, their position and reason").set_defaults(fn=cmd_queue)
    sub.add_parser("services", help="services and processes: up, ping, restarts").set_defaults(fn=cmd_services)
    tb = sub.add_parser("tensorboard", help="TensorBoard over runs' logs/, synced live while they run")
    tb.add_argument("run_ids", nargs="+", metavar="RUN")
    tb.add_argument("--port", type=int, default=6006)
    tb.add_argument("--logdir", help="where the runs' logs/ are copied (default: a temporary folder)")
    tb.set_defaults(fn=cmd_tensorboard)
    sw = sub.add_parser("sweeps", help="hyperparameter sweeps: state, children, best value")
    sw.add_argument("--experiment")
    sw.add_argument("--limit", type=int, default=50)
    sw.set_defaults(fn=cmd_sweeps)
    sh = sub.add_parser("show", help="everything about one run (metrics included), or one sweep and its children")
    sh.add_argument("run_id")
    sh.set_defaults(fn=cmd_show)

    d = sub.add_parser("download", help="download a run file")
    d.add_argument("run_id")
    d.add_argument("name")
    d.add_argument("dest", nargs="?")
    d.set_defaults(fn=cmd_download)

    dsp = sub.add_parser("dataset", help="datasets runs can read")
    dsub = dsp.add_subparsers(dest="dataset_command", required=True)
    du = dsub.add_parser("upload", help="upload a folder as the next version of a dataset")
    du.add_argument("directory", type=Path)
    du.add_argument("--name", required=True)
    du.add_argument("--description")
    du.set_defaults(fn=cmd_dataset_upload)
    dsub.add_parser("list", help="datasets and their versions").set_defaults(fn=cmd_dataset_list)

    m = sub.add_parser("models", help="registered models")
    msub = m.add_subparsers(dest="models_command", required=True)
    ml = msub.add_parser("list", help="versions, newest last")
    ml.add_argument("name", nargs="?")
    ml.add_argument("--tag", action="append", help="KEY=VALUE (repeatable)")
    ml.add_argument("--all", action="store_true", help="include archived versions")
    ml.set_defaults(fn=cmd_models_list)
    ms = msub.add_parser("show", help="one version: NAME, NAME:VERSION or NAME@ALIAS")
    ms.add_argument("model")
    ms.set_defaults(fn=cmd_models_show)
    md = msub.add_parser("download", help="download a version's files")
    md.add_argument("model", help="NAME, NAME:VERSION or NAME@ALIAS")
    md.add_argument("dest", nargs="?", default=".")
    md.add_argument("--overwrite", action="store_true")
    md.set_defaults(fn=cmd_models_download)
    ma = msub.add_parser("alias", help="point an alias at a version")
    ma.add_argument("name")
    ma.add_argument("alias")
    ma.add_argument("version", type=int)
    ma.set_defaults(fn=cmd_models_alias)
    mr = msub.add_parser("archive", help="hide a version from latest and listings")
    mr.add_argument("name")
    mr.add_argument("version", type=int)
    mr.set_defaults(fn=cmd_models_archive)

    from cadre.admin import ROLES, default_keys

    ad = sub.add_parser("admin", help="bus keys and credentials: enroll hosts and people, revoke them")
    asub = ad.add_subparsers(dest="admin_command", required=True)

    def keys_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument("--keys", type=Path, default=default_keys(), help="the keystore folder [env CADRE_KEYS]")

    ai = asub.add_parser("init", help="create the operator and accounts a bus will trust")
    keys_arg(ai)
    ai.add_argument("--operator", default="cadre", help="the operator's name")
    ai.set_defaults(fn=cmd_admin_init)
    for role in ROLES:
        what = {"agent": "a GPU host's agent", "user": "a person (submit and follow runs)", "service": "a service"}
        aa = asub.add_parser(f"add-{role}", help=f"print or write the credentials file for {what[role]}")
        keys_arg(aa)
        aa.add_argument("name", help="node id" if role == "agent" else "user name")
        aa.add_argument("-o", "--output", type=Path, default=None, help="write it here (mode 0600) instead of stdout")
        aa.add_argument("--rotate", action="store_true", help="replace credentials it has, revoking the old ones")
        aa.add_argument("--nats", default=None, help="with --rotate: the bus to push the revocation to")
        aa.set_defaults(fn=cmd_admin_add, role=role)
    ar = asub.add_parser("revoke", help="cut a user off now: its connections close, it is refused from then on")
    keys_arg(ar)
    ar.add_argument("name")
    ar.add_argument("--nats", default=None, help="the bus (default: the profile's)")
    ar.set_defaults(fn=cmd_admin_revoke)
    au = asub.add_parser("users", help="who was issued credentials, and which were revoked")
    keys_arg(au)
    au.set_defaults(fn=cmd_admin_users)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, script_args = argv[:cut], argv[cut + 1 :]
    args = parser().parse_args(argv)
    args.args = script_args
    try:
        return args.fn(args)
    except CadreError as exc:
        print(f"cadre: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

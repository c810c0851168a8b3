"""Experiment and Run: submitting, following and reading a run (Azure ML's names and semantics)."""

from __future__ import annotations

import asyncio
import hashlib
import queue
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, overload

import msgspec
from nats.js import api as js_api
from nats.js.errors import NotFoundError as JsNotFound

from cadre import _snapshot
from cadre._context import RunContext, get_context
from cadre._estimator import Estimator
from cadre._workspace import Workspace, http_put
from shared import bus, files, lifecycle, schemas, subjects
from shared.errors import NotFoundError, NotSupportedError, RunFailedError, ValidationError
from shared.runs import LogCursor, fold_run_data, validate_spec
from shared.states import RunState

if TYPE_CHECKING:
    from cadre._config import Environment, ScriptRunConfig
    from cadre._model import Model
    from cadre.hyperdrive import HyperDriveConfig, HyperDriveRun

LOG_DRAIN_TIMEOUT = 15.0
OUTAGE_PATIENCE = 300.0  # seconds a following client waits out a bus that is away before it gives up
LOG_FILE_LIMIT = 4 << 20


class Experiment:
    """A named group of runs."""

    def __init__(self, workspace: Workspace, name: str) -> None:
        if not subjects.NAME_RE.match(name):
            raise ValidationError(f"experiment name {name!r} is invalid: use letters, digits, '_' or '-' (at most 128)")
        self.workspace = workspace
        self.name = name

    @overload
    def submit(self, config: HyperDriveConfig, tags: dict[str, str] | None = None) -> HyperDriveRun: ...
    @overload
    def submit(self, config: Estimator | ScriptRunConfig, tags: dict[str, str] | None = None) -> Run: ...

    def submit(
        self, config: Estimator | ScriptRunConfig | HyperDriveConfig, tags: dict[str, str] | None = None
    ) -> Run | HyperDriveRun:
        """Snapshot ``config.source_directory``, upload it, and queue the run (a HyperDriveConfig: start the
        sweep). Returns at once."""
        from cadre.hyperdrive import HyperDriveConfig

        if isinstance(config, HyperDriveConfig):
            return config._submit(self)
        estimator = _estimator_of(config)
        spec = self._upload(estimator, lambda spec: validate_spec(spec), reuse=True)
        request = schemas.SubmitRequest(spec=spec, registry_password=estimator._registry_password)
        try:
            reply = self.workspace._request(subjects.Api.SUBMIT, request, schemas.SubmitReply)
        except NotFoundError:  # the store lost a snapshot this workspace had seen there: up again, once
            self.workspace._stored_snapshots.discard(spec.snapshot.content_hash)
            self._upload(estimator, lambda spec: validate_spec(spec))
            reply = self.workspace._request(subjects.Api.SUBMIT, request, schemas.SubmitReply)
        run = Run(self, reply.run_id)
        if tags:
            run.set_tags(tags)
        return run

    def _upload(
        self, config: Estimator, check: Callable[[schemas.RunSpec], None], reuse: bool = False
    ) -> schemas.RunSpec:
        """The run's spec, once its snapshot is stored; ``check`` fails it first, before any byte is uploaded.

        ``reuse``: a snapshot this workspace stored or found stored before is not asked about again (the same code
        submitted again, the common case: a round trip saved); the submitter still checks it is there.
        """
        ws = self.workspace
        snap = _snapshot.pack(config.source_directory)
        spec = config.to_spec(self.name, snap.ref, _snapshot.git_info(config.source_directory))
        check(spec)
        if reuse and snap.ref.content_hash in ws._stored_snapshots:
            return spec
        prep = ws._request(
            subjects.Api.SNAPSHOT_PREPARE,
            schemas.SnapshotPrepareRequest(snapshot=snap.ref),
            schemas.SnapshotPrepareReply,
        )
        if not prep.exists:
            assert prep.upload_url is not None
            http_put(prep.upload_url, snap.data)
        ws._stored_snapshots.add(snap.ref.content_hash)
        return spec

    def get_runs(self, status: str | None = None, tags: dict[str, str] | None = None, limit: int = 100) -> list[Run]:
        """This experiment's runs, newest first, optionally only those in ``status`` with all of ``tags``."""
        runs = self.workspace._request(
            subjects.Api.RUN_LIST, schemas.RunListRequest(experiment=self.name, limit=limit), schemas.RunList
        ).runs
        chosen = [Run(self, r.run_id) for r in runs if status is None or r.state.value == status]
        if tags:
            chosen = [r for r in chosen if all(r.get_tags().get(k) == v for k, v in tags.items())]
        return chosen

    list_runs = get_runs

    def __repr__(self) -> str:
        return f"Experiment(name={self.name!r})"


def portal_url(ws: Workspace, path: str) -> str:
    base = ws.profile.portal_url
    if not base:
        raise NotSupportedError(
            f"the profile of workspace {ws.name!r} names no portal: add its address as portal_url (cadre up does)"
        )
    return base.rstrip("/") + path


def _estimator_of(config: object) -> Estimator:
    from cadre._config import ScriptRunConfig

    if isinstance(config, ScriptRunConfig):
        config = config._estimator
    if not isinstance(config, Estimator):
        raise ValidationError(
            f"submit expects a ScriptRunConfig, an Estimator or a HyperDriveConfig, not {type(config).__name__}"
        )
    return config


class Run:
    """One submitted run."""

    def __init__(self, experiment: Experiment, run_id: str) -> None:
        self.experiment = experiment
        self.id = run_id
        self._ws = experiment.workspace

    @staticmethod
    def get_context() -> RunContext:
        """Inside a training script: the current run, to log metrics, tags and files (offline outside cadre)."""
        return get_context()

    @classmethod
    def get(cls, workspace: Workspace, run_id: str) -> Run:
        details = workspace._request(subjects.Api.RUN_GET, schemas.RunRef(run_id=run_id), schemas.RunDetails)
        return cls(Experiment(workspace, details.experiment), run_id)

    def __repr__(self) -> str:
        return f"Run(id={self.id!r}, experiment={self.experiment.name!r})"

    def get_portal_url(self) -> str:
        """The run's page in the portal: live logs, metric charts, files."""
        return portal_url(self._ws, f"/runs/{self.id}")

    # --- state ---------------------------------------------------------------------------------------
    def _details(self) -> schemas.RunDetails:
        return self._ws._request(subjects.Api.RUN_GET, schemas.RunRef(run_id=self.id), schemas.RunDetails)

    def get_status(self) -> str:
        return self._details().state.value

    def get_details(self) -> dict[str, Any]:
        """Azure ML's run details (``runId``, ``status``, ``target``, ``startTimeUtc``, ``endTimeUtc``,
        ``properties``, ``inputDatasets``, ``runDefinition``, ``error``, ...)."""
        details = details_dict(self._details())
        details["properties"] = self.get_properties()
        return details

    def get_details_with_logs(self) -> dict[str, Any]:
        """``get_details()`` plus ``logFiles``: every rank's output as ``driver_log.txt`` (one rank) or
        ``driver_log_rank_<n>.txt``, and the text of each file under ``logs/`` (up to 4 MiB each)."""
        details = self.get_details()
        by_rank: dict[int, list[str]] = {}
        items: queue.Queue[tuple[str, Any]] = queue.Queue()
        stop = self._ws._loop.call(self._start_follow(items, follow=False))
        try:
            while (item := items.get())[0] != "end":
                if item[0] == "error":
                    raise item[1]
                if item[0] == "lines":
                    rank, lines = item[1]
                    by_rank.setdefault(rank, []).extend(line.text for line in lines)
        finally:
            self._ws._loop.call(stop())
        single = len(details["placement"]) <= 1
        logs = {
            "driver_log.txt" if single else f"driver_log_rank_{rank}.txt": "".join(f"{t}\n" for t in lines)
            for rank, lines in sorted(by_rank.items())
        }
        for f in self._files("logs/"):
            if f.size <= LOG_FILE_LIMIT:
                info = self._ws._request(
                    subjects.Api.FILE_URL, schemas.FileUrlRequest(run_id=self.id, name=f.name), schemas.FileUrl
                )
                with urllib.request.urlopen(info.url, timeout=60) as resp:
                    logs[f.name] = resp.read().decode("utf-8", "replace")
        details["logFiles"] = logs
        return details

    def get_environment(self) -> Environment:
        """The environment the run was given (an ``Environment``, or one made of the Estimator's packages)."""
        from cadre._config import DEFAULT_ENVIRONMENT, Environment

        spec = self._details().spec
        definition = spec.environment or schemas.EnvironmentDefinition(
            name=DEFAULT_ENVIRONMENT, pip_packages=spec.pip_packages, conda_packages=spec.conda_packages,
            base_image=spec.custom_docker_image, environment_variables=spec.environment_variables,
        )  # fmt: skip
        stored = schemas.EnvironmentVersion(definition=definition, version=0, digest="", created_at=0.0)
        env = Environment._from_stored(stored)
        env.version = None
        return env

    def cancel(self) -> str:
        return self._ws._request(
            subjects.Api.RUN_CANCEL, schemas.RunCancelRequest(run_id=self.id), schemas.RunSummary
        ).state.value

    # --- following ----------------------------------------------------------------------------------
    def wait_for_completion(
        self,
        show_output: bool = False,
        raise_on_error: bool = True,
        timeout: float | None = None,
        output: IO[str] | None = None,
    ) -> dict[str, Any]:
        """Block until the run ends; with ``show_output`` print every log line as it arrives.

        Returns the run's details; raises :class:`RunFailedError` if it failed and ``raise_on_error``.
        """
        out = output or sys.stdout
        if show_output:
            print(f"RunId: {self.id}", file=out, flush=True)
        _, details = self._follow(True, out if show_output else None, timeout, details=True)
        if details is None:
            details = self._ws._loop.call(self._fetch_details())
        if show_output:
            print(f"\nExecution summary\n  RunId: {self.id}\n  Status: {details.state.value}", file=out, flush=True)
            for warning in details.warnings:
                print(f"  Warning: {warning}", file=out, flush=True)
        if raise_on_error and details.state is RunState.FAILED:
            err = details.error.message if details.error else "no error recorded"
            raise RunFailedError(f"run {self.id} failed: {err}")
        return details_dict(details)

    def stream_logs(
        self, follow: bool = True, output: IO[str] | None = None, timeout: float | None = None, from_line: int = 0
    ) -> int:
        """Print the run's log lines (all ranks, in order per rank). ``follow``: until the run ends.

        Every line has a number per rank (0, 1, ...): ``from_line`` resumes a reader where it stopped.
        Lines are printed by the calling thread as they arrive. Returns how many lines were printed.
        """
        return self._follow(follow, output, timeout, from_line)[0]

    def _follow(
        self, follow: bool, output: IO[str] | None, timeout: float | None, from_line: int = 0, details: bool = False
    ) -> tuple[int, schemas.RunDetails | None]:
        """stream_logs, and with ``follow`` and ``details`` the run's details as of its end (folded from the events
        the follower got, as the submitter would: no request after the end), or None where they could not be had
        that way."""
        items: queue.Queue[tuple[str, Any]] = queue.Queue()
        stop = self._ws._loop.call(self._start_follow(items, follow, from_line, details=follow and details))
        deadline = None if timeout is None else time.monotonic() + timeout
        printed = 0
        multi_rank: bool | None = None
        try:
            while True:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    kind, value = items.get(timeout=wait)
                except queue.Empty:
                    raise TimeoutError(f"run {self.id} did not finish within {timeout}s") from None
                if kind == "end":
                    return printed, value
                if kind == "error":
                    raise value
                if kind == "multi":
                    multi_rank = value
                    continue
                rank, lines = value  # a batch: one queue item and one write per batch, not per line
                if output is not None:
                    prefix = f"[rank {rank}] " if multi_rank else ""
                    if not prefix and lines[0].stream != "p":  # (a node's "p" lines come before its ranks' lines)
                        text = "\n".join([ln.text for ln in lines])
                        output.write(text + "\n")
                    else:
                        prepare = f"{prefix}[prepare] "  # the node preparing the run: environment build output
                        output.write("".join(f"{prepare if ln.stream == 'p' else prefix}{ln.text}\n" for ln in lines))
                    output.flush()
                printed += len(lines)
        finally:
            self._ws._loop.call(stop())

    async def _start_follow(
        self, items: queue.Queue[tuple[str, Any]], follow: bool, from_line: int = 0, details: bool = False
    ):
        js = self._ws._js
        received: dict[int, int] = {}
        expected: dict[int, int] = {}
        ended = asyncio.Event()
        caught_up = asyncio.Event()
        subs = []
        targets: dict[int, int] = {}
        events: dict[int, schemas.RunEvent] = {}  # by stream sequence: an ordered consumer's reset may resend
        # The record never changes: read while the run goes on, so the end needs no request of its own (only for a
        # caller that wants the details: a plain log follower is not charged the request).
        record = asyncio.ensure_future(self._fetch_details()) if details else None
        if record is not None:  # its error, if any, is the end's to handle (or nobody's, once stopped)
            record.add_done_callback(lambda f: f.cancelled() or f.exception())

        def check_done() -> None:
            if all(received.get(r, 0) >= n for r, n in expected.items()):
                if ended.is_set() or (not follow and all(received.get(r, 0) >= n for r, n in targets.items())):
                    caught_up.set()

        async def on_event(msg) -> None:
            ev = schemas.run_event_decoder.decode(msg.data)
            events[msg.metadata.sequence.stream] = ev
            if isinstance(ev, schemas.Assigned):
                items.put(("multi", len(ev.placement) > 1))
            if isinstance(ev, schemas.Finalizing):
                expected.update(ev.log_lines)
            if ev.state.is_terminal():
                ended.set()
            check_done()

        cursors: dict[int, LogCursor] = {}

        async def on_log(msg) -> None:
            batch = schemas.log_batch_decoder.decode(msg.data)
            cursor = cursors.setdefault(batch.rank, LogCursor(from_line))
            lines = cursor.take(batch)
            if lines:
                items.put(("lines", (batch.rank, lines)))
            received[batch.rank] = cursor.have
            check_done()

        if not follow:
            details = await self._ws._js.stream_info(subjects.LOGS_STREAM)  # ensures the stream exists
            del details
            for slot in await self._placement():
                try:
                    last = await js.get_last_msg(subjects.LOGS_STREAM, subjects.run_logs(self.id, slot.rank))
                    batch = schemas.log_batch_decoder.decode(last.data or b"")
                    targets[slot.rank] = batch.first_line + len(batch.lines)
                except JsNotFound:  # no lines from this rank yet
                    continue
        # A follower set up while the bus is away (a server restarting) waits for it; once subscribed, the
        # ordered consumers resume by themselves after a reconnect.
        for subject, stream, cb in (
            (subjects.run_logs_all_ranks(self.id), subjects.LOGS_STREAM, on_log),
            (subjects.run_events(self.id), subjects.EVENTS_STREAM, on_event),
        ):
            sub = await bus.outlast(
                lambda subject=subject, stream=stream, cb=cb: js.subscribe(
                    subject, stream=stream, ordered_consumer=True, deliver_policy=js_api.DeliverPolicy.ALL, cb=cb
                ),
                within=OUTAGE_PATIENCE,
            )
            subs.append((sub, stream))
        check_done()

        async def finish() -> None:
            waiter = asyncio.ensure_future(caught_up.wait())
            if not follow:
                await asyncio.wait([waiter], timeout=LOG_DRAIN_TIMEOUT)
            else:
                await ended.wait()
                # Every line was stored before the run could end; give delivery a bounded moment to catch up.
                await asyncio.wait([waiter], timeout=LOG_DRAIN_TIMEOUT)
            items.put(("end", await details_at_the_end()))

        async def details_at_the_end() -> schemas.RunDetails | None:
            if record is None:
                return None
            try:
                d = await record
            except Exception:  # the caller asks again, the usual way
                return None
            kept = schemas.RunRecord(run_id=d.run_id, spec=d.spec, submitted_at=d.submitted_at, parent=d.parent)
            return lifecycle.fold(kept, [events[seq] for seq in sorted(events)])

        task = asyncio.ensure_future(finish())

        async def stop() -> None:
            task.cancel()
            if record is not None:
                record.cancel()
            for sub, stream in subs:
                try:  # and its consumer now: left, it would heartbeat on the server for 5 s after every follow
                    await bus.unsubscribe_and_drop(js, sub, stream)
                except Exception:  # the connection may be closing already
                    pass

        return stop

    async def _fetch_details(self) -> schemas.RunDetails:
        """The run's details, waiting out a bus that is away (for a follower, which must not give up on a blip)."""
        request = schemas.RunRef(run_id=self.id)
        return await bus.outlast(
            lambda: bus.request(self._ws._nc, subjects.Api.RUN_GET, request, schemas.RunDetails),
            within=OUTAGE_PATIENCE,
        )

    async def _placement(self) -> list[schemas.RankSlot]:
        return (await self._fetch_details()).placement

    # --- metrics, tags, properties ------------------------------------------------------------------
    def _run_data(self) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
        async def read() -> list[schemas.RunData]:
            js = self._ws._js
            subject = subjects.run_metrics(self.id)
            try:  # right after a bus outage the stream may still be electing its leader: waited out
                last = await bus.outlast(lambda: js.get_last_msg(subjects.METRICS_STREAM, subject), OUTAGE_PATIENCE)
            except JsNotFound:
                return []
            msgs = bus.replay(js, subjects.METRICS_STREAM, subject, last.seq or 0)
            return [schemas.run_data_decoder.decode(m.data) async for m in msgs]

        return fold_run_data(self._ws._loop.call(read()))

    def get_metrics(self, name: str | None = None) -> dict[str, Any]:
        """Every metric the run logged (name -> value, or list of values), or just ``name``."""
        metrics = self._run_data()[0]
        return {name: metrics[name]} if name is not None and name in metrics else ({} if name else metrics)

    def get_tags(self) -> dict[str, str]:
        return self._run_data()[1]

    def get_properties(self) -> dict[str, str]:
        return self._run_data()[2]

    def tag(self, key: str, value: str = "") -> None:
        self.set_tags({key: value})

    def set_tags(self, tags: dict[str, str]) -> None:
        req = schemas.RunTagRequest(run_id=self.id, tags={k: str(v) for k, v in tags.items()})
        self._ws._request(subjects.Api.RUN_TAG, req, schemas.RunSummary)

    def add_properties(self, properties: dict[str, str]) -> None:
        req = schemas.RunTagRequest(run_id=self.id, properties={k: str(v) for k, v in properties.items()})
        self._ws._request(subjects.Api.RUN_TAG, req, schemas.RunSummary)

    # --- files ---------------------------------------------------------------------------------------
    def _files(self, prefix: str = "") -> list[schemas.FileEntry]:
        return self._ws._request(
            subjects.Api.FILES_LIST, schemas.FilesListRequest(run_id=self.id, prefix=prefix), schemas.FilesList
        ).files

    def get_file_names(self) -> list[str]:
        return [f.name for f in self._files()]

    def download_file(
        self,
        name: str,
        output_file_path: str | Path | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Path:
        """Download one run file (e.g. ``outputs/model.pkl``), streamed to disk and verified (SHA-256 once the run
        is committed, else the store's MD5) before it takes its name."""
        info = self._ws._request(
            subjects.Api.FILE_URL, schemas.FileUrlRequest(run_id=self.id, name=name), schemas.FileUrl
        )
        dest = Path(output_file_path) if output_file_path else Path(name.rsplit("/", 1)[-1])
        if dest.is_dir():
            dest = dest / name.rsplit("/", 1)[-1]
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        # One hash is enough, and hashing is what bounds the speed: SHA-256 once the run is committed, else MD5.
        expected = info.sha256 or (info.md5 if len(info.md5) == 32 else "")
        hasher = hashlib.sha256() if info.sha256 else hashlib.md5(usedforsecurity=False)
        files.fetch(info.url, tmp, info.size, hasher, (lambda done: progress(done, info.size)) if progress else None)
        if expected and hasher.hexdigest() != expected:
            tmp.unlink(missing_ok=True)
            raise OSError(f"download of {name} is corrupt (checksum mismatch); try again")
        tmp.replace(dest)
        return dest

    def download_files(
        self, prefix: str = "outputs", output_directory: str | Path | None = None, append_prefix: bool = True
    ) -> list[Path]:
        root = Path(output_directory or ".")
        out = []
        for f in self._files(prefix):
            rel = f.name if append_prefix else f.name[len(prefix) :].lstrip("/")
            out.append(self.download_file(f.name, files.safe_destination(root, rel)))
        return out

    def register_model(
        self,
        model_name: str,
        model_path: str | None = None,
        tags: dict[str, str] | None = None,
        properties: dict[str, str] | None = None,
        description: str | None = None,
    ) -> Model:
        """Register a file or folder of this (Completed) run as the next version of ``model_name``.

        ``model_path=None`` registers the whole ``outputs/``.
        """
        from cadre._model import _register

        return _register(self._ws, model_name, tags, properties, description, run_id=self.id, model_path=model_path)


def details_dict(d: schemas.RunDetails) -> dict[str, Any]:
    """Run details with Azure ML's key names."""
    return {
        "runId": d.run_id,
        "experiment": d.experiment,
        "status": d.state.value,
        "target": d.spec.compute_target,
        "submittedAt": d.submitted_at,
        "startTimeUtc": d.started_at,
        "endTimeUtc": d.ended_at,
        "queueReason": d.queue_reason,
        "placement": msgspec.to_builtins(d.placement),
        "inputDatasets": [
            {"name": ds.name, "dataset": ds.dataset, "version": ds.version, "mode": ds.mode} for ds in d.spec.datasets
        ],
        "exitCodes": dict(d.exit_codes),
        "error": msgspec.to_builtins(d.error) if d.error else None,
        "warnings": [{"source": "cadre", "message": m} for m in d.warnings],
        "runDefinition": msgspec.to_builtins(d.spec),
        "history": msgspec.to_builtins(d.history),
        "attempt": d.attempt,
        "attempts": msgspec.to_builtins(d.attempts),
        "parent": msgspec.to_builtins(d.parent) if d.parent else None,  # the sweep it is a child of
    }

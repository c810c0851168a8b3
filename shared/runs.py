"""Run-level logic shared by services and the client: ids, spec validation, retries, log cursors, run data."""

from __future__ import annotations

import re
import secrets
import time

from shared import environments, files, schemas, subjects
from shared.errors import ValidationError
from shared.states import INFRASTRUCTURE_CAUSES, Cause

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HASH_RE = re.compile(r"^[0-9a-f]{64}$")
MD5_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_PROCESSES_PER_NODE = 1024
MAX_NODES = 4096
TORCH_BACKENDS = ("gloo", "nccl", "mpi", "ucc")  # PyTorchConfiguration.communication_backend
MAX_RETRIES = 10
RETRY_BACKOFF = (5.0, 300.0)  # seconds before attempt 2, doubling for each further one, up to the second figure


def check_retry_cause(cause: str) -> str:
    """A retry_on entry: a Cause's value, or "exit:<code>" for a user's exit code (1-255, or a signal's -n)."""
    if cause.startswith("exit:"):
        code = cause[len("exit:") :]
        if code.lstrip("-").isdigit() and -64 <= int(code) <= 255 and int(code) != 0:
            return cause
        raise ValidationError(f"retry_on entry {cause!r}: an exit code is 1-255 (or -N for signal N)")
    try:
        return Cause(cause).value
    except ValueError:
        names = ", ".join(c.value for c in Cause)
        raise ValidationError(
            f"retry_on entry {cause!r} is not a cause; causes are: {names}, or an exit code"
        ) from None


def retry_cause(error: schemas.ErrorInfo | None, exit_codes: dict[int, int]) -> str | None:
    """What a failed attempt counts as for retry_on: its cause, or "exit:<code>" for a rank's exit code."""
    if error is None:
        return None
    if error.code == Cause.NONZERO_EXIT:
        bad = [code for code in exit_codes.values() if code != 0]
        return f"exit:{bad[0]}" if bad else Cause.NONZERO_EXIT.value
    return error.code


def should_retry(spec: schemas.RunSpec, cause: str | None, attempt: int) -> bool:
    """Whether a failed attempt is retried: budget left, and its cause is one the run retries (by default the
    infrastructure's; a user's exit codes only when listed)."""
    if cause is None or attempt > spec.max_retries:
        return False
    if spec.retry_on:
        return cause in spec.retry_on
    return cause in {c.value for c in INFRASTRUCTURE_CAUSES}


def retry_delay(attempt: int) -> float:
    """Backoff before attempt ``attempt + 1`` (the first retry waits RETRY_BACKOFF[0])."""
    first, cap = RETRY_BACKOFF
    return min(cap, first * 2 ** (attempt - 1))


# Variables the system sets for every process; a user may not override them.
RESERVED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "CADRE_")


def new_run_id(experiment: str) -> str:
    return f"{experiment.lower()}_{int(time.time())}_{secrets.token_hex(4)}"


def validate_spec(spec: schemas.RunSpec) -> None:
    """Everything that can be checked without the cluster; raises with a message a person can act on."""
    if not subjects.NAME_RE.match(spec.experiment):
        raise ValidationError(
            f"experiment name {spec.experiment!r} is invalid: use letters, digits, '_' or '-' (at most 128)"
        )
    if not subjects.NAME_RE.match(spec.compute_target):
        raise ValidationError(f"compute target name {spec.compute_target!r} is invalid")
    entry = spec.entry_script
    if not entry or entry.startswith("/") or ".." in entry.split("/"):
        raise ValidationError(f"entry_script {entry!r} must be a path relative to source_directory, inside it")
    if not 1 <= spec.node_count <= MAX_NODES:
        raise ValidationError(f"node_count must be between 1 and {MAX_NODES}, not {spec.node_count}")
    if not 1 <= spec.process_count_per_node <= MAX_PROCESSES_PER_NODE:
        raise ValidationError(
            f"process_count_per_node must be between 1 and {MAX_PROCESSES_PER_NODE}, not {spec.process_count_per_node}"
        )
    world = spec.node_count * spec.process_count_per_node
    if spec.distributed == "tensorflow" and not 0 <= spec.parameter_server_count < world:
        raise ValidationError(
            f"parameter_server_count must leave at least one worker among the {world} processes, "
            f"not {spec.parameter_server_count}"
        )
    if spec.distributed == "tensorflow" and "TF_CONFIG" in spec.environment_variables:
        raise ValidationError("TF_CONFIG is set by cadre for every process of a TensorflowConfiguration run")
    if spec.distributed != "tensorflow" and spec.parameter_server_count:
        raise ValidationError("parameter_server_count needs TensorflowConfiguration")
    if spec.communication_backend is not None and spec.communication_backend not in TORCH_BACKENDS:
        raise ValidationError(f"communication_backend must be one of {', '.join(TORCH_BACKENDS)}")
    if not 0 <= spec.max_retries <= MAX_RETRIES:
        raise ValidationError(f"max_retries must be between 0 and {MAX_RETRIES}, not {spec.max_retries}")
    for cause in spec.retry_on:
        check_retry_cause(cause)
    folder = files.check_relative(spec.checkpoint_folder.rstrip("/"))
    if folder.split("/")[0] in ("outputs", "logs"):
        raise ValidationError(
            f"checkpoint_folder {folder!r} must not be under outputs/ or logs/ (those are synced already)"
        )
    if spec.max_run_duration_seconds is not None and spec.max_run_duration_seconds <= 0:
        raise ValidationError("max_run_duration_seconds must be a positive number of seconds")
    for key in spec.environment_variables:
        if not ENV_NAME_RE.match(key):
            raise ValidationError(f"environment variable name {key!r} is invalid")
        if key in RESERVED_ENV or key.startswith("CADRE_"):
            raise ValidationError(f"environment variable {key} is set by cadre for every process; choose another")
    if not HASH_RE.match(spec.snapshot.content_hash) or not MD5_RE.match(spec.snapshot.md5):
        raise ValidationError("snapshot reference is malformed (expected a sha256 content hash and an md5)")
    environments.check_packages(spec.pip_packages, "pip_packages")
    environments.check_packages(spec.conda_packages, "conda_packages")
    if spec.custom_docker_image is not None:
        environments.check_image(spec.custom_docker_image)
    for what, size in (("shm_size", spec.shm_size), ("memory_per_process", spec.memory_per_process)):
        if size is not None:
            environments.parse_size(size, what)
    if spec.cpus_per_process is not None and not 0 < spec.cpus_per_process <= 4096:
        raise ValidationError(f"cpus_per_process must be a positive number, not {spec.cpus_per_process}")


class LogCursor:
    """Reads one rank's log batches in stream order: every line once, by its number (a batch published twice
    across a reconnect repeats lines), and none of a stale attempt once a later attempt wrote on the subject."""

    def __init__(self, from_line: int = 0) -> None:
        self.have = 0  # lines numbered below this were read
        self.from_line = from_line
        self.newest = 1  # the latest attempt seen writing

    def take(self, batch: schemas.LogBatch) -> list[schemas.LogLine]:
        if batch.attempt < self.newest:
            return []
        self.newest = batch.attempt
        skip = max(0, max(self.have, self.from_line) - batch.first_line)
        self.have = max(self.have, batch.first_line + len(batch.lines))
        return batch.lines[skip:]


def fold_run_data(batches: list[schemas.RunData]) -> tuple[dict[str, object], dict[str, str], dict[str, str]]:
    """Metrics, tags and properties of a run, from its RunData batches in order.

    Metrics follow Azure ML: a scalar logged once is its value, logged several times a list; rows accumulate
    into a table (column -> values); images are the run files they were stored as.
    """
    metrics: dict[str, object] = {}
    series: dict[str, list[object]] = {}
    tags: dict[str, str] = {}
    properties: dict[str, str] = {}
    for batch in batches:
        for p in batch.metrics:
            if p.kind in ("scalar", "image"):
                series.setdefault(p.name, []).append(p.value if p.kind == "scalar" else p.path)
            elif p.kind == "list":
                metrics[p.name] = list(p.values)
            elif p.kind == "row":
                table = metrics.setdefault(p.name, {})
                assert isinstance(table, dict)
                for column, value in p.row.items():
                    table.setdefault(column, []).append(value)
            elif p.kind == "table":
                metrics[p.name] = {k: list(v) for k, v in p.table.items()}
        tags.update(batch.tags)
        for key, value in batch.properties.items():
            properties.setdefault(key, value)  # properties are set once
    for name, values in series.items():
        metrics[name] = values[0] if len(values) == 1 else values
    return metrics, tags, properties

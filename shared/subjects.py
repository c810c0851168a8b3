"""Every NATS subject, JetStream stream and consumer, KV bucket and object-store key, built in one place.

Services never spell a subject themselves: they call these builders, so the table in the README and the
permissions in :mod:`shared.auth` stay true.
"""

from __future__ import annotations

import re

PREFIX = "cadre"

# --- streams (JetStream) -------------------------------------------------------------------------------
EVENTS_STREAM = "CADRE_EVENTS"  # every run's lifecycle events; the source of truth for run state
LOGS_STREAM = "CADRE_LOGS"  # batched stdout/stderr lines per run and rank
METRICS_STREAM = "CADRE_METRICS"  # what a run logs about itself: metrics, tags, properties
NODES_STREAM = "CADRE_NODES"  # node joined / left / lost, for operators
ASSIGNMENTS_STREAM = "CADRE_ASSIGNMENTS"  # work handed to one node agent (work-queue retention)
MODELS_STREAM = "CADRE_MODELS"  # registry changes
SERVICES_STREAM = "CADRE_SERVICES"  # a supervisor restarted a process, for operators
SWEEPS_STREAM = "CADRE_SWEEPS"  # hyperparameter sweeps: their events, and the Optuna journal of each

# --- KV buckets ----------------------------------------------------------------------------------------
NODES_BUCKET = "cadre_nodes"  # node_id -> NodeAdvert (capacity + heartbeat)
TARGETS_BUCKET = "cadre_targets"  # compute target name -> ComputeTargetInfo
RUNS_BUCKET = "cadre_runs"  # run_id -> RunRecord (immutable spec of a run)
DATASETS_BUCKET = "cadre_datasets"  # "<name>.v<n>" -> DatasetVersion, "<name>.latest" -> n
ENVIRONMENTS_BUCKET = "cadre_environments"  # "<name>.v<n>" -> EnvironmentVersion
# Private registry passwords, for the services only: "run.<run_id>" or "environment.<name>.v<n>" -> RegistryCredential
SECRETS_BUCKET = "cadre_secrets"
MODELS_BUCKET = "cadre_models"  # "<name>.v<n>" -> ModelVersion, "<name>.latest" -> n, "<name>.alias.<a>" -> n

# --- object store --------------------------------------------------------------------------------------
DEFAULT_BUCKET = "cadre"

# Names users choose that end up inside subjects or keys are checked against this.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
RUN_ID_RE = re.compile(r"^[a-z0-9_-]{1,128}$")


def run_events(run_id: str) -> str:
    return f"{PREFIX}.runs.{run_id}.events"


def all_run_events() -> str:
    return f"{PREFIX}.runs.*.events"


def run_logs(run_id: str, rank: int) -> str:
    return f"{PREFIX}.runs.{run_id}.logs.{rank}"


def run_logs_all_ranks(run_id: str) -> str:
    return f"{PREFIX}.runs.{run_id}.logs.*"


def all_run_logs() -> str:
    return f"{PREFIX}.runs.*.logs.*"


def run_metrics(run_id: str) -> str:
    return f"{PREFIX}.runs.{run_id}.metrics"


def all_run_metrics() -> str:
    return f"{PREFIX}.runs.*.metrics"


def node_events(node_id: str) -> str:
    return f"{PREFIX}.nodes.{node_id}.events"


def service_events(name: str) -> str:
    return f"{PREFIX}.services.{name}.events"


def all_service_events() -> str:
    return f"{PREFIX}.services.*.events"


def all_node_events() -> str:
    return f"{PREFIX}.nodes.*.events"


def node_assignments(node_id: str) -> str:
    return f"{PREFIX}.nodes.{node_id}.assignments"


def all_node_assignments() -> str:
    return f"{PREFIX}.nodes.*.assignments"


def agent_consumer(node_id: str) -> str:
    return f"assignments-{node_id}"


def sweep_events(sweep_id: str) -> str:
    return f"{PREFIX}.sweeps.{sweep_id}.events"


def all_sweep_events() -> str:
    return f"{PREFIX}.sweeps.*.events"


def sweep_journal(sweep_id: str) -> str:
    """The sweep's Optuna study, as the journal Optuna's JournalStorage writes (trials, values, states)."""
    return f"{PREFIX}.sweeps.{sweep_id}.journal"


def all_sweep_subjects() -> str:
    return f"{PREFIX}.sweeps.*.*"


SWEEP_ID_RE = re.compile(r"^hd_[0-9a-f]{12}$")


def child_run_id(sweep_id: str, trial: int) -> str:
    """Azure's naming: a HyperDrive run HD_x has children HD_x_0, HD_x_1, ..."""
    return f"{sweep_id}_{trial}"


def model_events(name: str) -> str:
    return f"{PREFIX}.models.{name}.events"


def all_model_events() -> str:
    return f"{PREFIX}.models.*.events"


# --- request/reply endpoints ---------------------------------------------------------------------------
# Client-facing endpoints live under cadre.api.>, agent-facing ones under cadre.agent.>, so that
# permissions can be granted per role with one wildcard each.
class Api:
    SNAPSHOT_PREPARE = f"{PREFIX}.api.snapshots.prepare"
    SUBMIT = f"{PREFIX}.api.runs.submit"
    RUN_GET = f"{PREFIX}.api.runs.get"
    RUN_LIST = f"{PREFIX}.api.runs.list"
    RUN_CANCEL = f"{PREFIX}.api.runs.cancel"
    FILES_LIST = f"{PREFIX}.api.artifacts.list"
    FILE_URL = f"{PREFIX}.api.artifacts.download"
    MODEL_REGISTER = f"{PREFIX}.api.models.register"
    MODEL_UPLOAD = f"{PREFIX}.api.models.upload"
    MODEL_GET = f"{PREFIX}.api.models.get"
    MODEL_LIST = f"{PREFIX}.api.models.list"
    MODEL_UPDATE = f"{PREFIX}.api.models.update"
    MODEL_ALIAS = f"{PREFIX}.api.models.alias"
    MODEL_DELETE = f"{PREFIX}.api.models.delete"
    MODEL_DOWNLOAD = f"{PREFIX}.api.models.download"
    TARGETS_LIST = f"{PREFIX}.api.targets.list"
    RUN_TAG = f"{PREFIX}.api.runs.tag"
    DATASET_UPLOAD = f"{PREFIX}.api.datasets.upload"
    DATASET_REGISTER = f"{PREFIX}.api.datasets.register"
    DATASET_GET = f"{PREFIX}.api.datasets.get"
    DATASET_LIST = f"{PREFIX}.api.datasets.list"
    ENVIRONMENT_REGISTER = f"{PREFIX}.api.environments.register"
    ENVIRONMENT_GET = f"{PREFIX}.api.environments.get"
    ENVIRONMENT_LIST = f"{PREFIX}.api.environments.list"
    SCHEDULER_STATE = f"{PREFIX}.api.scheduler.state"
    SWEEP_SUBMIT = f"{PREFIX}.api.sweeps.submit"
    SWEEP_GET = f"{PREFIX}.api.sweeps.get"
    SWEEP_LIST = f"{PREFIX}.api.sweeps.list"
    SWEEP_CANCEL = f"{PREFIX}.api.sweeps.cancel"


class AgentApi:
    """What a node asks the artifact service. Each is per node (:func:`of_node`): a node's bus user, and a run's
    credentials for a node, may publish only on their own, so the service reads the caller off the subject."""

    SNAPSHOT_URL = f"{PREFIX}.agent.artifacts.snapshot"
    UPLOAD_URLS = f"{PREFIX}.agent.artifacts.upload"
    COMMIT = f"{PREFIX}.agent.artifacts.commit"
    DATASET_URLS = f"{PREFIX}.agent.datasets.urls"
    ALL = (SNAPSHOT_URL, UPLOAD_URLS, COMMIT, DATASET_URLS)


def of_node(api: str, node_id: str) -> str:
    """``api`` (an :class:`AgentApi` subject) as ``node_id`` asks it."""
    return f"{api}.{node_id}"


def any_node(api: str) -> str:
    """``api`` from every node (what the serving side subscribes to)."""
    return f"{api}.*"


def node_of(subject: str) -> str:
    """The node a per-node subject (``of_node``, ``agent_registry_credential``, ``agent_run_bus``) came from."""
    return subject.rsplit(".", 1)[-1]


def agent_registry_credential(node_id: str) -> str:
    """Per node, so a node's bus user can ask only as itself (the services read the node id off the subject)."""
    return f"{PREFIX}.agent.credentials.{node_id}"


def all_agent_registry_credentials() -> str:
    return f"{PREFIX}.agent.credentials.*"


def agent_run_bus(node_id: str) -> str:
    """Where a node asks for the bus credentials of one of its runs (per node, like the registry's)."""
    return f"{PREFIX}.agent.runbus.{node_id}"


def all_agent_run_bus() -> str:
    return f"{PREFIX}.agent.runbus.*"


def run_secret_key(run_id: str) -> str:
    return f"run.{run_id}"


def environment_secret_key(name: str, version: int) -> str:
    return f"environment.{name}.v{version}"


def service_ping(service: str) -> str:
    return f"{PREFIX}.api.ping.{service}"


# --- object keys ---------------------------------------------------------------------------------------
def snapshot_key(content_hash: str) -> str:
    return f"snapshots/{content_hash}.tar.gz"


def run_file_prefix(run_id: str) -> str:
    return f"runs/{run_id}/files/"


def run_file_key(run_id: str, name: str) -> str:
    return f"{run_file_prefix(run_id)}{name}"


def run_manifest_key(run_id: str) -> str:
    return f"runs/{run_id}/manifest.json"


def model_blob_key(name: str, sha256: str) -> str:
    """A model's files are stored once per content: versions that share a file share its blob."""
    return f"models/{name}/blobs/{sha256}"


def dataset_blob_key(sha256: str) -> str:
    """Dataset files are stored once per content, across every dataset and version."""
    return f"datasets/blobs/{sha256}"


def dataset_version_key(name: str, version: int) -> str:
    return f"{name}.v{version}"


def environment_version_key(name: str, version: int) -> str:
    return f"{name}.v{version}"


def model_latest_key(name: str) -> str:
    return f"{name}.latest"


def model_version_key(name: str, version: int) -> str:
    return f"{name}.v{version}"


def model_alias_key(name: str, alias: str) -> str:
    return f"{name}.alias.{alias}"

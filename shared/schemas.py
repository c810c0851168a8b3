"""Every message that crosses the bus, as msgspec Structs, with module-level encoders/decoders.

Messages are JSON so that an operator can read a stream with any NATS tool. Every top-level message carries
``schema`` so that a later version can be told apart from this one.
"""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

import msgspec

from shared.states import RunState

SCHEMA_VERSION = 1

ScalarParam = str | int | float | bool


class Message(msgspec.Struct, frozen=True, kw_only=True):
    schema: int = SCHEMA_VERSION


# --- run specification -----------------------------------------------------------------------------------
class SnapshotRef(msgspec.Struct, frozen=True, kw_only=True):
    content_hash: str  # sha256 of the archive bytes; the archive is built deterministically
    size: int
    file_count: int
    md5: str  # lets the store verify the upload (S3 ETag of a single PUT)


class GitInfo(msgspec.Struct, frozen=True, kw_only=True):
    repository: str | None = None
    branch: str | None = None
    commit: str | None = None
    dirty: bool = False
    diff: str = ""  # the uncommitted changes (``git diff HEAD``), capped


class DatasetInput(msgspec.Struct, frozen=True, kw_only=True):
    """A dataset a run reads: the agent materializes it on the node and the script receives its local path."""

    name: str  # the input's name in the run (as_named_input), also CADRE_DATASET_<NAME>
    dataset: str
    version: int
    content_hash: str
    mode: Literal["mount", "download"] = "mount"

    @property
    def placeholder(self) -> str:
        return f"{{cadre.dataset.{self.name}}}"


class RegistryAuth(msgspec.Struct, frozen=True, kw_only=True):
    """A private registry, without its password (which lives only in the services' secrets bucket)."""

    address: str
    username: str | None = None
    secret: str | None = None  # the secrets bucket key of the password, set by the service that stored it


class RegistryCredential(msgspec.Struct, frozen=True, kw_only=True):
    username: str | None = None
    password: str

    def __repr__(self) -> str:  # never the password
        return f"RegistryCredential(username={self.username!r})"


class EnvironmentDefinition(msgspec.Struct, frozen=True, kw_only=True):
    """A named environment as Azure ML's ``Environment`` defines it (what ``register`` stores, and a run records)."""

    name: str
    pip_packages: list[str] = []
    conda_packages: list[str] = []
    python_version: str | None = None  # recorded; the interpreter is the image's (or the node's)
    base_image: str | None = None
    environment_variables: dict[str, str] = {}
    user_managed_dependencies: bool = False
    shm_size: int | None = None
    registry: RegistryAuth | None = None


class RunSpec(msgspec.Struct, frozen=True, kw_only=True):
    experiment: str
    entry_script: str
    script_params: dict[str, ScalarParam] = {}
    arguments: list[str] = []  # script_params rendered as the command line, in order
    compute_target: str = "local"
    node_count: int = 1
    process_count_per_node: int = 1
    distributed: Literal["none", "mpi", "pytorch", "tensorflow"] = "none"
    parameter_server_count: int = 0  # tensorflow: the last ranks are parameter servers, the others workers
    placement: Literal["pack", "spread"] = "pack"
    environment_variables: dict[str, str] = {}
    max_run_duration_seconds: int | None = None
    snapshot: SnapshotRef
    git: GitInfo | None = None
    pip_packages: list[str] = []
    conda_packages: list[str] = []
    custom_docker_image: str | None = None
    datasets: list[DatasetInput] = []  # their placeholders in ``arguments`` become local paths on the node
    # What each process's container gets (the Docker runtime; the process runtime has no limits to apply).
    shm_size: int | None = None  # bytes of /dev/shm
    cpus_per_process: float | None = None
    memory_per_process: int | None = None  # bytes; a process over it is killed and reported "out of memory"
    environment: EnvironmentDefinition | None = None  # the Environment object the run was given, if any
    max_retries: int = 0  # attempts after the first, for the causes in retry_on
    retry_on: list[str] = []  # Cause values, or "exit:<code>" for a user's exit code; empty: infrastructure causes
    checkpoint_folder: str = "checkpoints"  # synced while the run goes on, restored into the next attempt
    communication_backend: str | None = None  # PyTorchConfiguration's; reaches the job as CADRE_COMMUNICATION_BACKEND


class SweepTrial(msgspec.Struct, frozen=True, kw_only=True):
    """What makes a run a sweep's child: the sweep, the trial's number in it and the values it was given."""

    sweep_id: str
    trial: int
    params: dict[str, ScalarParam] = {}


class RunRecord(Message, frozen=True, kw_only=True):
    run_id: str
    spec: RunSpec
    submitted_at: float
    parent: SweepTrial | None = None


class RankSlot(msgspec.Struct, frozen=True, kw_only=True):
    rank: int
    node_id: str
    local_rank: int
    gpu_ids: list[int] = []
    host: str | None = None  # the node's address, where the rank runs (its agent's --address)


class FileEntry(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    size: int
    md5: str  # what the object store can check (the ETag of a single PUT)
    sha256: str = ""  # what the file is, end to end


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    code: str
    message: str


# --- run events (the tagged union stored in CADRE_EVENTS) -------------------------------------------------
class RunEventBase(Message, frozen=True, kw_only=True, tag_field="kind"):
    event_id: str
    run_id: str
    state: RunState  # the run's state once this event is applied
    at: float
    # Which attempt of the run the event belongs to (1, 2, ... after retries). 0 when written: the event log
    # stores it with the attempt of the run's last event, so only a retry (Retried) starts a new one.
    attempt: int = 0


class Submitted(RunEventBase, frozen=True, kw_only=True, tag="submitted"):
    experiment: str
    compute_target: str
    entry_script: str


class Queued(RunEventBase, frozen=True, kw_only=True, tag="queued"):
    reason: str | None = None
    spec: RunSpec | None = None  # on the first Queued event, so the scheduler needs no lookup to place the run


class Assigned(RunEventBase, frozen=True, kw_only=True, tag="assigned"):
    placement: list[RankSlot]


class Retried(RunEventBase, frozen=True, kw_only=True, tag="retried"):
    """The attempt before failed for a cause the run retries: the run is queued again as attempt ``attempt``."""

    cause: str  # a Cause, or "exit:<code>"
    error: ErrorInfo
    nodes: list[str]  # where the failed attempt ran
    not_before: float  # the backoff: it is not placed before this time
    log_lines: dict[int, int] = {}  # lines each rank has in the log stream so far: the next attempt numbers on


class Starting(RunEventBase, frozen=True, kw_only=True, tag="starting"):
    node_id: str


class Running(RunEventBase, frozen=True, kw_only=True, tag="running"):
    node_id: str


class RankExited(RunEventBase, frozen=True, kw_only=True, tag="rank_exited"):
    node_id: str
    rank: int
    exit_code: int


Outcome = Literal["succeeded", "failed", "canceled"]


class Rendezvous(RunEventBase, frozen=True, kw_only=True, tag="rendezvous"):
    """The master node (rank 0's) is ready: where the other ranks meet it (torch env://, and MPI's PMI-1 server)."""

    node_id: str
    master_addr: str
    master_port: int
    pmi_port: int | None = None
    endpoints: dict[int, str] = {}  # tensorflow: every rank's "host:port" (its task address in TF_CONFIG)


class Endpoints(RunEventBase, frozen=True, kw_only=True, tag="endpoints"):
    """A non-master node's task addresses (tensorflow), which the master gathers into the Rendezvous."""

    node_id: str
    endpoints: dict[int, str]  # rank -> "host:port"


class NodeFinished(RunEventBase, frozen=True, kw_only=True, tag="node_finished"):
    """One node's ranks have all ended and their log lines are stored."""

    node_id: str
    outcome: Outcome
    exit_codes: dict[int, int] = {}
    log_lines: dict[int, int] = {}  # rank -> number of log lines published, so followers know they have all
    error: ErrorInfo | None = None
    aborted: bool = False  # stopped because of another node's failure (not a cause of its own)


class NodeLost(RunEventBase, frozen=True, kw_only=True, tag="node_lost"):
    node_id: str


class NodeCommitted(RunEventBase, frozen=True, kw_only=True, tag="node_committed"):
    """The artifact service verified one node's uploaded files."""

    node_id: str
    files: list[FileEntry] = []
    error: ErrorInfo | None = None  # files that failed verification or could not be uploaded
    # Files of this node's whose stored copy, at its commit, was another's (the name the entry's, the size and
    # md5 the stored copy's): another node wrote the same name, or none did and the upload went wrong.
    overwritten: list[FileEntry] = []


class Finalizing(RunEventBase, frozen=True, kw_only=True, tag="finalizing"):
    """Every node is done: the run's outcome, decided from all of them, while logs and the manifest are stored."""

    outcome: Outcome
    exit_codes: dict[int, int] = {}
    log_lines: dict[int, int] = {}
    error: ErrorInfo | None = None
    warnings: list[str] = []  # what went wrong without failing the run (a file that differs between nodes)


class CancelRequested(RunEventBase, frozen=True, kw_only=True, tag="cancel_requested"):
    error: ErrorInfo | None = None  # why, when not a person's cancel (a sweep's early termination)


class Completed(RunEventBase, frozen=True, kw_only=True, tag="completed"):
    file_count: int = 0
    total_bytes: int = 0


class Failed(RunEventBase, frozen=True, kw_only=True, tag="failed"):
    error: ErrorInfo


class Canceled(RunEventBase, frozen=True, kw_only=True, tag="canceled"):
    error: ErrorInfo | None = None


RunEvent = (
    Submitted
    | Queued
    | Assigned
    | Retried
    | Starting
    | Running
    | RankExited
    | Rendezvous
    | Endpoints
    | NodeFinished
    | NodeLost
    | NodeCommitted
    | Finalizing
    | CancelRequested
    | Completed
    | Failed
    | Canceled
)


# --- datasets ----------------------------------------------------------------------------------------------------
class DatasetVersion(Message, frozen=True, kw_only=True):
    name: str
    version: int
    content_hash: str  # sha256 over the sorted (path, sha256, size) of its files: same data, same hash
    files: list[FileEntry]
    created_at: float
    description: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


class DatasetUploadRequest(Message, frozen=True, kw_only=True):
    name: str
    files: list[FileEntry]


class DatasetRegisterRequest(Message, frozen=True, kw_only=True):
    name: str
    files: list[FileEntry]
    description: str | None = None


class EnvironmentVersion(Message, frozen=True, kw_only=True):
    definition: EnvironmentDefinition
    version: int
    digest: str  # of the definition: registering the same definition again returns this version
    created_at: float


class EnvironmentRegisterRequest(Message, frozen=True, kw_only=True):
    definition: EnvironmentDefinition
    registry_password: str | None = None  # stored apart (secrets bucket); a new one replaces the old


class EnvironmentRef(Message, frozen=True, kw_only=True):
    name: str
    version: int | None = None  # None: the latest


class EnvironmentList(Message, frozen=True, kw_only=True):
    environments: list[EnvironmentVersion]  # the latest version of each name


class DatasetRef(Message, frozen=True, kw_only=True):
    name: str
    version: int | None = None  # None: the latest


class DatasetUrlsRequest(Message, frozen=True, kw_only=True):
    run_id: str
    content_hash: str


class DatasetList(Message, frozen=True, kw_only=True):
    datasets: list[DatasetVersion]


class DatasetFiles(Message, frozen=True, kw_only=True):
    urls: dict[str, str]  # file path -> presigned URL (upload: only the files not stored yet)
    version: DatasetVersion | None = None


# --- what a run records about itself (CADRE_METRICS) -----------------------------------------------------------
MetricValue = int | float | str | bool | None


class MetricPoint(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: Literal["scalar", "list", "row", "table", "image"] = "scalar"
    value: MetricValue = None  # scalar
    values: list[MetricValue] = []  # list
    row: dict[str, MetricValue] = {}  # row
    table: dict[str, list[MetricValue]] = {}  # table
    path: str | None = None  # image: the run file it was stored as
    step: int | None = None
    at: float = 0.0
    rank: int = 0


class RunData(Message, frozen=True, kw_only=True):
    """One batch of what a run logged, from its node agent (or, for tags set after the run, the submitter)."""

    run_id: str
    metrics: list[MetricPoint] = []
    tags: dict[str, str] = {}
    properties: dict[str, str] = {}


class RunTagRequest(Message, frozen=True, kw_only=True):
    run_id: str
    tags: dict[str, str] = {}
    properties: dict[str, str] = {}


# --- node events (CADRE_NODES) ----------------------------------------------------------------------------------
class NodeEvent(Message, frozen=True, kw_only=True):
    node_id: str
    kind: Literal["joined", "left", "lost", "not_responding", "recovered"]
    at: float
    compute_target: str = ""
    detail: str = ""


class ServiceEvent(Message, frozen=True, kw_only=True):
    """A supervisor saw one of its processes exit and started it again (``cadre up``'s supervisor)."""

    name: str  # the process: a service, an agent, nats-server or weed
    kind: Literal["restarted"]
    at: float
    pid: int  # the new process
    restarts: int  # how many times this supervisor restarted it
    detail: str = ""  # how the old one ended, when known


# --- nodes and scheduling ---------------------------------------------------------------------------------
class GpuInfo(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    name: str = "declared"
    memory_bytes: int = 0


class NodeAdvert(Message, frozen=True, kw_only=True):
    node_id: str
    compute_target: str
    hostname: str
    address: str = "127.0.0.1"  # where ranks on other nodes reach this one (MASTER_ADDR, the PMI server)
    cpus: int
    memory_bytes: int
    gpus: list[GpuInfo] = []
    slots: int  # processes it runs at once
    runtime: Literal["process", "docker"] = "process"
    host_id: str = ""  # the host's boot id: agents that share a host (and so its MPI transports) can tell
    started_at: float
    heartbeat_at: float
    heartbeat_interval: float

    def alive(self, now: float, missed: float = 3) -> bool:
        """A node that missed ``missed`` heartbeats in a row is gone."""
        return now - self.heartbeat_at <= missed * self.heartbeat_interval


class ComputeTargetInfo(Message, frozen=True, kw_only=True):
    name: str
    first_seen_at: float


class Assignment(Message, frozen=True, kw_only=True):
    run_id: str
    node_id: str
    attempt: int = 1
    spec: RunSpec
    placement: list[RankSlot]  # the whole rank map; the agent starts the ranks whose node_id is its own
    hosts: dict[str, str] = {}  # node id -> host id, for the nodes of the placement (agents sharing a machine)


# --- logs --------------------------------------------------------------------------------------------------
class LogLine(msgspec.Struct, frozen=True, array_like=True):
    t: float
    stream: Literal["o", "e", "p"]  # stdout, stderr, or the node preparing the run (environment build, checkpoint)
    text: str


class LogBatch(Message, frozen=True, kw_only=True):
    run_id: str
    rank: int
    node_id: str
    first_line: int  # 0-based number of the first line in this batch, per rank
    lines: list[LogLine]
    # A retried run numbers on across attempts; a batch of an attempt older than one already read on the subject
    # (a stalled node's late lines) is dropped by every reader.
    attempt: int = 1


# --- request / reply -----------------------------------------------------------------------------------------
T = TypeVar("T")


class Reply(msgspec.Struct, Generic[T], frozen=True, kw_only=True, omit_defaults=True):
    ok: T | None = None
    error: ErrorInfo | None = None


class Empty(Message, frozen=True, kw_only=True):
    pass


class Ping(Message, frozen=True, kw_only=True):
    service: str
    instance: str


class SnapshotPrepareRequest(Message, frozen=True, kw_only=True):
    snapshot: SnapshotRef


class SnapshotPrepareReply(Message, frozen=True, kw_only=True):
    exists: bool
    upload_url: str | None = None


class SubmitRequest(Message, frozen=True, kw_only=True):
    spec: RunSpec
    registry_password: str | None = None  # stored apart from the run (secrets bucket), never in its record
    parent: SweepTrial | None = None  # a sweep's child: its run id is the sweep's and the trial's (idempotent)


class RunCancelRequest(Message, frozen=True, kw_only=True):
    run_id: str
    error: ErrorInfo | None = None  # why (a sweep's policy); none for a person's cancel (cause "canceled")


class RegistryCredentialRequest(Message, frozen=True, kw_only=True):
    run_id: str


class RunBusCredentials(Message, frozen=True, kw_only=True):
    """A creds file for one run on one node: it may write that run's events, logs and metrics and nothing else
    (on a bus that trusts an operator; the submitter signs it with the account's run-signing key)."""

    creds: str = msgspec.field(default="")

    def __repr__(self) -> str:
        return "RunBusCredentials(creds=<secret>)"


class SubmitReply(Message, frozen=True, kw_only=True):
    run_id: str
    state: RunState


class RunRef(Message, frozen=True, kw_only=True):
    run_id: str


class AttemptInfo(msgspec.Struct, frozen=True, kw_only=True):
    attempt: int
    cause: str
    message: str
    nodes: list[str]
    ended_at: float


class StateChange(msgspec.Struct, frozen=True, kw_only=True):
    state: RunState
    at: float
    kind: str


class RunDetails(Message, frozen=True, kw_only=True):
    run_id: str
    experiment: str
    state: RunState
    spec: RunSpec
    submitted_at: float
    started_at: float | None = None
    ended_at: float | None = None
    queue_reason: str | None = None
    placement: list[RankSlot] = []
    exit_codes: dict[int, int] = {}
    log_lines: dict[int, int] = {}
    error: ErrorInfo | None = None
    history: list[StateChange] = []
    attempt: int = 1
    attempts: list[AttemptInfo] = []  # the attempts that failed and were retried, oldest first
    parent: SweepTrial | None = None
    warnings: list[str] = []


class RunSummary(Message, frozen=True, kw_only=True):
    run_id: str
    experiment: str
    state: RunState
    at: float
    submitted_at: float = 0.0  # in listings (a run's duration, once it ended: at - submitted_at)


class RunListRequest(Message, frozen=True, kw_only=True):
    experiment: str | None = None
    limit: int = 100


class RunList(Message, frozen=True, kw_only=True):
    runs: list[RunSummary]


class FilesListRequest(Message, frozen=True, kw_only=True):
    run_id: str
    prefix: str = ""


class FilesList(Message, frozen=True, kw_only=True):
    files: list[FileEntry]
    partial: bool = False  # the run did not succeed: these are the files it got to write


class FileUrlRequest(Message, frozen=True, kw_only=True):
    run_id: str
    name: str


class FileUrl(Message, frozen=True, kw_only=True):
    url: str
    size: int
    md5: str
    sha256: str = ""  # from the run's manifest, once committed


class UploadUrlsRequest(Message, frozen=True, kw_only=True):
    run_id: str
    node_id: str
    files: list[FileEntry]
    allow_multipart: bool = True  # live syncs of logs/ ask for single PUTs only


class MultipartUpload(msgspec.Struct, frozen=True, kw_only=True):
    """A large file goes up in parts, in parallel, each retried on its own."""

    upload_id: str
    part_size: int
    urls: list[str]  # part 1, 2, ...


class MultipartDone(msgspec.Struct, frozen=True, kw_only=True):
    upload_id: str
    etags: list[tuple[int, str]]  # (part number, ETag)


class UploadUrls(Message, frozen=True, kw_only=True):
    urls: dict[str, str]  # single PUT
    multipart: dict[str, MultipartUpload] = {}


class CommitRequest(Message, frozen=True, kw_only=True):
    run_id: str
    node_id: str
    attempt: int = 1
    files: list[FileEntry]
    error: ErrorInfo | None = None  # the node could not upload everything
    parts: dict[str, MultipartDone] = {}  # multipart uploads to complete
    # Small files sent whole with the commit (their entries are in ``files``): no presigned round trip for them.
    inline: dict[str, bytes] = {}


class SnapshotUrl(Message, frozen=True, kw_only=True):
    url: str
    snapshot: SnapshotRef
    checkpoint: dict[str, str] = {}  # a retried run: its checkpoint files (name -> URL) to restore first


class Lineage(msgspec.Struct, frozen=True, kw_only=True):
    """Where a model version came from."""

    run_id: str | None = None
    experiment: str | None = None
    git: GitInfo | None = None
    datasets: list[str] = []  # "name:version" of the datasets the run read
    environment: dict[str, str] = {}  # compute target, runtime, image, packages of the run


class ModelVersion(Message, frozen=True, kw_only=True):
    name: str
    version: int
    source_path: str  # the run path (file or folder) or local path it was registered from
    files: list[FileEntry]  # paths relative to the model, with their digests
    registered_at: float
    registered_by: str = ""
    lineage: Lineage = Lineage()
    tags: dict[str, str] = {}  # may change
    properties: dict[str, str] = {}  # keys may be added, never changed
    description: str | None = None
    archived: bool = False
    aliases: list[str] = []  # filled in on reads; aliases are stored separately

    @property
    def run_id(self) -> str | None:
        return self.lineage.run_id


class ModelRegisterRequest(Message, frozen=True, kw_only=True):
    """From a run (``run_id`` + ``model_path``) or from uploaded local files (``files`` + ``upload_id``)."""

    model_name: str
    run_id: str | None = None
    model_path: str | None = None  # None with a run: the run's whole outputs/
    files: list[FileEntry] = []
    tags: dict[str, str] = {}
    properties: dict[str, str] = {}
    description: str | None = None
    registered_by: str = ""


class ModelUploadRequest(Message, frozen=True, kw_only=True):
    model_name: str
    files: list[FileEntry]


class ModelRef(Message, frozen=True, kw_only=True):
    name: str
    version: int | None = None  # None (and no alias): the latest version that is not archived
    alias: str | None = None


class ModelUpdateRequest(Message, frozen=True, kw_only=True):
    name: str
    version: int
    add_tags: dict[str, str] = {}
    remove_tags: list[str] = []
    add_properties: dict[str, str] = {}
    description: str | None = None
    archived: bool | None = None


class AliasRequest(Message, frozen=True, kw_only=True):
    name: str
    alias: str
    version: int
    by: str = ""


class ModelListRequest(Message, frozen=True, kw_only=True):
    name: str | None = None
    tags: dict[str, str] = {}
    properties: dict[str, str] = {}
    include_archived: bool = False


class ModelList(Message, frozen=True, kw_only=True):
    models: list[ModelVersion]


class ModelFiles(Message, frozen=True, kw_only=True):
    """Presigned URLs: for downloading a version's files, or for uploading local files before registering."""

    urls: dict[str, str]


class ModelEventBase(Message, frozen=True, kw_only=True, tag_field="kind"):
    name: str
    version: int
    at: float
    by: str = ""


class VersionRegistered(ModelEventBase, frozen=True, kw_only=True, tag="registered"):
    model: ModelVersion


class VersionUpdated(ModelEventBase, frozen=True, kw_only=True, tag="updated"):
    tags: dict[str, str]
    properties: dict[str, str]
    description: str | None = None
    archived: bool = False


class AliasMoved(ModelEventBase, frozen=True, kw_only=True, tag="alias_moved"):
    alias: str
    previous_version: int | None = None


class VersionDeleted(ModelEventBase, frozen=True, kw_only=True, tag="deleted"):
    pass


ModelEvent = VersionRegistered | VersionUpdated | AliasMoved | VersionDeleted


class NodeStatus(msgspec.Struct, frozen=True, kw_only=True):
    advert: NodeAdvert
    state: Literal["Ready", "NotResponding", "Lost"]
    used_slots: int
    used_gpus: list[int]
    runs: list[str]
    lost_in: float | None = None  # NotResponding: seconds of grace left before the node is lost


class QueuedRun(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    experiment: str
    compute_target: str
    position: int
    reason: str
    queued_at: float


STATE_PAGE_NODES = 200  # a node's status with its GPUs is ~1-2 kB: a page stays far below NATS' 1 MB payload
STATE_PAGE_QUEUE = 1000


class SchedulerStateRequest(Message, frozen=True, kw_only=True):
    """One page of the scheduler's state: nodes by id after ``nodes_after``, the queue from ``queue_offset``
    (``{}`` asks for the first page of each). :func:`shared.bus.scheduler_state` reads every page."""

    nodes_after: str = ""
    queue_offset: int = 0
    node_limit: int = STATE_PAGE_NODES
    queue_limit: int = STATE_PAGE_QUEUE


class SchedulerState(Message, frozen=True, kw_only=True):
    nodes: list[NodeStatus]
    queue: list[QueuedRun]
    more_nodes: bool = False  # another page of nodes follows (ask again with nodes_after = the last node's id)
    more_queue: bool = False  # likewise for the queue (queue_offset = how many were read)


class TargetList(Message, frozen=True, kw_only=True):
    targets: list[ComputeTargetInfo]
    nodes: list[NodeAdvert]


# --- sweeps (CADRE_SWEEPS) -----------------------------------------------------------------------------------
class ParameterExpression(msgspec.Struct, frozen=True, kw_only=True):
    """One hyperparameter's distribution, Azure ML HyperDrive's names: ``choice`` (args: the options),
    ``randint`` (upper), ``uniform``/``loguniform`` (low, high), ``quniform``/``qloguniform`` (low, high, q),
    ``normal``/``lognormal`` (mu, sigma), ``qnormal``/``qlognormal`` (mu, sigma, q). Checked in shared.sweeps."""

    kind: str
    args: list[ScalarParam] = []


class TerminationPolicy(msgspec.Struct, frozen=True, kw_only=True):
    kind: Literal["none", "bandit", "median", "truncation"] = "none"
    evaluation_interval: int = 1
    delay_evaluation: int = 0
    slack_factor: float | None = None  # bandit
    slack_amount: float | None = None  # bandit
    truncation_percentage: int | None = None  # truncation


class SweepSpec(msgspec.Struct, frozen=True, kw_only=True):
    experiment: str
    run: RunSpec  # every child's, before its sampled values are added to its arguments
    sampling: Literal["random", "grid", "bayesian"]
    parameter_space: dict[str, ParameterExpression]
    seed: int | None = None
    primary_metric_name: str
    primary_metric_goal: Literal["maximize", "minimize"]
    max_total_runs: int
    max_concurrent_runs: int
    max_duration_minutes: float = 10080.0
    policy: TerminationPolicy = TerminationPolicy()


class SweepEventBase(Message, frozen=True, kw_only=True, tag_field="kind"):
    sweep_id: str
    at: float


class SweepSubmitted(SweepEventBase, frozen=True, kw_only=True, tag="submitted"):
    spec: SweepSpec


class ChildCreated(SweepEventBase, frozen=True, kw_only=True, tag="child_created"):
    trial: int
    run_id: str
    params: dict[str, ScalarParam]


class ChildTerminated(SweepEventBase, frozen=True, kw_only=True, tag="child_terminated"):
    """The early termination policy stopped a child (written before the child is canceled)."""

    trial: int
    run_id: str
    reason: str


class ChildEnded(SweepEventBase, frozen=True, kw_only=True, tag="child_ended"):
    trial: int
    run_id: str
    state: RunState
    value: float | None = None  # its best primary metric (by the goal); None: never logged
    reports: int = 0  # how many primary metric values it logged


class SweepCancelRequested(SweepEventBase, frozen=True, kw_only=True, tag="cancel_requested"):
    pass


class SweepEnded(SweepEventBase, frozen=True, kw_only=True, tag="ended"):
    state: Literal["Completed", "Canceled", "Failed"]
    reason: str = ""
    error: ErrorInfo | None = None


SweepEvent = SweepSubmitted | ChildCreated | ChildTerminated | ChildEnded | SweepCancelRequested | SweepEnded


class SweepSubmitRequest(Message, frozen=True, kw_only=True):
    spec: SweepSpec


class SweepRef(Message, frozen=True, kw_only=True):
    sweep_id: str


class SweepChild(msgspec.Struct, frozen=True, kw_only=True):
    trial: int
    run_id: str
    params: dict[str, ScalarParam]
    state: str = "Submitted"  # a run state once it ended; "Submitted" before (its own details say more)
    value: float | None = None
    reports: int = 0
    terminated: str | None = None  # the policy's reason, when it stopped the child


class SweepDetails(Message, frozen=True, kw_only=True):
    sweep_id: str
    experiment: str
    state: Literal["Running", "CancelRequested", "Completed", "Canceled", "Failed"]
    spec: SweepSpec
    submitted_at: float
    ended_at: float | None = None
    reason: str = ""
    error: ErrorInfo | None = None
    children: list[SweepChild] = []
    best_run_id: str | None = None
    best_value: float | None = None


class SweepSummary(Message, frozen=True, kw_only=True):
    sweep_id: str
    experiment: str
    state: str
    submitted_at: float
    children: int = 0
    best_value: float | None = None


class SweepListRequest(Message, frozen=True, kw_only=True):
    experiment: str | None = None
    limit: int = 100


class SweepList(Message, frozen=True, kw_only=True):
    sweeps: list[SweepSummary]


# --- codecs ---------------------------------------------------------------------------------------------------
encoder = msgspec.json.Encoder()
run_event_decoder = msgspec.json.Decoder(RunEvent)
log_batch_decoder = msgspec.json.Decoder(LogBatch)
node_decoder = msgspec.json.Decoder(NodeAdvert)
assignment_decoder = msgspec.json.Decoder(Assignment)
record_decoder = msgspec.json.Decoder(RunRecord)
model_decoder = msgspec.json.Decoder(ModelVersion)
model_event_decoder = msgspec.json.Decoder(ModelEvent)
dataset_decoder = msgspec.json.Decoder(DatasetVersion)
environment_decoder = msgspec.json.Decoder(EnvironmentVersion)
run_data_decoder = msgspec.json.Decoder(RunData)
node_event_decoder = msgspec.json.Decoder(NodeEvent)
service_event_decoder = msgspec.json.Decoder(ServiceEvent)
sweep_event_decoder = msgspec.json.Decoder(SweepEvent)


def encode(msg: object) -> bytes:
    return encoder.encode(msg)


def decode(data: bytes, type_: type[T]) -> T:
    return msgspec.json.decode(data, type=type_)

"""Property-based fuzzing of every request schema against the real services (hypothesis): whatever arrives on
an API subject, garbage bytes or JSON of any shape, the reply is a typed error or a value, never "internal",
and a malformed request is ``invalid_request`` with the field named.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cadre import Estimator, Experiment, Workspace
from cadre._bridge import LoopThread
from shared import bus, schemas, subjects
from shared.settings import BusSettings

Api, AgentApi = subjects.Api, subjects.AgentApi
ENDPOINTS: list[tuple[str, type[msgspec.Struct]]] = [
    (Api.SNAPSHOT_PREPARE, schemas.SnapshotPrepareRequest), (Api.SUBMIT, schemas.SubmitRequest),
    (Api.RUN_GET, schemas.RunRef), (Api.RUN_LIST, schemas.RunListRequest), (Api.RUN_CANCEL, schemas.RunRef),
    (Api.TARGETS_LIST, schemas.Empty), (Api.RUN_TAG, schemas.RunTagRequest),
    (Api.FILES_LIST, schemas.FilesListRequest), (Api.FILE_URL, schemas.FileUrlRequest),
    (Api.MODEL_REGISTER, schemas.ModelRegisterRequest), (Api.MODEL_UPLOAD, schemas.ModelUploadRequest),
    (Api.MODEL_GET, schemas.ModelRef), (Api.MODEL_LIST, schemas.ModelListRequest),
    (Api.MODEL_UPDATE, schemas.ModelUpdateRequest), (Api.MODEL_ALIAS, schemas.AliasRequest),
    (Api.MODEL_DELETE, schemas.ModelRef), (Api.MODEL_DOWNLOAD, schemas.ModelRef),
    (Api.ENVIRONMENT_REGISTER, schemas.EnvironmentRegisterRequest), (Api.ENVIRONMENT_GET, schemas.EnvironmentRef),
    (Api.ENVIRONMENT_LIST, schemas.Empty), (Api.DATASET_UPLOAD, schemas.DatasetUploadRequest),
    (Api.DATASET_REGISTER, schemas.DatasetRegisterRequest), (Api.DATASET_GET, schemas.DatasetRef),
    (Api.DATASET_LIST, schemas.Empty), (Api.SCHEDULER_STATE, schemas.SchedulerStateRequest),
    (subjects.of_node(AgentApi.DATASET_URLS, "agent-0"), schemas.DatasetUrlsRequest),
    (subjects.of_node(AgentApi.SNAPSHOT_URL, "agent-0"), schemas.RunRef),
    (subjects.of_node(AgentApi.UPLOAD_URLS, "agent-0"), schemas.UploadUrlsRequest),
    (subjects.of_node(AgentApi.COMMIT, "agent-0"), schemas.CommitRequest),
    (subjects.agent_registry_credential("agent-0"), schemas.RegistryCredentialRequest),
]  # fmt: skip

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
RUN_LIKE = st.sampled_from(["", "x", "../../etc", "nope_1_abc", "a" * 300, "run.*.>", "ok_1_2"])


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes]:
    subject, schema = draw(st.sampled_from(ENDPOINTS))
    shape = draw(st.integers(0, 2))
    if shape == 0:  # not JSON at all, or not an object
        return subject, draw(st.binary(max_size=64) | st.sampled_from([b"", b"null", b"[]", b"42", b'"x"']))
    fields = [f.encode_name for f in msgspec.structs.fields(schema)]
    keys = st.sampled_from(fields) if fields else st.text(max_size=8)
    values = RUN_LIKE | json_values if shape == 1 else json_values
    body = draw(st.dictionaries(keys | st.text(max_size=8), values, max_size=len(fields) + 2))
    return subject, json.dumps(body).encode()


@pytest.fixture(scope="module")
def service_bus(cluster_home: Path) -> Iterator[tuple[LoopThread, object]]:
    """A connection with a service's credentials: it may call the agent-only subjects too."""
    env = json.loads((cluster_home / "cluster" / "process-env.json").read_text())["submitter"]
    settings_ = BusSettings(url=env["CADRE_NATS_URL"], user="submitter", password=env["CADRE_NATS_PASSWORD"])
    loop = LoopThread()
    nc = loop.call(bus.connect(settings_))
    try:
        yield loop, nc
    finally:
        loop.call(nc.close())
        loop.stop()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests())
def test_no_request_gets_an_internal_error(service_bus: tuple[LoopThread, object], request: tuple[str, bytes]) -> None:
    loop, nc = service_bus
    subject, payload = request
    msg = loop.call(nc.request(subject, payload, timeout=10))  # type: ignore[attr-defined]
    error = json.loads(msg.data).get("error")
    if error is not None:
        assert error["code"] != "internal", (subject, payload, error["message"])
        if error["code"] == "invalid_request":
            assert subject in error["message"]


def test_a_wrong_field_is_named(service_bus: tuple[LoopThread, object]) -> None:
    loop, nc = service_bus
    msg = loop.call(nc.request(Api.RUN_GET, b'{"run_id": 7}', timeout=10))  # type: ignore[attr-defined]
    error = json.loads(msg.data)["error"]
    assert error["code"] == "invalid_request" and "$.run_id" in error["message"], error
    msg = loop.call(nc.request(Api.SUBMIT, b"{not json", timeout=10))  # type: ignore[attr-defined]
    error = json.loads(msg.data)["error"]
    assert error["code"] == "invalid_request" and "not a JSON object" in error["message"], error


def test_files_sent_whole_with_a_commit_are_checked_and_never_rewrite_an_ended_run(
    service_bus: tuple[LoopThread, object], ws: Workspace, make_project: Callable[..., Path], tmp_path: Path
) -> None:
    from shared import files

    loop, nc = service_bus
    est = Estimator(source_directory=make_project(**{"w.py": "open('outputs/w.txt', 'w').write('real')"}),
                    entry_script="w.py")  # fmt: skip
    run = Experiment(ws, "inline").submit(est)
    assert run.wait_for_completion(timeout=60)["status"] == "Completed"
    assert run.download_file("outputs/w.txt", tmp_path / "a").read_text() == "real"  # sent whole: it is small
    node = run.get_details()["placement"][0]["node_id"]

    def commit(entry: schemas.FileEntry, body: bytes) -> dict:
        req = schemas.CommitRequest(run_id=run.id, node_id=node, files=[entry], inline={entry.name: body})
        subject = subjects.of_node(AgentApi.COMMIT, node)
        msg = loop.call(nc.request(subject, schemas.encode(req), timeout=10))  # type: ignore[attr-defined]
        return json.loads(msg.data)

    # Content that is not what its entry says is refused, naming the file.
    said = commit(files.digest_bytes("outputs/w.txt", b"fake"), b"other")
    assert said["error"]["code"] == "invalid" and "outputs/w.txt" in said["error"]["message"], said
    # A commit for a run that has ended (a retried commit, or a node out of its time) stores nothing.
    said = commit(files.digest_bytes("outputs/w.txt", b"late"), b"late")
    assert said.get("error") is None and said["ok"]["state"] == "Completed", said
    assert run.download_file("outputs/w.txt", tmp_path / "b").read_text() == "real"

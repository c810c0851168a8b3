"""Per-role bus permissions. The local cluster and the deploy config render these into nats-server users.

Roles: ``service`` (the five services), ``agent`` (one user per node: it may only publish as itself),
``client`` (submit and follow runs; no write access to streams, KV or other nodes' subjects) and ``supervisor``
(``cadre up``'s restarter: it may only report restarts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from shared import subjects as s

JS = "$JS.API"


@dataclass(frozen=True)
class Permissions:
    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)


def service_permissions() -> Permissions:
    # Services own the topology (streams, consumers, KV); they get the whole account.
    return Permissions(publish=[">"], subscribe=[">"])


def _read_stream(stream: str) -> list[str]:
    """What an ordered consumer needs to replay a stream (create, info, delete its own consumer, flow control)."""
    return [
        f"{JS}.STREAM.INFO.{stream}",
        f"{JS}.STREAM.MSG.GET.{stream}",
        f"{JS}.DIRECT.GET.{stream}",
        f"{JS}.DIRECT.GET.{stream}.>",
        f"{JS}.CONSUMER.CREATE.{stream}",
        f"{JS}.CONSUMER.CREATE.{stream}.>",
        f"{JS}.CONSUMER.INFO.{stream}.>",
        f"{JS}.CONSUMER.DELETE.{stream}.>",
    ]


def client_permissions() -> Permissions:
    return Permissions(
        publish=[
            f"{s.PREFIX}.api.>",
            "$JS.FC.>",
            f"{JS}.INFO",
            *_read_stream(s.EVENTS_STREAM),
            *_read_stream(s.LOGS_STREAM),
            *_read_stream(s.MODELS_STREAM),
            *_read_stream(s.METRICS_STREAM),
            *_read_stream(s.NODES_STREAM),
            *_read_stream(s.SERVICES_STREAM),
            *_read_stream(s.SWEEPS_STREAM),
        ],
        subscribe=["_INBOX.>"],
    )


def supervisor_permissions() -> Permissions:
    """``cadre up``'s supervisor: it only reports the restarts it makes (and hears JetStream's acks)."""
    return Permissions(publish=[s.all_service_events()], subscribe=["_INBOX.>"])


def agent_permissions(node_id: str, run_writes: bool = True) -> Permissions:
    """A node agent's own user. ``run_writes=False`` (a bus that trusts an operator): it writes no run's events,
    logs or metrics itself; each run it is given comes with credentials for that run alone (:func:`run_permissions`)."""
    consumer = s.agent_consumer(node_id)
    kv_nodes = f"KV_{s.NODES_BUCKET}"
    kv_targets = f"KV_{s.TARGETS_BUCKET}"
    runs = [s.all_run_events(), s.all_run_logs(), s.all_run_metrics()] if run_writes else []
    return Permissions(
        publish=[
            *(s.of_node(api, node_id) for api in s.AgentApi.ALL),  # as itself: the service reads the node off it
            s.agent_registry_credential(node_id),  # its own only: a registry password is for the node that pulls
            s.agent_run_bus(node_id),  # likewise: the credentials of its own runs
            *runs,
            f"$KV.{s.NODES_BUCKET}.{node_id}",
            f"$KV.{s.TARGETS_BUCKET}.>",
            "$JS.FC.>",
            f"$JS.ACK.{s.ASSIGNMENTS_STREAM}.{consumer}.>",
            f"{JS}.INFO",
            f"{JS}.STREAM.INFO.{kv_nodes}",
            f"{JS}.STREAM.MSG.GET.{kv_nodes}",  # whether its name is taken (adverts are no secret: nodes lists them)
            f"{JS}.STREAM.INFO.{kv_targets}",
            f"{JS}.DIRECT.GET.{kv_targets}.>",
            f"{JS}.STREAM.MSG.GET.{kv_targets}",
            f"{JS}.STREAM.INFO.{s.ASSIGNMENTS_STREAM}",
            f"{JS}.STREAM.MSG.GET.{s.LOGS_STREAM}",  # where a rank's shipped lines stand, for a restarted agent
            f"{JS}.CONSUMER.INFO.{s.ASSIGNMENTS_STREAM}.{consumer}",
            f"{JS}.CONSUMER.CREATE.{s.ASSIGNMENTS_STREAM}.{consumer}",
            f"{JS}.CONSUMER.CREATE.{s.ASSIGNMENTS_STREAM}.{consumer}.>",
            f"{JS}.CONSUMER.DURABLE.CREATE.{s.ASSIGNMENTS_STREAM}.{consumer}",
            f"{JS}.CONSUMER.MSG.NEXT.{s.ASSIGNMENTS_STREAM}.{consumer}",
            *_read_stream(s.EVENTS_STREAM),
        ],
        subscribe=["_INBOX.>", s.all_run_events()],
    )


def run_permissions(run_id: str, node_id: str) -> Permissions:
    """What one node may do for one run it was given: write that run's events, logs and metrics, ask for its
    files and registry credential as itself, and read what it needs of the event and log streams."""
    return Permissions(
        publish=[
            s.run_events(run_id),
            s.run_logs_all_ranks(run_id),
            s.run_metrics(run_id),
            *(s.of_node(api, node_id) for api in s.AgentApi.ALL),
            s.agent_registry_credential(node_id),
            "$JS.FC.>",
            f"{JS}.INFO",
            f"{JS}.STREAM.MSG.GET.{s.LOGS_STREAM}",
            *_read_stream(s.EVENTS_STREAM),
        ],
        subscribe=["_INBOX.>", s.run_events(run_id)],
    )


@dataclass(frozen=True)
class Cluster:
    """A server's part of a NATS cluster: routes authenticate with their own user, never anonymously."""

    name: str
    listen: str  # host:port of this server's route listener
    routes: list[str]  # host:port of every server's route listener (its own included: nats-server skips it)
    user: str
    password: str = field(repr=False)

    def render(self) -> list[str]:
        q = json.dumps
        routes = ", ".join(q(f"nats-route://{self.user}:{self.password}@{r}") for r in self.routes)
        return [
            "cluster {",
            f"  name: {q(self.name)}",
            f"  listen: {q(self.listen)}",
            f"  authorization {{ user: {q(self.user)}, password: {q(self.password)} }}",
            f"  routes: [{routes}]",
            "}",
        ]


def render_nats_config(
    users: list[tuple[str, str, Permissions]],
    *,
    listen: str,
    http: str,
    store_dir: str,
    server_name: str,
    header: str,
    cluster: Cluster | None = None,
    trust: list[str] | None = None,
) -> str:
    """A nats-server config with JetStream and one user per (name, password, permissions); no anonymous access.
    ``cluster``: this server's part of a cluster (its route listener, every server's route, the route password).
    ``trust``: instead of users, the operator lines of :meth:`shared.trust.Keystore.server_config` (every user then
    comes with a JWT the operator's account signed)."""
    # Every string is JSON-quoted: subjects hold `$`, `>` and `*`, which unquoted mean variables/wildcards.
    if trust is not None and users:
        raise ValueError("a bus that trusts an operator has no password users")
    q = json.dumps

    def allow(subjects: list[str]) -> str:
        return "{allow: [" + ", ".join(q(s) for s in subjects) + "]}"

    user_lines = [
        f"    {{user: {q(name)}, password: {q(password)}, "
        f"permissions: {{publish: {allow(perms.publish)}, subscribe: {allow(perms.subscribe)}}}}}"
        for name, password, perms in users
    ]
    return "\n".join(
        [
            f"# {header}",
            f"server_name: {q(server_name)}",
            f"listen: {q(listen)}",
            f"http: {q(http)}",
            "jetstream {",
            f"  store_dir: {q(store_dir)}",
            "}",
            *(cluster.render() if cluster else []),
            *(trust if trust is not None else ["authorization {", "  users = [", *user_lines, "  ]", "}"]),
            "",
        ]
    )

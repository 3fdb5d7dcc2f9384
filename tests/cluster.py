"""A real Redis Cluster (or Valkey cluster) of private server processes for one test.

`ServerCluster` starts `primaries * (1 + replicas_per_primary)` nodes, each a
`tests.servers.RedisServer` in its own dir with `cluster-enabled yes`, and builds the
cluster itself over the protocol (CLUSTER ADDSLOTSRANGE, SET-CONFIG-EPOCH, MEET,
REPLICATE) instead of `redis-cli --cluster create`: that needs no cluster tool for
start-up (there is no valkey-cli here, only Debian's redis-cli 7.0), and it waits on
conditions instead of redis-cli's fixed one-second polls. Resharding does use
`redis-cli --cluster reshard`, the operator's tool, which works against Valkey 9 too.

Node configuration, the same on every node so a replica promoted by a failover
serves exactly like the primary it replaces (keyspace events included):

- `cluster-node-timeout` (default 1000 ms): how long a silent node takes to be
  marked failed; an automatic failover (`kill_primary`) takes about two of these.
- `cluster-require-full-coverage no`: while a killed primary's slots are not yet
  taken over, the other primaries keep serving theirs, as a production cluster
  configured for availability does; a test sees errors only for the lost slots.
- `cluster-allow-replica-migration no`: nodes change role only through `failover`
  and `kill_primary`, never because a reshard took a primary's last slot away.
- `cluster-replica-validity-factor 0`: a replica may always be promoted, however
  long it was out of touch (tests restart and kill nodes at will).
- `repl-diskless-sync-delay 0`: a replica syncs at once instead of after 5 s.
- `shutdown-timeout 0`: stop() does not wait for lagging replicas (up to 10 s each).
- `cluster-port` picked free explicitly: the default bus port, port + 10000, may be
  taken or above 65535 for a port the OS picked.

Every wait has a deadline (`tests.servers.wait_for`); `stop()` stops every node, the
clients and any reshard still running, even when some nodes are already dead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from tests.servers import (
    HOST,
    RedisServer,
    ServerBinaryMissing,
    ServerKind,
    free_port,
    log_tail,
    no_retry,
    wait_for,
)

SLOTS = 16384
# Long enough for an automatic failover on a loaded 2-core CI machine.
WAIT_TIMEOUT_S = 30.0
RESHARD_TIMEOUT_S = 120.0
NODE_START_ATTEMPTS = 3


def redis_cli_binary() -> str:
    """The redis-cli for `--cluster reshard`: $DELAYQ_TEST_REDIS_CLI, else PATH (Debian's
    redis-tools, which redis-server depends on)."""
    configured = os.environ.get("DELAYQ_TEST_REDIS_CLI")
    if configured:
        return configured
    found = shutil.which("redis-cli")
    if found is None:
        raise ServerBinaryMissing(
            "redis-cli not found on PATH and DELAYQ_TEST_REDIS_CLI is not set "
            "(it comes with redis-server: run scripts/bootstrap.sh)"
        )
    return found


class ClusterServer(RedisServer):
    """A RedisServer with the cluster options, its own bus port, and its node id."""

    def __init__(
        self,
        dir: Path,
        *,
        kind: ServerKind,
        node_timeout_ms: int,
        appendonly: bool,
        notify: str,
        extra: dict[str, str] | None,
    ) -> None:
        self.bus_port = free_port()
        options = {
            "cluster-enabled": "yes",
            "cluster-node-timeout": str(node_timeout_ms),
            "cluster-require-full-coverage": "no",
            "cluster-allow-replica-migration": "no",
            "cluster-replica-validity-factor": "0",
            "repl-diskless-sync-delay": "0",
            "shutdown-timeout": "0",
            "cluster-port": str(self.bus_port),
            **(extra or {}),
        }
        super().__init__(dir, kind=kind, appendonly=appendonly, notify=notify, extra=options)
        # Fixed once: restart() keeps the port, so the node reloads its own config.
        self._extra["cluster-config-file"] = f"nodes-{self.port}.conf"
        self._node_id: str | None = None

    @property
    def node_id(self) -> str:
        """The node's cluster id (CLUSTER MYID), kept across restarts in its nodes.conf."""
        if self._node_id is None:
            admin = self.admin()
            with contextlib.closing(admin):
                self._node_id = str(admin.execute_command("CLUSTER", "MYID"))
        return self._node_id

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def admin(self, socket_timeout: float = 5.0) -> redis.Redis:
        """A short-lived decoded client the caller closes (not tracked by stop())."""
        return redis.Redis(
            host=HOST,
            port=self.port,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=socket_timeout,
            retry=no_retry(),
        )

    def __repr__(self) -> str:
        state = "alive" if self.alive else "stopped"
        return f"<ClusterServer {self.kind} {self.address} {state} id={self._node_id}>"


@dataclass(frozen=True)
class NodeView:
    """One line of CLUSTER NODES: what one node believes about another."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    connected: bool
    slots: frozenset[int]
    # Slots this node is migrating or importing (only shown by the node itself).
    migrating: bool

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return "fail" in self.flags or "fail?" in self.flags


def parse_cluster_nodes(text: str) -> dict[str, NodeView]:
    """CLUSTER NODES output by node id."""
    views: dict[str, NodeView] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        node_id, address, flags, master = fields[:4]
        host_port = address.split("@", 1)[0]
        # ":0" for a node whose address is not known yet.
        port_text = host_port.rsplit(":", 1)[-1]
        port = int(port_text) if port_text.isdigit() else 0
        slots: set[int] = set()
        migrating = False
        for item in fields[8:]:
            if item.startswith("["):
                migrating = True
            elif "-" in item:
                first, last = item.split("-")
                slots.update(range(int(first), int(last) + 1))
            else:
                slots.add(int(item))
        views[node_id] = NodeView(
            node_id=node_id,
            port=port,
            flags=frozenset(flags.split(",")),
            master_id=None if master == "-" else master,
            connected=fields[7] == "connected",
            slots=frozenset(slots),
            migrating=migrating,
        )
    return views


# prefix -> {slot: the first key f"{prefix}{n}" found in it}, and the next n to try.
_SLOT_KEYS: dict[str, dict[int, str]] = {}
_NEXT_INDEX: dict[str, int] = {}


def keys_in_slots(slots: Iterable[int], prefix: str = "key:") -> dict[int, str]:
    """A key named f"{prefix}{n}" in each of `slots` (the same one every time), for
    tests that need data in particular slots or on a particular node."""
    wanted = set(slots)
    if not wanted <= set(range(SLOTS)):
        raise ValueError("slots are 0..16383")
    found = _SLOT_KEYS.setdefault(prefix, {})
    index = _NEXT_INDEX.get(prefix, 0)
    while not wanted <= found.keys():
        key = f"{prefix}{index}"
        found.setdefault(int(key_slot(key.encode())), key)
        index += 1
    _NEXT_INDEX[prefix] = index
    return {slot: found[slot] for slot in sorted(wanted)}


def _info_text_to_dict(text: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


class ServerCluster:
    """A started-on-demand cluster of private redis-server or valkey-server nodes.

    `primaries` primaries own the 16384 slots in equal ranges (the first owns slot
    0), each with `replicas_per_primary` replicas. Every query of the topology asks
    the live nodes, so after a failover `primaries()` names the promoted replica.
    """

    def __init__(
        self,
        dir: Path,
        *,
        kind: ServerKind = "redis",
        primaries: int = 3,
        replicas_per_primary: int = 1,
        node_timeout_ms: int = 1000,
        appendonly: bool = False,
        notify: str = "Egx",
        extra: dict[str, str] | None = None,
    ) -> None:
        if primaries < 1:
            raise ValueError("a cluster needs at least one primary")
        if replicas_per_primary < 0:
            raise ValueError("replicas_per_primary must be >= 0")
        self.kind: ServerKind = kind
        self.dir = Path(dir).resolve()
        self.node_timeout_ms = node_timeout_ms
        self._primaries_at_start = primaries
        self._replicas_per_primary = replicas_per_primary
        self._appendonly = appendonly
        self._notify = notify
        self._extra = dict(extra or {})
        self.nodes: list[ClusterServer] = []
        self._seeds: list[ClusterServer] = []
        self._clients: list[RedisCluster] = []
        self._reshards: dict[subprocess.Popen[bytes], Path] = {}
        self._log_count = 0

    # --- start and stop ---------------------------------------------------------

    def start(self) -> ServerCluster:
        """Start every node, assign slots, join them, attach replicas; wait until ok."""
        if self.nodes:
            raise RuntimeError("this ServerCluster was started already")
        self.dir.mkdir(parents=True, exist_ok=True)
        primaries = [self._start_node() for _ in range(self._primaries_at_start)]
        self._seeds = list(primaries)
        replicas = [
            [self._start_node() for _ in range(self._replicas_per_primary)] for _ in primaries
        ]
        count = len(primaries)
        for index, primary in enumerate(primaries):
            first, last = index * SLOTS // count, (index + 1) * SLOTS // count - 1
            with contextlib.closing(primary.admin()) as admin:
                admin.execute_command("CLUSTER ADDSLOTSRANGE", first, last)
                # Distinct epochs up front, as redis-cli does: no collisions to resolve.
                admin.execute_command("CLUSTER SET-CONFIG-EPOCH", index + 1)
        self._meet_all(self.nodes)
        for primary, own in zip(primaries, replicas, strict=True):
            for replica in own:
                with contextlib.closing(replica.admin()) as admin:
                    admin.execute_command("CLUSTER REPLICATE", primary.node_id)
        self.wait_ok()
        return self

    def _start_node(self) -> ClusterServer:
        """A new started node; a bus port taken meanwhile is re-picked with a new node."""
        for attempt in range(NODE_START_ATTEMPTS):
            node = ClusterServer(
                self.dir / f"node-{len(self.nodes)}",
                kind=self.kind,
                node_timeout_ms=self.node_timeout_ms,
                appendonly=self._appendonly,
                notify=self._notify,
                extra=self._extra,
            )
            # Registered before start() so a half-started node is still stopped.
            self.nodes.append(node)
            try:
                node.start()
                return node
            except RuntimeError:
                node.stop()
                self.nodes.remove(node)
                shutil.rmtree(node.dir, ignore_errors=True)
                if attempt == NODE_START_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _meet_all(self, nodes: Iterable[ClusterServer]) -> None:
        """Introduce each of `nodes` to every live node directly (no waiting for gossip to
        spread them) and wait until every live node knows every other."""
        live = self._live()
        for node in nodes:
            with contextlib.closing(node.admin()) as admin:
                for other in live:
                    if other is not node:
                        admin.execute_command("CLUSTER MEET", HOST, other.port, other.bus_port)
        ids = {node.node_id for node in live}

        def everyone_knows_everyone() -> bool:
            for node in live:
                views = self._views_of(node)
                if views is None:
                    return False
                known = {v.node_id for v in views.values() if "handshake" not in v.flags}
                if not ids <= known:
                    return False
            return True

        wait_for(
            everyone_knows_everyone,
            WAIT_TIMEOUT_S,
            interval_s=0.05,
            what=f"{len(live)} cluster nodes to complete the handshake",
        )

    def stop(self) -> None:
        """Stop clients, running reshards and every node (dead ones too); idempotent."""
        clients, self._clients = self._clients, []
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()
        reshards, self._reshards = self._reshards, {}
        for proc in reshards:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        errors: list[BaseException] = []
        for node in self.nodes:
            try:
                node.stop()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> ServerCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- topology -----------------------------------------------------------------

    @property
    def url(self) -> str:
        """redis+cluster://host:port,... of the seed nodes (the primaries at start)."""
        seeds = self._seeds or self.nodes
        return "redis+cluster://" + ",".join(node.address for node in seeds)

    def _live(self) -> list[ClusterServer]:
        return [node for node in self.nodes if node.alive]

    def _by_id(self) -> dict[str, ClusterServer]:
        return {node.node_id: node for node in self.nodes if node._node_id or node.alive}

    def _views_of(self, node: ClusterServer) -> dict[str, NodeView] | None:
        """CLUSTER NODES as `node` sees it, or None if it does not answer right now."""
        try:
            with contextlib.closing(node.admin()) as admin:
                return parse_cluster_nodes(str(admin.execute_command("CLUSTER", "NODES")))
        except redis.RedisError:
            return None

    def _topology(self) -> dict[str, NodeView]:
        """CLUSTER NODES of the first live node that answers."""
        for node in self._live():
            views = self._views_of(node)
            if views is not None:
                return views
        raise RuntimeError(f"no live cluster node answers CLUSTER NODES ({self.nodes})")

    def primaries(self) -> list[ClusterServer]:
        """Live primaries per the live topology, ordered by their lowest slot (slot-less
        primaries last)."""
        views = self._topology()
        by_id = self._by_id()
        found = [
            (min(view.slots, default=SLOTS), by_id[node_id])
            for node_id, view in views.items()
            if view.is_primary and node_id in by_id and by_id[node_id].alive
        ]
        return [node for _, node in sorted(found, key=lambda pair: (pair[0], pair[1].port))]

    def replicas(self, primary: RedisServer | None = None) -> list[ClusterServer]:
        """Live replicas per the live topology (of `primary` only, if given)."""
        views = self._topology()
        by_id = self._by_id()
        master_id = None if primary is None else self._node(primary).node_id
        return [
            by_id[node_id]
            for node_id, view in views.items()
            if not view.is_primary
            and node_id in by_id
            and by_id[node_id].alive
            and (master_id is None or view.master_id == master_id)
        ]

    def node_for_slot(self, slot: int) -> ClusterServer:
        """The current primary of `slot`."""
        views = self._topology()
        by_id = self._by_id()
        for node_id, view in views.items():
            if view.is_primary and slot in view.slots:
                return by_id[node_id]
        raise LookupError(f"no primary owns slot {slot}")

    def slots_of(self, primary: RedisServer) -> frozenset[int]:
        """The slots `primary` owns per the live topology (empty for a replica)."""
        view = self._topology().get(self._node(primary).node_id)
        return frozenset() if view is None or not view.is_primary else view.slots

    def node_for_key(self, key: str | bytes) -> ClusterServer:
        """The current primary of `key`'s slot (hash tags honoured)."""
        return self.node_for_slot(self.slot_of(key))

    @staticmethod
    def slot_of(key: str | bytes) -> int:
        raw = key.encode() if isinstance(key, str) else key
        return int(key_slot(raw))

    def _node(self, server: RedisServer) -> ClusterServer:
        for node in self.nodes:
            if node is server or node.port == server.port:
                return node
        raise ValueError(f"{server!r} is not a node of this cluster")

    def client(self, **kwargs: Any) -> RedisCluster:
        """A decoded RedisCluster on the live nodes; closed by stop()."""
        options: dict[str, Any] = {"decode_responses": True, "socket_connect_timeout": 5}
        options.update(kwargs)
        startup = [ClusterNode(HOST, node.port) for node in self._live()]
        client = RedisCluster(startup_nodes=startup, **options)
        self._clients.append(client)
        return client

    def info_per_primary(self, section: str | None = None) -> dict[str, dict[str, Any]]:
        """INFO `section` of each live primary, keyed by "127.0.0.1:port"."""
        result: dict[str, dict[str, Any]] = {}
        for primary in self.primaries():
            with contextlib.closing(primary.admin()) as admin:
                info = admin.info(section) if section else admin.info()
            result[primary.address] = dict(info)
        return result

    # --- health ---------------------------------------------------------------

    def problems(self) -> list[str]:
        """Why the cluster is not settled yet; [] when it is: every live node says
        cluster_state:ok, all see the same primaries, replicas and slot owners, no slot
        is migrating, every slot is covered, every live node is connected to every
        other, and every live replica's link to its primary is up."""
        live = self._live()
        if not live:
            return ["no live node"]
        live_ids = {node.node_id for node in live}
        problems: list[str] = []
        agreed: dict[str, Any] | None = None
        for node in live:
            try:
                with contextlib.closing(node.admin()) as admin:
                    info = _info_text_to_dict(str(admin.execute_command("CLUSTER", "INFO")))
                    views = parse_cluster_nodes(str(admin.execute_command("CLUSTER", "NODES")))
                    replication = admin.info("replication")
            except redis.RedisError as exc:
                problems.append(f"{node.address}: {type(exc).__name__}: {exc}")
                continue
            if info.get("cluster_state") != "ok":
                problems.append(f"{node.address}: cluster_state:{info.get('cluster_state')}")
            topology = {
                node_id: (view.is_primary, view.master_id, view.slots, view.failed)
                for node_id, view in views.items()
                if node_id in live_ids or view.slots
            }
            if agreed is None:
                agreed = topology
            elif topology != agreed:
                problems.append(f"{node.address}: its slot map or roles differ from the first")
            covered = sum(len(v.slots) for v in views.values() if v.is_primary)
            if covered != SLOTS:
                problems.append(f"{node.address}: sees {covered} of {SLOTS} slots covered")
            for node_id in live_ids:
                view = views.get(node_id)
                if view is None:
                    problems.append(f"{node.address}: does not know node {node_id[:8]}")
                elif view.failed or "handshake" in view.flags:
                    problems.append(f"{node.address}: sees {view.port} as {','.join(view.flags)}")
                elif not view.connected and "myself" not in view.flags:
                    problems.append(f"{node.address}: not connected to {view.port}")
            if any(v.migrating for v in views.values()):
                problems.append(f"{node.address}: slots still migrating/importing")
            for view in views.values():
                if view.is_primary and view.slots and view.node_id not in live_ids:
                    problems.append(f"{node.address}: dead node {view.port} still owns slots")
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                problems.append(
                    f"{node.address}: replica link {replication.get('master_link_status')}"
                )
        return problems

    def wait_ok(self, timeout_s: float = WAIT_TIMEOUT_S) -> None:
        """Wait until problems() is empty; the assertion names what is still wrong."""
        last: list[str] = []

        def settled() -> bool:
            nonlocal last
            last = self.problems()
            return not last

        try:
            wait_for(settled, timeout_s, interval_s=0.05, what="the cluster to settle")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {'; '.join(last[:10])}") from None

    # --- failures ---------------------------------------------------------------

    def failover(self, replica: RedisServer | None = None, *, force: bool = False) -> ClusterServer:
        """CLUSTER FAILOVER [FORCE] on `replica` (default: a replica of the first
        primary); waits until it is primary and the cluster settled; returns it."""
        if replica is None:
            first = self.primaries()[0]
            own = self.replicas(first)
            if not own:
                raise ValueError(f"primary {first.address} has no live replica")
            node = own[0]
        else:
            node = self._node(replica)
        with contextlib.closing(node.admin()) as admin:
            if force:
                admin.execute_command("CLUSTER FAILOVER", "FORCE")
            else:
                admin.execute_command("CLUSTER FAILOVER")
        wait_for(
            lambda: self._role(node) == "master",
            WAIT_TIMEOUT_S,
            interval_s=0.02,
            what=f"{node.address} to be promoted",
        )
        self.wait_ok()
        return node

    def kill_primary(
        self, primary: RedisServer | None = None
    ) -> tuple[ClusterServer, ClusterServer]:
        """SIGKILL a primary (default: the first) and wait until one of its replicas was
        promoted by the automatic failover and the survivors settled.
        Returns (killed, promoted). The killed node stays dead: restart() it to have
        it rejoin as a replica of the promoted node."""
        victim = self.primaries()[0] if primary is None else self._node(primary)
        own = self.replicas(victim)
        if not own:
            raise ValueError(f"primary {victim.address} has no live replica to promote")
        victim_id = victim.node_id
        victim.kill()

        def promoted() -> ClusterServer | None:
            for node in own:
                if node.alive and self._role(node) == "master":
                    return node
            return None

        new = wait_for(
            promoted,
            WAIT_TIMEOUT_S,
            interval_s=0.05,
            what=f"a replica of killed {victim.address} ({victim_id[:8]}) to be promoted",
        )
        assert new is not None  # wait_for returns only a truthy value
        self.wait_ok()
        return victim, new

    def _role(self, node: ClusterServer) -> str | None:
        try:
            with contextlib.closing(node.admin()) as admin:
                role = admin.info("replication").get("role")
        except redis.RedisError:
            return None
        return None if role is None else str(role)

    # --- resharding -------------------------------------------------------------

    def reshard_args(
        self, slots: int, source: RedisServer | str, target: RedisServer, *, pipeline: int = 10
    ) -> list[str]:
        """The redis-cli --cluster reshard command line; `source` may be "all"."""
        entry = self._live()[0]
        source_id = source if isinstance(source, str) else self._node(source).node_id
        return [
            redis_cli_binary(),
            *("--cluster", "reshard", entry.address),
            *("--cluster-from", source_id),
            *("--cluster-to", self._node(target).node_id),
            *("--cluster-slots", str(slots)),
            *("--cluster-pipeline", str(pipeline)),
            "--cluster-yes",
        ]

    def reshard_async(
        self, slots: int, source: RedisServer | str, target: RedisServer, *, pipeline: int = 10
    ) -> subprocess.Popen[bytes]:
        """Start `redis-cli --cluster reshard` moving `slots` slots (and their keys) from
        `source` ("all" for every primary) to `target`; finish with wait_reshard()."""
        args = self.reshard_args(slots, source, target, pipeline=pipeline)
        self._log_count += 1
        log_path = self.dir / f"reshard-{self._log_count}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._reshards[proc] = log_path
        return proc

    def wait_reshard(
        self, proc: subprocess.Popen[bytes], timeout_s: float = RESHARD_TIMEOUT_S
    ) -> None:
        """Wait for a reshard_async() to finish (killed past `timeout_s`), require it to
        have succeeded, then wait until the cluster settled."""
        log_path = self._reshards.get(proc)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"redis-cli --cluster reshard still running after {timeout_s}s; log tail:\n"
                f"{log_tail(log_path) if log_path else ''}"
            ) from None
        finally:
            self._reshards.pop(proc, None)
        # redis-cli exits 0 on some errors: its log is the real verdict.
        text = log_path.read_text(errors="replace") if log_path else ""
        if code != 0 or "[ERR]" in text:
            raise AssertionError(
                f"redis-cli --cluster reshard failed (exit {code}); log tail:\n"
                f"{log_tail(log_path) if log_path else ''}"
            )
        self.wait_ok()

    def reshard(
        self, slots: int, source: RedisServer | str, target: RedisServer, *, pipeline: int = 10
    ) -> None:
        """Move `slots` slots and their keys from `source` to `target` with redis-cli
        --cluster reshard; waits until every node agrees."""
        self.wait_ok()
        self.wait_reshard(self.reshard_async(slots, source, target, pipeline=pipeline))

    def add_primary(self, slots: int | None = None) -> ClusterServer:
        """Start an empty node, join it, and move `slots` slots (default: a fair share,
        16384 / number of primaries) to it, evenly from every primary; returns it."""
        sources = self.primaries()
        node = self._start_node()
        self._meet_all([node])
        self.wait_ok()
        wanted = slots if slots is not None else SLOTS // (len(sources) + 1)
        # One reshard per source: redis-cli's "--cluster-from all" rounds each source's
        # share down and may move fewer slots than asked.
        for index, source in enumerate(sources):
            share = wanted // len(sources) + (1 if index < wanted % len(sources) else 0)
            if share:
                self.reshard(share, source, node)
        return node


class ClusterFactory(Protocol):
    """Type of the `cluster_factory` fixture: makes and starts a ServerCluster of the
    test's `server_kind` unless `kind` is given."""

    def __call__(
        self,
        *,
        kind: ServerKind | None = None,
        primaries: int = 3,
        replicas_per_primary: int = 1,
        node_timeout_ms: int = 1000,
        appendonly: bool = False,
        notify: str = "Egx",
        extra: dict[str, str] | None = None,
    ) -> ServerCluster: ...

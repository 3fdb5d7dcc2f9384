"""Operations on a Redis Cluster (and a Valkey cluster): `delayq status`, `inspect`,
`/metrics`, the dashboard and `delayq check` show what each primary holds, and the
shipped ACL rules (deploy/redis/users.acl) work there, with a missing rule named.

One 3-primary cluster per server kind serves the whole module (starting one takes a few
seconds); every primary is flushed before each test, and the cluster is stopped at the
end even when a test fails."""

from __future__ import annotations

import contextlib
import json
import os
import re
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from delayq.cluster.store import ClusterStore
from delayq.context import Delayq
from delayq.keys import timer_key
from delayq.producer import Producer
from delayq.redis_conn import connect, keys_for
from delayq.settings import Settings
from tests.cluster import ServerCluster
from tests.conftest import _require_redis_cli, _require_server_binary
from tests.harness import ListenerProcess, clean_env, migrate_cli, run_cli
from tests.servers import SERVER_KINDS, ServerKind, free_port, wait_for
from tests.test_least_privilege import PASSWORDS, acl_rules

#: For tests whose subject does not depend on the server kind: the Redis cluster only.
REDIS_ONLY = pytest.mark.parametrize("ops_cluster", ["redis"], indirect=True)
HOUR_MS = 3_600_000
PENDING = 300
NOT_READY = 4


@pytest.fixture(scope="module", params=SERVER_KINDS, ids=SERVER_KINDS)
def ops_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerCluster]:
    """3 primaries, no replicas (nothing here fails over), with the users of
    deploy/redis/users.acl defined on every node."""
    kind: ServerKind = request.param
    in_ci = os.environ.get("CI") == "true"  # conftest's in_ci, which is per test
    _require_server_binary(kind, in_ci)
    _require_redis_cli(in_ci)
    cluster = ServerCluster(
        tmp_path_factory.mktemp(f"{kind}-ops-cluster"), kind=kind, replicas_per_primary=0
    )
    try:
        cluster.start()
        for user in PASSWORDS:
            set_user_everywhere(cluster, user, acl_rules(user))
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(ops_cluster: ServerCluster) -> ServerCluster:
    """The module's cluster, emptied."""
    for node in ops_cluster.primaries():
        with contextlib.closing(node.admin()) as admin:
            admin.flushall()
    return ops_cluster


@pytest.fixture(scope="module")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One migrated SQLite database for the module (migrating takes a second)."""
    home = tmp_path_factory.mktemp("ops-db")
    url = f"sqlite:///{home}/delayq.db"
    migrate_cli(clean_env(DATABASE_URL=url, HOME=str(home / "home")))
    return url


@pytest.fixture
def env(cluster: ServerCluster, database_url: str, tmp_path: Path) -> dict[str, str]:
    """The CLI's environment: the cluster as admin, the migrated SQLite database."""
    return clean_env(REDIS_URL=cluster.url, DATABASE_URL=database_url, HOME=str(tmp_path))


@pytest.fixture
def store(cluster: ServerCluster) -> Iterator[ClusterStore]:
    settings = Settings(redis_url=cluster.url)
    client = connect(settings)
    try:
        yield ClusterStore(client, keys_for(client, settings))  # type: ignore[arg-type]
    finally:
        client.close()


def set_user_everywhere(cluster: ServerCluster, name: str, rules: list[str]) -> None:
    """ACL SETUSER on every node: a cluster does not share its users."""
    for node in cluster.nodes:
        with contextlib.closing(node.admin()) as admin:
            admin.execute_command("ACL", "SETUSER", name, "reset", *rules)


def as_user(cluster: ServerCluster, user: str, password: str) -> str:
    return cluster.url.replace("://", f"://{user}:{password}@", 1)


def seed(store: ClusterStore) -> dict[str, list[str]]:
    """Timers in every state, spread over the slots: PENDING pending in an hour, 3
    overdue (due now, unclaimed), 6 in flight (claimed, leased for an hour) and 3 dead
    letters. Returns the order numbers of each state."""
    producer = Producer(store.client, store.keys)
    pending = [f"P{i}" for i in range(PENDING)]
    assert producer.schedule_many([(sn, 3600) for sn in pending]) == PENDING
    claimed, dead, overdue = ["C0", "C1", "C2", "C3", "C4", "C5"], ["D0", "D1", "D2"], ["O0"]
    overdue += ["O1", "O2"]
    producer.schedule_many([(sn, 0) for sn in claimed + dead + overdue])
    firings = store.claim_expired([timer_key(sn, "cancel") for sn in claimed + dead], HOUR_MS)
    assert len(firings) == len(claimed + dead)
    dead_ids = [f.id for f in firings if f.key.split(":")[0] in dead]
    assert store.retry_later(
        dead_ids, max_attempts=1, backoff_ms=1000, backoff_max_ms=1000, error="boom"
    ) == len(dead)
    return {"pending": pending, "in_flight": claimed, "dead": dead, "overdue": overdue}


def primary_addresses(cluster: ServerCluster) -> set[str]:
    return {node.address for node in cluster.primaries()}


@REDIS_ONLY
def test_status_json_shows_each_primary_with_shares_that_add_up_to_the_totals(
    cluster: ServerCluster, store: ClusterStore, env: dict[str, str]
) -> None:
    seed(store)

    done = run_cli("status", "--json", env=env)

    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["pending"] == PENDING + 3  # the overdue ones are pending too
    assert status["overdue"] == 3
    assert status["in_flight"] == 6
    assert status["dead_lettered"] == 3
    assert sorted(d["timer"] for d in status["dead_letters"]) == [f"D{i}:cancel" for i in range(3)]
    primaries = status["primaries"]
    assert {p["node"] for p in primaries} == primary_addresses(cluster)
    for field in ("pending", "overdue", "in_flight", "dead_lettered"):
        assert sum(p[field] for p in primaries) == status[field], field
    # Spread: 300 timers over 16,384 slots reach every primary, none with most of them.
    assert all(0.2 * PENDING < p["pending"] < 0.5 * PENDING for p in primaries), primaries
    assert sum(p["slots"] for p in primaries) == 16384
    assert all(p["used_memory"] > 0 for p in primaries)
    assert status["next_due_at"] == min(p["next_due_at"] for p in primaries if p["next_due_at"])
    # The text form has a line per primary.
    text = run_cli("status", env=env)
    assert text.returncode == 0, text.stderr
    for node in primary_addresses(cluster):
        assert re.search(rf"^  {re.escape(node)}: 546[12] slots, pending \d+", text.stdout, re.M)


@REDIS_ONLY
def test_inspect_finds_a_pending_a_claimed_and_a_dead_lettered_timer_on_their_primaries(
    cluster: ServerCluster, store: ClusterStore, env: dict[str, str]
) -> None:
    timers = seed(store)
    expected = {
        timers["pending"][0]: "pending",
        timers["in_flight"][0]: "in_flight",
        timers["dead"][0]: "dead_lettered",
        "NEVER1": "none",
    }
    done = run_cli("inspect", timers["in_flight"][0], "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "in_flight"
    dq = Delayq(Settings(redis_url=cluster.url, database_url=env["DELAYQ_DATABASE_URL"]))
    for sn, state in expected.items():
        info = dq.inspect(sn, "cancel")
        assert info["state"] == state, info
        if state == "in_flight":
            assert len(info["claims"]) == 1 and info["claims"][0]["failed_attempts"] == 0
        if state == "dead_lettered":
            assert info["dead_letters"][0]["error"] == "boom"
        if state == "pending":
            assert info["due_at"] is not None and info["ttl_ms"] > 0


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Callable[[dict[str, str], str], ListenerProcess]]:
    started: list[ListenerProcess] = []

    def start(env: dict[str, str], http: str) -> ListenerProcess:
        proc = ListenerProcess(env, tmp_path / "listener.log", ("--http", http))
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _gauges(text: str, name: str) -> dict[str, float]:
    """{node: value} of a per-primary gauge in Prometheus text."""
    found = re.findall(rf'^{name}{{node="([^"]+)"}} (\S+)$', text, re.M)
    return {node: float(value) for node, value in found}


def test_metrics_and_dashboard_of_a_listener_on_a_cluster_show_each_primary(
    cluster: ServerCluster,
    store: ClusterStore,
    env: dict[str, str],
    listener: Callable[[dict[str, str], str], ListenerProcess],
) -> None:
    seed(store)
    port = free_port()
    # The listener user of the shipped rules: /metrics works with them (INFO refused:
    # no memory gauge).
    listener_env = {
        **env,
        "DELAYQ_REDIS_URL": as_user(cluster, "delayq-listener", PASSWORDS["delayq-listener"]),
    }
    proc = listener(listener_env, f"127.0.0.1:{port}")
    base = f"http://127.0.0.1:{port}"

    # The 3 overdue timers fire (orders that do not exist: not_found); the rest stays.
    def settled() -> bool:
        text = _get(f"{base}/metrics")
        return "delayq_overdue 0.0" in text and "delayq_pending 300.0" in text

    wait_for(settled, 30, interval_s=0.2, what="the overdue timers fired")
    text = _get(f"{base}/metrics")

    nodes = primary_addresses(cluster)
    totals = {"pending": 300, "in_flight": 6, "dead_letters": 3, "overdue": 0}
    for name, total in totals.items():
        assert f"delayq_{name} {float(total)}" in text, name
        per_node = _gauges(text, f"delayq_primary_{name}")
        assert set(per_node) == nodes, (name, text)
        assert sum(per_node.values()) == total, name
    assert all(v > 0 for v in _gauges(text, "delayq_primary_pending").values())
    assert "delayq_primary_used_memory_bytes" not in text  # INFO is not granted
    page = _get(f"{base}/")
    assert 'id="primaries"' in page
    for node in nodes:
        assert f"<td>{node}</td>" in page
    assert proc.stop() == 0, proc.text()


def test_check_on_a_cluster_passes_for_the_shipped_users_and_names_every_primary(
    cluster: ServerCluster, env: dict[str, str]
) -> None:
    nodes = primary_addresses(cluster)
    runs = {
        "default": run_cli("check", env=env),
        "delayq-listener": run_cli(
            "check",
            env={**env, "DELAYQ_REDIS_URL": as_user(cluster, "delayq-listener", "listener-pw")},
        ),
        "delayq-producer": run_cli(
            "check",
            "--role",
            "producer",
            env={**env, "DELAYQ_REDIS_URL": as_user(cluster, "delayq-producer", "producer-pw")},
        ),
    }
    for user, done in runs.items():
        assert done.returncode == 0, (user, done.stderr)
        role = "producer" if user == "delayq-producer" else "listener"
        for node in nodes:
            assert (
                f"ok: primary {node}: Redis user {user!r} has every permission a {role} needs"
                in done.stdout
            ), (user, done.stdout)
            if role == "listener":
                assert (
                    f"ok: primary {node}: Redis user {user!r} may run the peek_slots and "
                    "cluster_figures scripts" in done.stdout
                )
    assert "cluster: 3 primaries, 0 replicas, 16384 of 16384 slots served" in runs["default"].stdout


@REDIS_ONLY
@pytest.mark.parametrize(
    ("drop", "expected"),
    [
        (
            "~{delayq:*}:*",
            r"primary 127\.0\.0\.1:\d+: Redis user 'limited' lacks permission for '\w+' on key "
            r"'\{delayq:\d+\}:[\w:]+' .* \(a cluster's partition keys need the key pattern "
            r"~\{delayq:\*\}:\*\)$",
        ),
        (
            "+cluster|slots",
            r"^delayq: error: Redis user 'limited' may not read the cluster's topology "
            r"\(NOPERM .*'cluster\|slots'.*\): a cluster client needs \+cluster\|slots and "
            r"\+command",
        ),
        (
            "+command",
            r"^delayq: error: Redis user 'limited' may not read the cluster's topology "
            r"\(NOPERM .*'command'.*\)",
        ),
    ],
    ids=["no-partition-keys", "no-cluster-slots", "no-command"],
)
def test_check_on_a_cluster_names_the_listener_rule_a_limited_user_lacks(
    drop: str, expected: str, cluster: ServerCluster, env: dict[str, str]
) -> None:
    rules = [r for r in acl_rules("delayq-listener") if r != drop]
    assert len(rules) == len(acl_rules("delayq-listener")) - 1
    set_user_everywhere(cluster, "limited", rules)

    done = run_cli(
        "check", env={**env, "DELAYQ_REDIS_URL": as_user(cluster, "limited", "listener-pw")}
    )

    assert done.returncode == NOT_READY, done.stdout
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert re.search(expected, done.stderr.strip()), done.stderr


def test_status_on_a_cluster_whose_seeds_do_not_answer_says_so_in_one_line(
    tmp_path: Path,
) -> None:
    url = f"redis+cluster://127.0.0.1:{free_port()}"
    done = run_cli("status", env=clean_env(REDIS_URL=url, HOME=str(tmp_path)))
    assert done.returncode == 3
    assert done.stderr.startswith(f"delayq: error: Redis at {url} is not reachable")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


@REDIS_ONLY
def test_figures_fall_back_to_reading_slot_by_slot_when_a_primary_refuses_the_script(
    cluster: ServerCluster, store: ClusterStore
) -> None:
    """A user without EVALSHA (or a server without script flags) still gets the figures,
    the same ones, from pipelined per-slot reads."""
    from delayq.figures import redis_figures

    seed(store)
    by_script = redis_figures(store.client, store.keys)
    rules = [r for r in acl_rules("delayq-listener") if r != "+evalsha"]
    set_user_everywhere(cluster, "no-scripts", rules)
    settings = Settings(redis_url=as_user(cluster, "no-scripts", "listener-pw"))
    client = connect(settings)
    try:
        by_slot = redis_figures(client, keys_for(client, settings))
    finally:
        client.close()
    for figures in (by_script, by_slot):
        for p in figures["primaries"]:
            p.pop("used_memory")  # changes between the reads (and refused to no-scripts)
    assert by_slot == by_script
    assert (by_slot["pending"], by_slot["overdue"], by_slot["in_flight"]) == (PENDING + 3, 3, 6)

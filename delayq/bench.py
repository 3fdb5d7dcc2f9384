"""`delayq bench`: how late timers fire and how many fire, measured on real processes.

A run starts its own redis-server in a temporary directory (or uses --redis-url), makes a
scratch database (a temporary SQLite file, or a `delayq_bench_<hex>` database created on
the server named by --database-url and dropped afterwards), pre-loads far-future timers,
schedules the measured timers (`--rate` per second for `--duration` seconds, or a
`--burst` due at one instant), runs the real `delayq listen` as a subprocess, and reads
the lateness of every firing from the outcomes the listener committed (fired_at - due_at).
`--naive` runs the same workload again with keyspace events alone (TTL keys, one
subscriber, one transaction per event), so the difference is measured in one run.
`--action` chooses what the timers do (`delayq.bench_actions`): the built-in cancel, a
Python handler doing one UPDATE, or a webhook to a local server.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from delayq import migrate
from delayq.actions import Applier
from delayq.bench_actions import SCENARIOS, Scenario, terminate
from delayq.bench_cluster import (
    PrimaryShares,
    bench_client,
    flush,
    info_sum,
    scratch_cluster,
    server_version,
    subscribed,
)
from delayq.bench_profile import describe, py_spy, sampling, summarize
from delayq.cluster.url import is_cluster_url
from delayq.db import make_engine, outcomes
from delayq.embedded import redis_server_binary
from delayq.errors import InvalidInput, ServiceUnavailable
from delayq.keys import Keys, timer_key
from delayq.layout import check_shape, read_layout, reshard
from delayq.producer import Producer
from delayq.settings import Settings, mask_url
from delayq.store import Firing
from delayq.timing import from_ms

#: Seconds between the start of the measured window and the first timer falling due.
LEAD_S = 3.0
#: A rate run schedules its timers as a producer keeping pace with them would: the timers
#: due in each PACE_CHUNK_S, PACE_LEAD_S before they fall due (a burst is scheduled at
#: once). So the listener meets scheduling's load (and the keyspace events it makes) at
#: the rate of the run, not as one flood of the whole run's timers at the start.
PACE_CHUNK_S = 0.1
PACE_LEAD_S = 1.0
PRELOAD_CHUNK = 20_000


@dataclass(frozen=True)
class BenchConfig:
    pending: int = 100_000
    rate: int = 1000
    duration_s: float = 10.0
    burst: int = 0
    database_url: str | None = None
    redis_url: str | None = None
    naive: bool = False
    #: Write the measured timers as a producer that does not use delayq would (plain SET
    #: with PXAT): the listener adopts them from their 'expire' events.
    legacy: bool = False
    drain_timeout_s: float = 120.0
    #: What the timers do: a name of `delayq.bench_actions.SCENARIOS`.
    action: str = "cancel"
    #: Listener settings under test (None: the defaults).
    batch_size: int | None = None
    appliers: int | None = None
    #: Start a scratch Redis Cluster of this many primaries (0: one redis-server).
    cluster: int = 0
    #: Sample the listener with py-spy during the measured window, stacks to this file.
    profile: str | None = None
    #: Grow the due index to this many shards (`delayq reshard`) before the pre-load.
    shards: int | None = None

    @property
    def measured(self) -> int:
        return self.burst or int(self.rate * self.duration_s)

    def validate(self) -> None:
        if self.pending < 0 or self.rate < 1 or self.duration_s <= 0 or self.burst < 0:
            raise InvalidInput("--pending and --burst must be >= 0, --rate and --duration > 0")
        if self.measured < 1:
            raise InvalidInput("the run would fire no timer: raise --rate or --duration")
        if self.action not in SCENARIOS:
            raise InvalidInput(f"--action {self.action}: choose one of {', '.join(SCENARIOS)}")
        if self.cluster and self.redis_url:
            raise InvalidInput("give --cluster N (a scratch cluster) or --redis-url, not both")
        if self.naive and (self.cluster or is_cluster_url(self.redis_url)):
            raise InvalidInput("--naive subscribes to one server: it does not run on a cluster")
        if self.naive and self.action != "cancel":
            raise InvalidInput("--naive runs the built-in cancel only: drop --action or --naive")
        if self.profile:
            py_spy()  # one clear line before anything starts, when it is missing
        if self.shards is not None:
            if self.cluster or is_cluster_url(self.redis_url):
                raise InvalidInput("--shards: a cluster keeps one index shard per slot")
            check_shape(self.shards)


@dataclass
class RunResult:
    mode: str
    action: str
    scheduled: int
    fired: int
    lost: int
    duplicates: int
    early: int
    lateness_ms: dict[str, float]
    throughput_per_s: float
    drain_s: float
    schedule_per_s: float
    redis_bytes_per_pending: float | None
    redis_peak_mb: float
    redis_version: str
    listener_cpu_pct: float
    #: The action's work, counted where it is done (orders cancelled, stock rows updated,
    #: requests received): equal to `fired` when each timer's work was done once.
    effects: int
    #: On a cluster: each primary's commands and memory, and their shares.
    primaries: list[dict[str, Any]] = field(default_factory=list)
    #: With --profile: where the listener's CPU went (delayq.bench_profile.summarize).
    profile: dict[str, Any] = field(default_factory=dict)
    #: What the listener logged (it runs at --log-level warning): how many lines, and
    #: the first few. A clean run logs one: that the bench's scratch Redis keeps nothing
    #: on disk.
    listener_log_lines: int = 0
    listener_log_head: list[str] = field(default_factory=list)
    samples: list[tuple[float, float]] = field(default_factory=list, repr=False)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": round(ordered[-1], 2)}


# -- scratch servers ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def scratch_redis(url: str | None, cluster: int = 0) -> Iterator[str]:
    """The given Redis, or a private redis-server (or cluster of `cluster` primaries) in a
    temporary directory."""
    if url:
        yield url
        return
    binary = redis_server_binary(Settings())
    if cluster:
        with scratch_cluster(cluster, binary, _free_port, _wait, _terminate) as cluster_url:
            yield cluster_url
        return
    with tempfile.TemporaryDirectory(prefix="delayq-bench-redis-") as tmp:
        port = _free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                tmp,
                "--save",
                "",
                "--appendonly",
                "no",
                "--notify-keyspace-events",
                "Egx",
                "--logfile",
                str(Path(tmp) / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            _wait(lambda: _pings(url), 15, f"the bench's redis-server on port {port}")
            yield url
        finally:
            terminate(proc, timeout_s=10)


def _pings(url: str) -> bool:
    try:
        with contextlib.closing(redis.Redis.from_url(url, socket_connect_timeout=1)) as c:
            return bool(c.ping())
    except redis.RedisError:
        return False


@contextlib.contextmanager
def scratch_database(server_url: str | None) -> Iterator[str]:
    """A temporary SQLite file, or a fresh database on the server of `server_url`."""
    if not server_url or server_url.startswith("sqlite"):
        with tempfile.TemporaryDirectory(prefix="delayq-bench-db-") as tmp:
            yield f"sqlite:///{tmp}/bench.db"
        return
    url = sa.make_url(server_url)
    name = f"delayq_bench_{uuid.uuid4().hex[:12]}"  # generated: safe as an identifier
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    except sa.exc.DBAPIError as exc:
        raise ServiceUnavailable(
            f"cannot create a scratch database on {mask_url(server_url)}: "
            f"{str(exc.orig).splitlines()[0]}"
        ) from None
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            if url.get_backend_name() == "postgresql":
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            else:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        admin.dispose()


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise ServiceUnavailable(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


# -- one run -----------------------------------------------------------------------------


class Run:
    """One workload against one Redis and one database."""

    def __init__(
        self,
        cfg: BenchConfig,
        redis_url: str,
        database_url: str,
        mode: str,
        scenario: Scenario,
        progress: Progress,
    ) -> None:
        self.cfg = cfg
        self.mode = mode
        self.scenario = scenario
        self.action = scenario.action
        self.progress = progress
        tuned: dict[str, Any] = {"batch_size": cfg.batch_size, "appliers": cfg.appliers}
        self.settings = Settings(
            redis_url=redis_url,
            database_url=database_url,
            **{k: v for k, v in tuned.items() if v is not None},
        )
        self.client = bench_client(redis_url)
        self.keys = Keys()
        self.engine = make_engine(self.settings)
        self.scheduling_s = 0.0  # time spent in schedule_many (or SET for naive)
        self.pacer: threading.Thread | None = None
        self.pacer_error: BaseException | None = None
        self.orders = [f"BENCH{i:024d}" for i in range(cfg.measured)]  # 29-char timer keys

    def prepare(self) -> float:
        """Tables, the action's rows, pending timers. Returns Redis bytes per pending timer."""
        flush(self.client)
        migrate.upgrade(self.engine, self.settings)
        task = self.progress.add_task(f"preparing {self.scenario.name}", total=None)
        with self.engine.begin() as conn:
            self.scenario.prepare(conn, self.orders)
        self.progress.remove_task(task)
        if (
            self.cfg.shards is not None
            and self.cfg.shards > read_layout(self.client, self.keys).shards
        ):
            # Before the pre-load, while the index is empty: a resize then moves nothing,
            # and the run measures the layout, not a resize.
            reshard(self.client, self.keys, self.cfg.shards)
        before = info_sum(self.client, "memory", "used_memory")
        task = self.progress.add_task(
            f"pre-loading {self.cfg.pending:,} pending", total=self.cfg.pending
        )
        started = time.perf_counter()
        for i in range(0, self.cfg.pending, PRELOAD_CHUNK):
            n = min(PRELOAD_CHUNK, self.cfg.pending - i)
            self._preload(i, n)
            self.progress.advance(task, n)
        took = time.perf_counter() - started
        after = info_sum(self.client, "memory", "used_memory")
        per_timer = (after - before) / self.cfg.pending if self.cfg.pending else float("nan")
        self.scheduling_s += took
        return per_timer

    def _preload(self, start: int, n: int) -> None:
        items = far_timers(start, n, self.action)
        if self.mode != "naive":
            Producer(self.client, self.keys).schedule_many(items)
        else:
            pipe = self.client.pipeline(transaction=False)
            for sn, delay, action in items:
                pipe.set(timer_key(sn, action), 1, px=int(delay.total_seconds() * 1000))
            pipe.execute()

    def schedule_measured(self) -> dict[str, int]:
        """Schedule the measured timers (a rate run's in a thread that keeps pace with
        them: `join_pacer`); returns order -> due ms (Redis clock)."""
        sec, usec = self.client.time()
        now_ms = sec * 1000 + usec // 1000
        t0 = now_ms + int(LEAD_S * 1000)
        if self.cfg.burst:
            due = dict.fromkeys(self.orders, t0)
            self._send(list(due.items()))
            return due
        step = 1000 / self.cfg.rate
        due = {sn: t0 + int(i * step) for i, sn in enumerate(self.orders)}
        chunk_ms, lead_ms = int(PACE_CHUNK_S * 1000), int(PACE_LEAD_S * 1000)
        chunks: dict[int, list[tuple[str, int]]] = {}
        for sn, ms in due.items():
            chunks.setdefault((ms - t0) // chunk_ms, []).append((sn, ms))
        # Sent by this host's clock, kept in step with Redis's.
        offset_ms = now_ms - time.time() * 1000
        plan = [(t0 + n * chunk_ms - lead_ms - offset_ms, items) for n, items in chunks.items()]
        self.pacer = threading.Thread(target=self._pace, args=(plan,), daemon=True)
        self.pacer.start()
        return due

    def _pace(self, plan: list[tuple[float, list[tuple[str, int]]]]) -> None:
        try:
            for send_at_ms, items in plan:
                time.sleep(max(0.0, send_at_ms / 1000 - time.time()))
                self._send(items)
        except BaseException as exc:  # reported by join_pacer, in the bench's thread
            self.pacer_error = exc

    def join_pacer(self) -> None:
        """Wait for a rate run's scheduling to finish; raise what stopped it."""
        if self.pacer is not None:
            self.pacer.join(timeout=self.cfg.duration_s + LEAD_S + 60)
        if self.pacer_error is not None:
            raise self.pacer_error

    def _send(self, items: list[tuple[str, int]]) -> None:
        started = time.perf_counter()
        if self.mode == "delayq":
            Producer(self.client, self.keys).schedule_many(
                (sn, from_ms(ms), self.action) for sn, ms in items
            )
        else:
            pipe = self.client.pipeline(transaction=False)
            for sn, ms in items:
                pipe.set(timer_key(sn, self.action), 1, pxat=ms)
            pipe.execute()
        self.scheduling_s += time.perf_counter() - started

    def fired_count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(outcomes)).scalar_one())

    def collect(self, due: dict[str, int]) -> tuple[list[tuple[float, float]], int, int, int]:
        """(due offset s, lateness ms) per applied firing, and fired, duplicates, early."""
        t0 = min(due.values())
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    outcomes.c.order_sn, outcomes.c.due_at, outcomes.c.fired_at, outcomes.c.outcome
                )
            ).all()
        samples = []
        for row in rows:
            late = (row.fired_at - row.due_at) / timedelta(milliseconds=1)
            expected = due.get(row.order_sn)
            offset = ((expected - t0) / 1000) if expected is not None else 0.0
            samples.append((offset, late))
        distinct = len({r.order_sn for r in rows})
        early = sum(1 for _, late in samples if late < 0)
        return samples, distinct, len(rows) - distinct, early

    def close(self) -> None:
        self.client.close()
        self.engine.dispose()


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def listener_process(
    settings: Settings, log_path: Path, extra_env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """`delayq listen` with `settings` and `extra_env` (the action's settings) alone.

    With DELAYQ_BENCH_LISTENER_FROM=DIR the listener runs the delayq package of the source
    tree DIR (an older checkout, say), so one bench measures two listeners alike
    (`scripts/bench-targets.sh` does, for the CPU before and after)."""
    source = os.environ.get("DELAYQ_BENCH_LISTENER_FROM")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELAYQ_")}
    if source:
        if not (Path(source) / "delayq" / "__init__.py").is_file():
            raise InvalidInput(f"DELAYQ_BENCH_LISTENER_FROM={source}: no delayq package there")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (source, env.get("PYTHONPATH"))))
    env.update(
        DELAYQ_REDIS_URL=settings.redis_url or "",
        DELAYQ_DATABASE_URL=settings.effective_database_url,
        DELAYQ_BATCH_SIZE=str(settings.batch_size),
        DELAYQ_APPLIERS=str(settings.appliers),
        **extra_env,
    )
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "delayq.cli", "listen", "--log-level", "warning"],
            env=env,
            cwd=source or None,  # `-m` puts the working directory first on sys.path
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait(
            lambda: proc.poll() is not None or _subscribed(settings),
            30,
            "the listener to subscribe",
        )
        if proc.poll() is not None:
            raise ServiceUnavailable(f"the listener exited: {log_path.read_text()[-500:]}")
        yield proc
    finally:
        terminate(proc, timeout_s=30)


def _subscribed(settings: Settings) -> bool:
    return subscribed(settings.redis_url or "")


class NaiveListener:
    """The design delayq replaces: PSUBSCRIBE to expired events, one transaction each."""

    def __init__(self, settings: Settings, due: dict[str, int]) -> None:
        self.client = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
        self.applier = Applier(make_engine(settings), settings)
        self.due = due
        self.stopping = threading.Event()
        self.pubsub = self.client.pubsub()  # type: ignore[no-untyped-call]
        self.pubsub.psubscribe(Keys().expired_channel)
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            msg = self.pubsub.get_message(timeout=0.2)
            if msg and msg["type"] == "pmessage":
                order_sn = msg["data"].rsplit(":", 1)[0]
                if order_sn in self.due:
                    self.applier.apply([Firing(msg["data"], self.due[order_sn])])

    def __enter__(self) -> NaiveListener:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)
        self.pubsub.close()
        self.client.close()


def run_once(cfg: BenchConfig, mode: str, progress: Progress, workdir: Path) -> RunResult:
    scenario = SCENARIOS[cfg.action]()
    with (
        scratch_redis(cfg.redis_url, cfg.cluster) as redis_url,
        scratch_database(cfg.database_url) as db_url,
        contextlib.ExitStack() as stack,
    ):
        run = Run(cfg, redis_url, db_url, mode, scenario, progress)
        stack.callback(run.close)
        per_timer = run.prepare()
        # The action's far side (a webhook's server) outlives the listener: what the
        # listener did is counted there once it has stopped.
        extra_env = stack.enter_context(scenario.running(workdir))
        listener_cm: Any
        if mode != "naive":
            listener_cm = listener_process(run.settings, workdir / "listener.log", extra_env)
        else:
            listener_cm = contextlib.nullcontext()
        with listener_cm as proc:
            shares = PrimaryShares(run.client) if is_cluster_url(redis_url) else None
            cpu0 = _cpu_s(proc.pid) if proc else 0.0
            wall0 = time.monotonic()
            profiled = Path(cfg.profile) if cfg.profile and proc else None
            sampler = sampling(proc.pid, profiled) if proc and profiled else None
            with sampler or contextlib.nullcontext():
                due = run.schedule_measured()
                naive = NaiveListener(run.settings, due) if mode == "naive" else None
                with naive or contextlib.nullcontext():
                    task = progress.add_task(f"{mode}: firing {len(due):,}", total=len(due))
                    last_due_s = (max(due.values()) - min(due.values())) / 1000 + LEAD_S
                    deadline = time.monotonic() + last_due_s + cfg.drain_timeout_s
                    fired = 0
                    while fired < len(due) and time.monotonic() < deadline:
                        if run.pacer_error is not None:
                            break
                        time.sleep(0.25)
                        fired = run.fired_count()
                        progress.update(task, completed=fired)
                    run.join_pacer()
                drain_end = time.monotonic()
            cpu = (_cpu_s(proc.pid) - cpu0) / (drain_end - wall0) * 100 if proc else 0.0
            primaries = shares.report() if shares else []
        with run.engine.connect() as conn:
            effects = scenario.effects(conn)
        samples, distinct, duplicates, early = run.collect(due)
        log_path = workdir / "listener.log"
        logged = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
        log_path.unlink(missing_ok=True)  # the next run's listener starts a log of its own
        late = [s[1] for s in samples]
        first_due = LEAD_S
        span = max(0.001, drain_end - wall0 - first_due)
        peak = info_sum(run.client, "memory", "used_memory_peak") / 1e6
        return RunResult(
            mode=mode,
            action=scenario.action,
            scheduled=len(due),
            fired=distinct,
            lost=len(due) - distinct,
            duplicates=duplicates,
            early=early,
            lateness_ms=percentiles(late),
            throughput_per_s=round(distinct / span, 1),
            drain_s=round(span, 2),
            schedule_per_s=round((cfg.pending + len(due)) / max(run.scheduling_s, 1e-9)),
            redis_bytes_per_pending=round(per_timer, 1) if cfg.pending else None,
            redis_peak_mb=round(peak, 1),
            redis_version=server_version(run.client),
            listener_cpu_pct=round(cpu, 1),
            effects=effects,
            primaries=primaries,
            profile=summarize(profiled) if profiled else {},
            listener_log_lines=len(logged),
            listener_log_head=[line[:300] for line in logged[:5]],
            samples=samples,
        )


def run_bench(
    cfg: BenchConfig, *, json_path: Path | None, plot_path: Path | None, out: Callable[[str], None]
) -> dict[str, Any]:
    cfg.validate()
    if plot_path is not None and not _has_matplotlib():
        raise InvalidInput("--plot needs matplotlib: pip install 'delayq[bench]'")
    results: list[RunResult] = []
    with (
        tempfile.TemporaryDirectory(prefix="delayq-bench-") as tmp,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            # stderr: stdout is the figures' (`delayq bench --json | jq`).
            console=Console(stderr=True),
            transient=True,
        ) as progress,
    ):
        modes = ["legacy" if cfg.legacy else "delayq"] + (["naive"] if cfg.naive else [])
        for mode in modes:
            results.append(run_once(cfg, mode, progress, Path(tmp)))
    report: dict[str, Any] = {
        "machine": machine_info(),
        "config": asdict(cfg)
        | {
            "database_url": mask_url(cfg.database_url or "sqlite (temporary)"),
            "redis_url": mask_url(
                cfg.redis_url
                or (f"cluster of {cfg.cluster} (temporary)" if cfg.cluster else None)
                or "redis-server (temporary)"
            ),
        },
        "runs": [{k: v for k, v in asdict(r).items() if k != "samples"} for r in results],
    }
    for r in results:
        out(_summary(r))
        if r.listener_log_lines:
            out(f"the listener logged {r.listener_log_lines} lines, first:")
            for line in r.listener_log_head:
                out(f"  {line}")
        if r.profile:
            for line in describe(r.profile):
                out(line)
    if cfg.naive and results[1].lateness_ms and results[0].lateness_ms:
        ratio = results[1].lateness_ms["p99"] / max(results[0].lateness_ms["p99"], 0.01)
        report["naive_p99_ratio"] = round(ratio, 1)
        out(f"naive p99 / delayq p99: {ratio:,.0f}x")
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        out(f"wrote {json_path}")
    if plot_path:
        plot(results, plot_path, burst=bool(cfg.burst))
        out(f"wrote {plot_path}")
    return report


def _summary(r: RunResult) -> str:
    lat = r.lateness_ms
    per_timer = "n/a" if r.redis_bytes_per_pending is None else f"{r.redis_bytes_per_pending:.0f}"
    lat_text = " ".join(f"{k} {v:,.1f}" for k, v in lat.items()) if lat else "n/a"
    what = r.mode if r.action == "cancel" else f"{r.mode} {r.action}"
    spread = ""
    if r.primaries:
        spread = "; per primary (commands/memory): " + ", ".join(
            f"{p['node']} {p['commands_share']:.0%}/{p['memory_share']:.0%}" for p in r.primaries
        )
    return (
        f"{what}: fired {r.fired:,}/{r.scheduled:,}, lost {r.lost:,} (not fired by the end), "
        f"duplicates {r.duplicates}, "
        f"early {r.early}; done {r.effects:,}; lateness ms {lat_text}; "
        f"{r.throughput_per_s:,.0f}/s; "
        f"Redis {per_timer} B/pending timer, peak {r.redis_peak_mb:.0f} MB; "
        f"listener CPU {r.listener_cpu_pct:.0f}%; scheduling {r.schedule_per_s:,.0f}/s"
        f"{spread}"
    )


def _has_matplotlib() -> bool:
    from importlib.util import find_spec

    return find_spec("matplotlib") is not None


def plot(results: list[RunResult], path: Path, *, burst: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hist, over_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        late = sorted(s[1] for s in r.samples)
        if not late:
            continue
        hist.hist(late, bins=100, histtype="step", label=r.mode, log=not burst)
        if burst:
            # A burst has one due time: show how fast it drains instead.
            over_time.plot([ms / 1000 for ms in late], range(1, len(late) + 1), label=r.mode)
        else:
            over_time.plot([s[0] for s in r.samples], [s[1] for s in r.samples], ".",
                           markersize=1.5, label=r.mode)  # fmt: skip
    hist.set_xlabel("lateness (ms, due -> applied)")
    hist.set_ylabel("timers")
    hist.legend()
    if burst:
        over_time.set_xlabel("seconds after the due time")
        over_time.set_ylabel("timers committed")
    else:
        over_time.set_xlabel("time since the first due time (s)")
        over_time.set_ylabel("lateness (ms)")
        over_time.set_yscale("symlog", linthresh=10)
    over_time.legend()
    fig.suptitle("delayq bench: lateness of fired timers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def far_timers(start: int, n: int, action: str = "cancel") -> list[tuple[str, timedelta, str]]:
    """Timers `start` to `start + n` of the pending load: far future (a day ahead and
    later), spread one per 100 ms like real traffic, 29-character order ids."""
    return [
        (f"FAR{j:026d}", timedelta(days=1, milliseconds=100 * j), action)
        for j in range(start, start + n)
    ]


def machine_info() -> dict[str, Any]:
    """The CPU, its count, Python and the platform, as every benchmark report names them."""
    import platform

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    terminate(proc, timeout_s=timeout_s)

"""What the dashboard and /metrics cost Redis with 1,000,000 timers pending (issue 12).

Part `reads`: a private redis-server (a free port, a temporary directory; stopped at the
end) is loaded with --pending far-future timers (Producer.schedule_many, as `delayq bench`
preloads them), 1,000 dead letters and 200 firings waiting for a retry. Then each read the
dashboard and /metrics make is timed, uncached and through the listener's CachedFigures:
Redis's own time from INFO commandstats (the usec of every command but INFO itself, before
and after; median of --repeat runs; commands run by a script counted once), Redis's
main-thread CPU (INFO cpu: the commands and the sockets' I/O; ~1 ms resolution in
practice), the commands it took, and the wall time here.

Part `scrape`: `delayq bench` (the real `delayq listen --http` as a subprocess, --pending
far-future timers, --rate timers falling due a second) twice: without a scraper, and with
GET /metrics every --scrape-interval seconds for the whole run. Its lateness p50/p99 say
whether scraping moves it.

    python benchmarks/dashboard_load.py                       # both parts, 1,000,000 pending
    python benchmarks/dashboard_load.py --part reads --pending 100000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
from rich.progress import Progress

from delayq import bench, browse, firing_stats
from delayq.figures import CachedFigures, redis_figures
from delayq.keys import Keys
from delayq.layout import read_layout, reshard
from delayq.producer import Producer
from delayq.store import TimerStore

LOAD_CHUNK = 20_000
DEAD, RETRYING = 1_000, 200


#: Commands that run others (whose time INFO commandstats counts again under their names).
SCRIPTS = ("cmdstat_info", "cmdstat_evalsha", "cmdstat_eval", "cmdstat_evalsha_ro")


def redis_counters(client: redis.Redis) -> tuple[int, int, int]:
    """(usec of commands, commands, usec of main-thread CPU) Redis has spent so far.
    Commands: INFO commandstats without INFO itself and without script calls, whose
    commands are counted under their own names already. CPU: INFO cpu's main thread,
    user + system: the commands plus reading and writing the sockets."""
    stats = client.info("commandstats")
    rows = [v for k, v in stats.items() if k not in SCRIPTS]
    cpu = client.info("cpu")
    cpu_us = round((cpu["used_cpu_user_main_thread"] + cpu["used_cpu_sys_main_thread"]) * 1e6)
    return sum(int(v["usec"]) for v in rows), sum(int(v["calls"]) for v in rows), cpu_us


def measure(client: redis.Redis, fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    """Medians over `repeat` runs of `fn`: Redis's command time and main-thread CPU (ms),
    commands, and the wall time here (ms)."""
    runs = []
    for _ in range(repeat):
        before = redis_counters(client)
        started = time.perf_counter()
        fn()
        wall = time.perf_counter() - started
        after = redis_counters(client)
        runs.append([a - b for a, b in zip(after, before, strict=True)] + [wall])
    return {
        "redis_ms": round(statistics.median(r[0] for r in runs) / 1000, 2),
        "redis_cpu_ms": round(statistics.median(r[2] for r in runs) / 1000, 1),
        "commands": statistics.median(r[1] for r in runs),
        "wall_ms": round(statistics.median(r[3] for r in runs) * 1000, 1),
    }


def load(client: redis.Redis, keys: Keys, pending: int) -> float:
    """Far-future timers, as `delayq bench` preloads them, then dead letters and retries.
    Returns the seconds the pending timers took to schedule."""
    producer = Producer(client, keys)
    started = time.perf_counter()
    for start in range(0, pending, LOAD_CHUNK):
        n = min(LOAD_CHUNK, pending - start)
        producer.schedule_many(bench.far_timers(start, n))
    took = time.perf_counter() - started
    store = TimerStore(client, keys)
    sec, usec = client.time()
    now = int(sec) * 1000 + int(usec) // 1000
    store.schedule(
        [(f"DEAD{i:06d}:cancel", "at", now - 60_000 + i) for i in range(DEAD + RETRYING)]
    )
    ids: list[str] = []
    while len(ids) < DEAD + RETRYING:
        ids += [f.id for f in store.claim_due(1000, 600_000).firings]
    retry = {"backoff_ms": 3_600_000, "backoff_max_ms": 3_600_000, "error": "benchmark"}
    store.retry_later(ids[:DEAD], max_attempts=1, **retry)
    store.retry_later(ids[DEAD:], max_attempts=9, **retry)
    return took


def reads_part(pending: int, repeat: int, shards: int | None = None) -> dict[str, Any]:
    with bench.scratch_redis(None) as url:
        client = redis.Redis.from_url(url, decode_responses=True)
        keys = Keys()
        if shards:
            reshard(client, keys, shards)  # while empty, as `delayq bench --shards` does
        load_s = load(client, keys, pending)
        middle = pending // 2
        # A page halfway down the list (what a jump to the 10,000th page costs).
        due_mid = TimerStore(client, keys).timer_state(f"FAR{middle:026d}:cancel").pending_due_ms
        deep = browse.pending_cursor(int(due_mid or 0))
        dead_next = browse.dead_page(client, keys).next
        cache = CachedFigures(client, keys)
        cache.get()  # filled: the reads below within its TTL cost Redis nothing
        steps: dict[str, Callable[[], Any]] = {
            "front page figures (redis_figures, uncached)": lambda: redis_figures(client, keys),
            "front page figures (cached)": lambda: cache.get(),
            "/metrics scrape (uncached)": lambda: redis_figures(client, keys, dead_limit=0),
            "/metrics scrape (cached)": lambda: cache.get(dead_limit=0),
            "pending, first page": lambda: browse.pending_page(client, keys),
            "pending, a page halfway (500,000th timer)": lambda: browse.pending_page(
                client, keys, after=deep
            ),
            "in flight, first page": lambda: browse.in_flight_page(client, keys),
            "dead letters, first page": lambda: browse.dead_page(client, keys),
            "dead letters, second page": lambda: browse.dead_page(client, keys, after=dead_next),
            "search by order id": lambda: browse.timers_of_order(
                client, keys, f"FAR{middle:026d}", ["cancel", "complete"]
            ),
            "chart (last_hour)": lambda: firing_stats.last_hour(client, keys),
        }
        figures = {name: measure(client, fn, repeat) for name, fn in steps.items()}
        info = client.info("memory")
        shard_count = read_layout(client, keys).shards
        client.close()
    refresh = [
        "front page figures (redis_figures, uncached)",
        "pending, first page",
        "pending, a page halfway (500,000th timer)",
        "in flight, first page",
        "dead letters, first page",
    ]
    cached_refresh = ["front page figures (cached)", *refresh[1:]]
    return {
        "pending": pending,
        "shards": shard_count,
        "load_s": round(load_s, 1),
        "used_memory_mb": round(int(info["used_memory"]) / 2**20),
        "reads": figures,
        "dashboard_refresh_uncached": _sum(figures, refresh),
        "dashboard_refresh_cached": _sum(figures, cached_refresh),
    }


def _sum(figures: dict[str, dict[str, float]], names: list[str]) -> dict[str, float]:
    return {
        k: round(sum(figures[n][k] for n in names), 2)
        for k in ("redis_ms", "redis_cpu_ms", "commands", "wall_ms")
    }


@contextlib.contextmanager
def http_listener(port: int) -> Iterator[None]:
    """`delayq bench`'s listener, with --http on `port` (DELAYQ_HTTP)."""
    original = bench.listener_process

    def with_http(settings: Any, log_path: Path, extra_env: dict[str, str]) -> Any:
        return original(settings, log_path, {**extra_env, "DELAYQ_HTTP": f"127.0.0.1:{port}"})

    bench.listener_process = with_http  # type: ignore[assignment]
    try:
        yield
    finally:
        bench.listener_process = original


class Scraper(threading.Thread):
    """GET /metrics every `interval_s` (until stopped), timing each answer."""

    def __init__(self, port: int, interval_s: float) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval_s = interval_s
        self.stopping = threading.Event()
        self.took_ms: list[float] = []

    def run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as answer:
                    answer.read()
            except OSError:
                continue  # not listening yet
            self.took_ms.append((time.perf_counter() - started) * 1000)


def scrape_part(pending: int, rate: int, duration_s: float, interval_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"pending": pending, "rate": rate, "duration_s": duration_s}
    cfg = bench.BenchConfig(pending=pending, rate=rate, duration_s=duration_s)
    for scraping in (False, True):
        port = bench._free_port()
        scraper = Scraper(port, interval_s)
        with (
            http_listener(port),
            Progress(disable=True) as progress,
            tempfile.TemporaryDirectory(prefix="delayq-dashboard-load-") as tmp,
        ):
            if scraping:
                scraper.start()
            try:
                result = bench.run_once(cfg, "delayq", progress, Path(tmp))
            finally:
                scraper.stopping.set()
        name = f"scraped every {interval_s:g} s" if scraping else "not scraped"
        out[name] = {
            "lateness_ms": result.lateness_ms,
            "fired": result.fired,
            "lost": result.lost,
            "scrapes": len(scraper.took_ms),
            "scrape_wall_ms_p50": round(statistics.median(scraper.took_ms), 1)
            if scraper.took_ms
            else None,
            "scrape_wall_ms_max": round(max(scraper.took_ms), 1) if scraper.took_ms else None,
        }
        print(json.dumps({name: out[name]}), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["reads", "scrape", "all"], default="all")
    parser.add_argument("--pending", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5, help="runs of each read (median)")
    parser.add_argument("--rate", type=int, default=1000, help="scrape part: timers due a second")
    parser.add_argument("--duration", type=float, default=30.0, help="scrape part: seconds")
    parser.add_argument("--scrape-interval", type=float, default=1.0)
    parser.add_argument("--shards", type=int, help="reads part: grow the index to this first")
    parser.add_argument("--json-file", type=Path)
    args = parser.parse_args()
    report: dict[str, Any] = {"machine": bench.machine_info()}
    if args.part in ("reads", "all"):
        report["reads"] = reads_part(args.pending, args.repeat, args.shards)
        print(json.dumps(report["reads"], indent=2), flush=True)
    if args.part in ("scrape", "all"):
        report["scrape"] = scrape_part(args.pending, args.rate, args.duration, args.scrape_interval)
    if args.json_file:
        args.json_file.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

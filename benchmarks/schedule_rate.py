"""How fast `Producer.schedule_many` schedules timers on one Redis, and what they cost it.

A private redis-server (a free port, a temporary directory, `--notify-keyspace-events Egx`
as `delayq bench` starts it; stopped at the end) is loaded with --timers far-future timers
the way `delayq bench` pre-loads them (Run._preload): 29-character order ids, the
'cancel' action, due a day ahead and spread 100 ms apart, in schedule_many calls of
--chunk timers. Reported:

- timers/s: --timers over the time spent inside schedule_many (the lists are built
  before each call);
- Redis's side: its main-thread CPU (INFO cpu) and command time (INFO commandstats) over
  the load, the script calls made, their mean time, and the longest command the latency
  monitor saw (latency-monitor-threshold 1 ms): how long a bulk load can hold Redis, and
  so delay a listener's claim;
- bytes of used_memory per timer;
- `Producer.schedule` (one timer, as schedule_expiry) latency p50/p99 over --single
  calls, on the loaded Redis.

    .venv/bin/python benchmarks/schedule_rate.py                         # 1,000,000 timers
    .venv/bin/python benchmarks/schedule_rate.py --timers 200000 --json-file out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis

from delayq import bench
from delayq.bench_cluster import server_version
from delayq.keys import Keys
from delayq.producer import Producer


def redis_totals(client: redis.Redis) -> dict[str, float]:
    """Redis's main-thread CPU (s), command time of everything but INFO and script calls
    (s: a script's commands are counted under their own names), and script calls so far."""
    stats = client.info("commandstats")
    cpu = client.info("cpu")
    scripts = ("cmdstat_evalsha", "cmdstat_eval")
    return {
        "cpu_s": float(cpu["used_cpu_user_main_thread"]) + float(cpu["used_cpu_sys_main_thread"]),
        "command_s": sum(
            int(v["usec"]) for k, v in stats.items() if k not in (*scripts, "cmdstat_info")
        )
        / 1e6,
        "script_s": sum(int(v["usec"]) for k, v in stats.items() if k in scripts) / 1e6,
        "script_calls": sum(int(v["calls"]) for k, v in stats.items() if k in scripts),
    }


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load(producer: Producer, timers: int, chunk: int) -> float:
    """Schedule `timers` as `delayq bench` pre-loads them; the seconds spent scheduling."""
    took = 0.0
    for start in range(0, timers, chunk):
        items = [
            (f"FAR{j:026d}", timedelta(days=1, milliseconds=100 * j), "cancel")
            for j in range(start, min(start + chunk, timers))
        ]
        started = time.perf_counter()
        producer.schedule_many(items)
        took += time.perf_counter() - started
    return took


def single_latency_ms(producer: Producer, calls: int) -> tuple[float, float]:
    took = []
    for i in range(calls):
        started = time.perf_counter()
        producer.schedule(f"ONE{i:026d}", timedelta(hours=1))
        took.append((time.perf_counter() - started) * 1000)
    took.sort()
    return statistics.median(took), took[min(len(took) - 1, int(len(took) * 0.99))]


def run(timers: int, chunk: int, single: int) -> dict[str, Any]:
    with bench.scratch_redis(None) as url:
        client = redis.Redis.from_url(url, decode_responses=True)
        client.config_set("latency-monitor-threshold", 1)
        client.latency_reset()
        producer = Producer(client, Keys())
        used_before = int(client.info("memory")["used_memory"])
        before, cpu_before = redis_totals(client), own_cpu_s()
        seconds = load(producer, timers, chunk)
        after, cpu_after = redis_totals(client), own_cpu_s()
        used_after = int(client.info("memory")["used_memory"])
        latest = {row[0]: row for row in client.latency_latest()}
        calls = after["script_calls"] - before["script_calls"]
        p50, p99 = single_latency_ms(producer, single)
        server = server_version(client)
        client.close()
    return {
        "server": server,
        "timers": timers,
        "chunk": chunk,
        "seconds": round(seconds, 3),
        "timers_per_s": round(timers / seconds),
        "bytes_per_timer": round((used_after - used_before) / timers, 1),
        "python_cpu_s": round(cpu_after - cpu_before, 2),
        "redis_cpu_s": round(after["cpu_s"] - before["cpu_s"], 2),
        "redis_script_s": round(after["script_s"] - before["script_s"], 2),
        "script_calls": calls,
        "timers_per_call": round(timers / calls, 1) if calls else None,
        "ms_per_call": round((after["script_s"] - before["script_s"]) * 1000 / calls, 3)
        if calls
        else None,
        # The longest command (a script call counts as one) over 1 ms, if any.
        "max_command_ms": int(latest["command"][3]) if "command" in latest else 0,
        "schedule_p50_ms": round(p50, 3),
        "schedule_p99_ms": round(p99, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timers", type=int, default=1_000_000)
    parser.add_argument(
        "--chunk", type=int, default=bench.PRELOAD_CHUNK, help="timers per schedule_many call"
    )
    parser.add_argument("--single", type=int, default=2000, help="single schedule calls timed")
    parser.add_argument("--json-file", type=Path)
    args = parser.parse_args()
    if args.timers < 1 or args.chunk < 1 or args.single < 1:
        parser.error("--timers, --chunk and --single must be at least 1")
    result = run(args.timers, args.chunk, args.single)
    result["load_average"] = round(os.getloadavg()[0], 2)
    print(
        f"Redis {result['server']}: {result['timers']:,} timers in {result['seconds']} s: "
        f"{result['timers_per_s']:,} timers/s; {result['bytes_per_timer']} B/timer; "
        f"Redis CPU {result['redis_cpu_s']} s, scripts {result['redis_script_s']} s in "
        f"{result['script_calls']:,} calls ({result['ms_per_call']} ms, "
        f"{result['timers_per_call']} timers each, longest command {result['max_command_ms']} "
        f"ms); Python CPU {result['python_cpu_s']} s; schedule() p50 "
        f"{result['schedule_p50_ms']} ms p99 {result['schedule_p99_ms']} ms"
    )
    if args.json_file:
        args.json_file.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

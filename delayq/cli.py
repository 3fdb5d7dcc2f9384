"""The command line: parses, calls the library, prints. No logic of its own."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
from datetime import datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from typer.exceptions import TyperException

from delayq.cli_completion import PROG, accept_click_spelling, explicit_shell
from delayq.context import Delayq
from delayq.errors import DelayqError, InvalidInput
from delayq.keys import timer_key
from delayq.logs import setup_logging
from delayq.settings import ENV_PREFIX, Settings
from delayq.timing import parse_delay_ms, parse_due_at
from delayq.web import parse_address, serve

if TYPE_CHECKING:
    from delayq.actions.registry import ActionSpec

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Exact, durable delay timers: cancel unpaid orders on time, once.",
)
embedded_app = typer.Typer(help="The embedded Redis used when DELAYQ_REDIS_URL is not set.")
app.add_typer(embedded_app, name="embedded")

ActionOpt = Annotated[str, typer.Option("--action", "-a", help="What the timer does.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2))


def _print_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _utc(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _setting(name: str) -> str:
    """The environment variable of a setting, for `envvar=`: `--help` shows it, and the
    value Typer reads from it is the one Settings.load would read (an empty variable is
    'not set' to both), so the order stays flag > environment > .env > default."""
    return ENV_PREFIX + name.upper()


def _print_version(value: bool) -> None:
    if value:
        from delayq import __version__

        print(f"delayq {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    ctx: typer.Context,
    redis_url: Annotated[
        str | None,
        typer.Option(
            envvar=_setting("redis_url"),
            show_envvar=True,
            help="Redis URL; its DB is the timer DB.",
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(envvar=_setting("database_url"), show_envvar=True, help="SQLAlchemy URL."),
    ] = None,
    env_file: Annotated[
        Path, typer.Option(help="Settings file read before the environment.")
    ] = Path(".env"),
    _version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version."
        ),
    ] = False,
) -> None:
    ctx.obj = {"redis_url": redis_url, "database_url": database_url, "env_file": env_file}


AppOpt = Annotated[
    str | None,
    typer.Option(
        "--app",
        envvar=_setting("app"),
        show_envvar=True,
        help="Modules with @delayq.action handlers: shop.timers or path/timers.py, "
        "comma-separated.",
    ),
]


def _dq(ctx: typer.Context, **overrides: str | None) -> Delayq:
    opts = dict(ctx.obj)
    env_file = opts.pop("env_file")
    return Delayq(Settings.load(env_file=env_file, **opts, **overrides))


@app.command()
def migrate(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Create or upgrade delayq's tables (safe to run while listeners run)."""
    before, after = _dq(ctx).migrate()
    if as_json:
        _print_json({"before": before, "after": after})
    else:
        print(f"database schema: {before or 'empty'} -> {after}")


@app.command()
def schedule(
    ctx: typer.Context,
    order_sn: Annotated[
        str | None, typer.Argument(help="The order id (1-64 of A-Za-z0-9_.-).", show_default=False)
    ] = None,
    in_: Annotated[
        str | None, typer.Option("--in", help="Delay: 90s, 20m, 1h30m, 2d, 1200.")
    ] = None,
    at: Annotated[
        str | None, typer.Option(help="Due time, ISO 8601 with zone: 2026-12-01T10:00Z.")
    ] = None,
    action: ActionOpt = "cancel",
    from_file: Annotated[
        str | None,
        typer.Option(
            "--from-file",
            metavar="FILE",
            help="Schedule every timer of a CSV or JSON lines file ('-': stdin), all rows "
            "validated first; --in, --at and --action then apply to rows giving none. "
            "See docs/cli.md.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Arm the timer of an order (again: move it; the last schedule wins)."""
    if in_ is not None and at is not None:
        raise InvalidInput("give exactly one of --in DURATION or --at TIME")
    # Bad input is refused before anything connects (or starts the embedded Redis).
    when: timedelta | datetime | None = None
    if in_ is not None:
        when = timedelta(milliseconds=parse_delay_ms(in_))
    elif at is not None:
        when = parse_due_at(at)
    if from_file is not None:
        if order_sn is not None:
            raise InvalidInput("give an ORDER_SN or --from-file FILE, not both")
        _schedule_file(ctx, from_file, action, when, as_json)
        return
    if order_sn is None:
        raise InvalidInput("Missing argument 'ORDER_SN' (or give --from-file FILE)")
    if when is None:
        raise InvalidInput("give exactly one of --in DURATION or --at TIME")
    key = timer_key(order_sn, action)
    if isinstance(when, datetime):
        due = _dq(ctx).producer.schedule(order_sn, at=when, action=action)
    else:
        due = _dq(ctx).producer.schedule(order_sn, when, action=action)
    if as_json:
        _print_json({"timer": key, "order_sn": order_sn, "action": action, "due_at": _utc(due)})
    else:
        print(f"scheduled {key} due {_utc(due)}")


def _schedule_file(
    ctx: typer.Context,
    name: str,
    action: str,
    default: timedelta | datetime | None,
    as_json: bool,
) -> None:
    from delayq.timer_file import CHUNK_ROWS, TimerFile, batched, progress_bar

    with TimerFile(name, action=action, default=default) as timers:
        total = timers.count()  # every row validated before the first is written
        done = 0
        with progress_bar(total, f"scheduling from {timers.name}") as advance:
            try:
                producer = _dq(ctx).producer
                for chunk in batched(timers.rows(), CHUNK_ROWS):
                    done += producer.schedule_many([row.item for row in chunk])
                    advance(len(chunk))
            except DelayqError as exc:
                # Scheduling again is safe (the last schedule wins): say how far it got.
                raise type(exc)(
                    f"{exc} (scheduled {done} of {total} timers from {timers.name} before)"
                ) from exc
    if as_json:
        _print_json({"file": timers.name, "scheduled": done})
    else:
        print(f"scheduled {done} timers from {timers.name}")


@app.command()
def cancel(
    ctx: typer.Context, order_sn: str, action: ActionOpt = "cancel", as_json: JsonOpt = False
) -> None:
    """Disarm the timer of an order (it was paid)."""
    key = timer_key(order_sn, action)
    cancelled = _dq(ctx).producer.cancel(order_sn, action=action)
    if as_json:
        _print_json({"timer": key, "order_sn": order_sn, "action": action, "cancelled": cancelled})
    elif cancelled:
        print(f"cancelled {key}")
    else:
        print(f"no pending timer {key} (never set, already fired, or firing now)")


@app.command()
def listen(
    ctx: typer.Context,
    configure_redis: Annotated[
        bool, typer.Option(help="Turn on notify-keyspace-events Egx with CONFIG SET if it is off.")
    ] = False,
    http: Annotated[
        str | None,
        typer.Option(
            envvar=_setting("http"),
            show_envvar=True,
            help="Serve /metrics, /livez, /readyz, /healthz and the dashboard on HOST:PORT "
            "(':PORT' is 127.0.0.1:PORT; all interfaces only as 0.0.0.0:PORT or [::]:PORT).",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_format: Annotated[
        str, typer.Option(help="plain, json, or auto (json when stderr is not a terminal).")
    ] = "auto",
    app_: AppOpt = None,
) -> None:
    """Fire timers as they fall due, until SIGTERM or Ctrl-C."""
    setup_logging(log_level, log_format)
    dq = _dq(ctx, app=app_)
    http = http or dq.settings.http
    address = parse_address(http) if http else None
    for line in dq.check(configure_redis=configure_redis):
        level = logging.WARNING if line.startswith("warning:") else logging.INFO
        logging.getLogger("delayq").log(level, line.removeprefix("warning: "))
    listener = dq.listener()
    server = None
    if address is not None:
        token, hosts = dq.settings.dashboard_token, dq.settings.dashboard_host_list
        server = serve(listener, address, token, allowed_hosts=hosts)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        # Only a flag: the loops finish the batch in hand and give back the rest.
        listener.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        listener.run()
    finally:
        if server is not None:
            server.shutdown()


@app.command()
def check(
    ctx: typer.Context,
    configure_redis: Annotated[
        bool, typer.Option(help="Set notify-keyspace-events if off.")
    ] = False,
    role: Annotated[
        str, typer.Option(help="listener (Redis and database) or producer (Redis only).")
    ] = "listener",
    app_: AppOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check Redis (reachable, permissions, keyspace notifications), the database
    (reachable, privileges, migrated) and the actions (modules import, tables exist)."""
    if role not in ("listener", "producer"):
        raise InvalidInput(f"invalid --role {role!r}: use listener or producer")
    lines = _dq(ctx, app=app_).check(configure_redis=configure_redis, role=role)
    if as_json:  # a failed check is an error line and exit status, as without --json
        warnings = [x.removeprefix("warning: ") for x in lines if x.startswith("warning:")]
        ok = [x for x in lines if not x.startswith("warning:")]
        _print_json({"ok": ok, "warnings": warnings})
        return
    for line in lines:
        print(line if line.startswith("warning:") else f"ok: {line}")


@app.command()
def actions(ctx: typer.Context, app_: AppOpt = None, as_json: JsonOpt = False) -> None:
    """List the actions a listener would know: name, where it comes from, how it runs."""
    from delayq.actions.registry import describe

    specs = _dq(ctx, app=app_).actions
    if as_json:
        _print_json({"actions": [_action_json(spec) for spec in specs]})
        return
    for spec in specs:
        print(describe(spec))


def _action_json(spec: ActionSpec) -> dict[str, Any]:
    policy = spec.policy
    return {
        "name": spec.name,
        "source": spec.source,
        "runs": "batch" if spec.batch else "external" if spec.external else "in the transaction",
        "tables": list(spec.tables),
        "policy": None if policy is None else dataclasses.asdict(policy),
    }


@app.command()
def status(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Pending, overdue, in-flight and dead-lettered timers, and outcomes of the last hour."""
    figures = _dq(ctx).status()
    if as_json:
        _print_json(figures)
        return
    for name, value in figures.items():
        if name == "listeners":
            print(f"listeners alive: {len(value)}")
            for lst in value:
                print(f"  {lst['id']} (seen {lst['last_seen_s']} s ago)")
        elif name == "dead_letters":
            for d in value:
                print(f"  dead: {d['timer']} due {d['due_at']}", end="")
                print(f" after {d['attempts']} attempts: {d['error']}")
        elif name == "primaries":  # a cluster
            print(f"primaries: {len(value)}")
            for p in value:
                print(
                    f"  {p['node']}: {p['slots']} slots, pending {p['pending']}, "
                    f"overdue {p['overdue']}, in flight {p['in_flight']}, "
                    f"dead-lettered {p['dead_lettered']}, used memory {p['used_memory']}"
                )
        elif name == "index":  # one Redis: the due index's shards (delayq.layout)
            print(
                f"due index: {value['shards']:,} shards, {value['timers_per_shard']} timers "
                "a shard"
                + (
                    f", resize under way ({value['resize_moved']} moved)"
                    if value["resize_moved"]
                    else ""
                )
            )
            if value["advice"]:
                print(f"warning: {value['advice']}")
        elif name == "outcomes_last_hour":
            print(
                "outcomes (last hour): "
                + (", ".join(f"{k} {n}" for k, n in value.items()) or "none")
            )
        else:
            print(f"{name.replace('_', ' ')}: {value}")


@app.command()
def reshard(
    ctx: typer.Context,
    shards: Annotated[
        int | None,
        typer.Option(
            help="The new shard count: a power of two, a multiple of the current one "
            "(default: enough for the timers pending now to stay compact)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Grow the due index's shard count so that its shards stay in Redis's compact
    encoding (one Redis; a cluster needs none). Safe while listeners and producers run,
    and resumable: run it again after an interruption. Every producer and listener must
    run delayq 0.3 or later first: 0.2 always writes 16,384 shards (docs/cli.md)."""

    from delayq.layout import check_shape

    if shards is not None:
        check_shape(shards)  # refused before connecting

    def progress(moved: int, total: int) -> None:
        if not as_json and (moved % 1024 == 0 or moved == total):
            _print_stderr(f"moved {moved:,} of {total:,} shards")

    result = _dq(ctx).reshard(shards, progress)
    if as_json:
        _print_json(result)
    elif result["after"] == result["before"]:
        print(
            f"the due index keeps its {result['after']:,} shards: enough for "
            f"{result['pending']:,} pending timers"
        )
    else:
        print(f"the due index has {result['after']:,} shards (was {result['before']:,})")


@app.command()
def inspect(
    ctx: typer.Context,
    order_sn: str,
    action: ActionOpt = "cancel",
    as_json: JsonOpt = False,
) -> None:
    """One timer: its state, due time, TTL, claim, dead letter and last outcome."""
    timer_key(order_sn, action)  # refuse bad input before connecting
    info = _dq(ctx).inspect(order_sn, action)
    if as_json:
        _print_json(info)
        return
    for name, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        print(f"{name.replace('_', ' ')}: {'-' if value is None else value}")


@app.command("retry-dead")
def retry_dead(
    ctx: typer.Context,
    order_sn: Annotated[
        list[str] | None, typer.Argument(help="Orders to re-queue (default: all).")
    ] = None,
    action: ActionOpt = "cancel",
    as_json: JsonOpt = False,
) -> None:
    """Re-queue dead-lettered timers so they fire now."""
    keys = [timer_key(sn, action) for sn in order_sn or []]
    requeued = _dq(ctx).retry_dead(keys)
    if as_json:
        _print_json({"requeued": requeued})
    else:
        print(f"re-queued {requeued} dead-lettered timers")


@app.command("copy-timers")
def copy_timers(
    ctx: typer.Context,
    from_url: Annotated[
        str, typer.Option("--from", help="The Redis the timers are in now (redis://...).")
    ],
    to_url: Annotated[
        str,
        typer.Option("--to", help="Where to copy them: redis+cluster://h:p[,h:p...] or redis://."),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only count what would be copied.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Copy pending timers, in-flight firings, dead letters and legacy TTL keys from one
    Redis to another (a cluster); running it again copies only what is new. See
    docs/moving-to-cluster.md."""
    from delayq.cluster.copy import copy_timers as copy

    report = copy(_dq(ctx).settings, from_url, to_url, dry_run=dry_run)
    if as_json:
        _print_json(report.as_dict())
    else:
        print(report.summary())


@app.command()
def reconcile(
    ctx: typer.Context,
    older_than: Annotated[
        str,
        typer.Option(
            help="Look at orders created longer ago than this (20m, 2h, 1d): above the "
            "longest delay you schedule, since --fix makes them fire now."
        ),
    ],
    action: ActionOpt = "cancel",
    status: Annotated[
        str | None,
        typer.Option(
            help="The status orders are in until the action fires (default: unpaid for "
            "cancel, paid for complete; needed for any other action)."
        ),
    ] = None,
    fix: Annotated[
        bool, typer.Option("--fix", help="Schedule the lost timers to fire now.")
    ] = False,
    limit: Annotated[int | None, typer.Option(help="Stop after this many lost orders.")] = None,
    batch_size: Annotated[int, typer.Option(help="Orders read per query.")] = 1000,
    as_json: JsonOpt = False,
    app_: AppOpt = None,
) -> None:
    """Find orders whose timer is lost: still in the action's starting status, older than
    --older-than, no timer (staged in the outbox or in Redis), no outcome. Only reports
    unless --fix; see docs/reconcile.md."""
    from delayq.reconcile import Request, terminal_progress
    from delayq.reconcile import reconcile as run

    dq = _dq(ctx, app=app_)
    request = Request.make(
        dq.settings,
        action=action,
        older_than=older_than,
        status=status,
        limit=limit,
        batch_size=batch_size,
    )
    with terminal_progress() as progress:
        report = run(
            dq.settings,
            dq.engine,
            dq.producer,
            request,
            fix=fix,
            progress=progress,
            known_actions=lambda: [spec.name for spec in dq.actions],
        )
    print(json.dumps(report.as_dict(), indent=2) if as_json else report.summary())


@app.command()
def demo(
    ctx: typer.Context,
    delay_s: Annotated[float, typer.Option(help="How far ahead the demo's timers are.")] = 2.0,
) -> None:
    """Create three orders, schedule them, pay one, cancel one timer, watch the listener."""
    from delayq.demo import run_demo

    setup_logging("warning", "plain")
    run_demo(_dq(ctx), delay_s=delay_s, out=print)


@app.command()
def bench(
    pending: Annotated[int, typer.Option(help="Far-future timers pre-loaded.")] = 100_000,
    rate: Annotated[int, typer.Option(help="Timers falling due per second.")] = 1000,
    duration: Annotated[float, typer.Option(help="Seconds of timers falling due.")] = 10.0,
    burst: Annotated[int, typer.Option(help="Instead: this many timers due at one instant.")] = 0,
    database_url: Annotated[
        str | None,
        typer.Option(help="Server to make a scratch database on (default: temporary SQLite)."),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            help="Redis to use, or a cluster (redis+cluster://host:port,...); default: a "
            "temporary redis-server."
        ),
    ] = None,
    cluster: Annotated[
        int, typer.Option(help="Instead: a temporary Redis Cluster of this many primaries.")
    ] = 0,
    shards: Annotated[
        int | None,
        typer.Option(
            help="Grow the due index to this many shards (delayq reshard) before the "
            "pre-load; 131072 keeps 10,000,000 pending compact."
        ),
    ] = None,
    naive: Annotated[bool, typer.Option(help="Also run keyspace events alone.")] = False,
    legacy: Annotated[
        bool,
        typer.Option(help="Fire timers written by a plain SET PXAT (adopted), not delayq's."),
    ] = False,
    batch_size: Annotated[
        int | None, typer.Option(help="DELAYQ_BATCH_SIZE for the listener.")
    ] = None,
    appliers: Annotated[int | None, typer.Option(help="DELAYQ_APPLIERS for the listener.")] = None,
    action: Annotated[
        str,
        typer.Option(
            help="What the timers do: cancel (the built-in), handler (a Python handler doing "
            "one UPDATE), webhook (a POST to a local server)."
        ),
    ] = "cancel",
    drain_timeout: Annotated[float, typer.Option(help="Seconds to wait past the last due.")] = 120,
    json_file: Annotated[
        Path | None, typer.Option("--json-file", help="Write the figures (JSON) here.")
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the figures as one JSON object on stdout (progress: stderr)."
        ),
    ] = False,
    plot: Annotated[Path | None, typer.Option(help="Draw the lateness here (PNG).")] = None,
    profile: Annotated[
        Path | None,
        typer.Option(
            help="Sample the listener with py-spy during the measured window; write the "
            "stacks here (raw format) and print where the CPU went."
        ),
    ] = None,
) -> None:
    """Measure lateness and throughput with the real listener; see BENCHMARKS.md."""
    from delayq.bench import BenchConfig, run_bench

    cfg = BenchConfig(
        pending=pending,
        rate=rate,
        duration_s=duration,
        burst=burst,
        database_url=database_url,
        redis_url=redis_url,
        naive=naive,
        legacy=legacy,
        drain_timeout_s=drain_timeout,
        batch_size=batch_size,
        appliers=appliers,
        action=action,
        cluster=cluster,
        shards=shards,
        profile=str(profile) if profile else None,
    )
    if as_json:
        report = run_bench(cfg, json_path=json_file, plot_path=plot, out=_print_stderr)
        _print_json(report)
    else:
        run_bench(cfg, json_path=json_file, plot_path=plot, out=print)


@embedded_app.command("stop")
def embedded_stop(ctx: typer.Context) -> None:
    """Stop the embedded Redis (its append-only file keeps the timers)."""
    from delayq.embedded import stop_embedded_redis

    settings = _dq(ctx).settings
    print("stopped" if stop_embedded_redis(settings) else "not running")


def main(argv: list[str] | None = None) -> None:
    """Entry point: every error ends in one line on stderr and a non-zero exit."""
    args = sys.argv[1:] if argv is None else list(argv)
    accept_click_spelling()
    command = typer.main.get_command(app)
    try:
        if explicit_shell(args):
            sys.exit(0)
        code = command.main(args=args, prog_name=PROG, standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except DelayqError as exc:
        print(f"delayq: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except TyperException as exc:  # usage errors: typer's own (vendored) click exceptions
        message = exc.format_message()
        if "\n" in message:  # 'delayq' alone: the help text
            print(message, file=sys.stderr)
        else:
            print(f"delayq: error: {message}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("delayq: aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        # `delayq ... | head`: the reader has gone. No traceback, now or at exit's flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

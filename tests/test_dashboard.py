"""The dashboard as an operator sees it: real state made by a real listener, read and acted
on in headless Chromium (Debian's chromium and chromedriver, driven by Selenium).

Timers are dead-lettered for real: the listener's MariaDB user loses its table privileges
while they fire, with DELAYQ_MAX_ATTEMPTS=1, and gets them back before the re-queue.

Set DELAYQ_SCREENSHOT_DIR to also keep the screenshot as DIR/dashboard.png (how
docs/dashboard.png is made)."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

from delayq.keys import Keys
from delayq.producer import Producer
from tests.harness import ListenerProcess, clean_env, create_orders, engine_for, migrate_cli
from tests.harness import statuses as order_statuses
from tests.servers import RedisServer, free_port, wait_for

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
DEAD = [f"DEAD{i}" for i in range(4)]
PENDING = [f"LATER{i}" for i in range(5)]
WAIT_S = 20


def _unavailable(reason: str, in_ci: bool) -> NoReturn:
    # bootstrap.sh installs the browser, so in CI its absence is a bug, not a skip.
    if in_ci:
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


@pytest.fixture
def browser(tmp_path: Path, in_ci: bool, monkeypatch: pytest.MonkeyPatch) -> Iterator[WebDriver]:
    """Headless Chromium through chromedriver; both are gone afterwards, even on failure."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        what = " and ".join(missing)
        _unavailable(f"{what} not installed (apt-get install chromium chromium-driver)", in_ci)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        _unavailable(f"selenium not installed (pip install -e '.[dev]'): {exc}", in_ci)
    # Both paths are given, so Selenium Manager is never run; were it run, it must not
    # try to download a browser or a driver.
    monkeypatch.setenv("SE_OFFLINE", "true")
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    browser_dir = tmp_path / "browser"
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


def _post_requeue(base: str, token: str | None) -> int:
    form = urllib.parse.urlencode({} if token is None else {"token": token}).encode()
    request = urllib.request.Request(f"{base}/dead/requeue", data=form, method="POST")
    try:
        # A redirect to / after a re-queue is followed: 200 then.
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


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


def test_dashboard_shows_real_state_refuses_a_wrong_token_and_requeues_dead_letters(
    browser: WebDriver,
    redis_server: RedisServer,
    mariadb_url: str,
    limited_user: tuple[str, Callable[[bool], None]],
    listener: Callable[[dict[str, str], str], ListenerProcess],
    tmp_path: Path,
) -> None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    # -- real state: applied firings, dead letters, pending timers ----------------------
    admin_env = clean_env(
        REDIS_URL=redis_server.url(0), DATABASE_URL=mariadb_url, HOME=str(tmp_path)
    )
    migrate_cli(admin_env)
    engine = engine_for(mariadb_url)
    create_orders(engine, [*APPLIED, *DEAD, *PENDING])
    user_url, grant = limited_user
    grant(True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = clean_env(
        REDIS_URL=redis_server.url(0),
        DATABASE_URL=user_url,
        HOME=str(tmp_path),
        MAX_ATTEMPTS="1",
        DASHBOARD_TOKEN=TOKEN,
    )
    listening = listener(env, f"127.0.0.1:{port}")
    producer = Producer(redis_server.client(), Keys())
    client = redis_server.client()

    def statuses(sns: list[str]) -> set[str]:
        found = order_statuses(engine)
        return {found[sn] for sn in sns}

    producer.schedule_many((sn, 0) for sn in APPLIED)
    wait_for(lambda: statuses(APPLIED) == {"cancelled"}, WAIT_S, what="applied firings")
    grant(False)
    producer.schedule_many((sn, 0) for sn in DEAD)
    wait_for(lambda: client.hlen(Keys().dead) == len(DEAD), WAIT_S, what="dead letters")
    grant(True)
    producer.schedule_many((sn, "1h") for sn in PENDING)
    assert statuses(DEAD) == {"unpaid"}

    # -- what the page shows --------------------------------------------------------------
    def text_of(by: str, value: str) -> str:
        # Right after a click the old page may be going away under us: that is "not yet".
        try:
            return str(browser.find_element(by, value).text)
        except (StaleElementReferenceException, NoSuchElementException):
            return ""

    def shown(ident: str) -> str:
        return text_of(By.ID, ident)

    def shown_fresh(ident: str) -> str:
        browser.get(base)
        return shown(ident)

    # The figures from Redis are settled by now; the listener counts a firing in memory
    # just after committing it.
    wait_for(
        lambda: shown_fresh("fired-last-minute") == str(len(APPLIED)),
        WAIT_S,
        interval_s=0.2,
        what="applied firings counted",
    )
    assert browser.title == "delayq"
    assert shown("pending") == str(len(PENDING))
    assert shown("dead-lettered") == str(len(DEAD))
    assert shown("listeners-alive") == "1"
    assert shown("overdue") == "0"
    assert shown("in-flight") == "0"
    assert float(shown("lateness-p50")) >= 0 and float(shown("lateness-p99")) >= 0
    next_due = datetime.strptime(shown("next-due"), "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=UTC)
    in_an_hour = datetime.now(UTC) + timedelta(hours=1)
    assert abs(next_due - in_an_hour) < timedelta(minutes=1), next_due
    assert listening.proc is not None and f":{listening.proc.pid}" in shown("listeners")
    dead_table = shown("dead")
    for sn in DEAD:
        assert f"{sn}:cancel" in dead_table
    assert "denied" in dead_table  # the last error: the revoked privilege
    assert not any(sn in dead_table for sn in (*APPLIED, *PENDING))
    png = _full_page_png(browser)
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    (tmp_path / "dashboard.png").write_bytes(png)
    keep_dir = os.environ.get("DELAYQ_SCREENSHOT_DIR")
    if keep_dir:
        Path(keep_dir).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "dashboard.png", Path(keep_dir) / "dashboard.png")

    # The page reloads itself every few seconds: act right after a fresh load, as a
    # person at the keyboard would.
    def requeue_with(token: str) -> None:
        browser.get(base)
        field = browser.find_element(By.ID, "token")
        assert field.get_attribute("type") == "password"
        field.send_keys(token)
        browser.find_element(By.ID, "requeue").click()

    # -- a wrong token is refused and re-queues nothing -----------------------------------
    assert _post_requeue(base, "not-the-token") == 403
    assert _post_requeue(base, None) == 403
    requeue_with("not-the-token")
    wait_for(
        lambda: "refused" in text_of(By.TAG_NAME, "body"),
        WAIT_S,
        what="the refusal shown",
    )
    assert client.hlen(Keys().dead) == len(DEAD)
    assert statuses(DEAD) == {"unpaid"}

    # -- the right token re-queues them, and they fire ------------------------------------
    requeue_with(TOKEN)
    wait_for(
        lambda: f"requeued={len(DEAD)}" in browser.current_url, WAIT_S, what="re-queue redirect"
    )
    assert shown("notice") == f"Re-queued {len(DEAD)} dead-lettered timers."
    wait_for(
        lambda: shown_fresh("dead-lettered") == "0", WAIT_S, interval_s=0.2, what="0 dead shown"
    )
    wait_for(lambda: statuses(DEAD) == {"cancelled"}, WAIT_S, what="re-queued orders cancelled")
    assert statuses(PENDING) == {"unpaid"}
    wait_for(
        lambda: shown_fresh("fired-last-minute") == str(len(APPLIED) + len(DEAD)),
        WAIT_S,
        interval_s=0.2,
        what="all firings counted",
    )
    assert shown("pending") == str(len(PENDING))
    assert shown("dead") == "none"

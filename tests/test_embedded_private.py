"""The embedded Redis keeps to the user: its data directory is private, and when that
directory is too deep for a unix socket, the socket goes to a private per-user directory,
never to a guessable name in /tmp where another user's server could answer."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from delayq.embedded import socket_path
from tests.harness import clean_env, run_cli
from tests.servers import RedisFactory

NOT_READY = 4
#: Deep enough that DELAYQ_HOME/redis.sock does not fit in a unix socket address.
DEEP = "d" * 60 + "/" + "e" * 60


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """XDG_RUNTIME_DIR for the test: short, so that the socket path fits, and its own."""
    path = Path(tempfile.mkdtemp(prefix="dq-run-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def embedded_env(tmp_path: Path) -> Iterator[Callable[..., dict[str, str]]]:
    """Makes environments on the embedded defaults; stops every embedded Redis after."""
    made: list[dict[str, str]] = []

    def make(home: Path) -> dict[str, str]:
        # XDG_RUNTIME_DIR comes from the test's own environment (monkeypatched).
        binary = shutil.which("redis-server")
        assert binary, "redis-server is part of the test set-up"
        env = clean_env(HOME=str(home), REDIS_SERVER_BIN=binary)
        made.append(env)
        return env

    yield make
    for env in made:
        run_cli("embedded", "stop", env=env)


def _assert_private_dir(path: Path) -> None:
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode), f"{path} is not a real directory"
    assert st.st_uid == os.getuid(), f"{path} is owned by uid {st.st_uid}"
    assert stat.S_IMODE(st.st_mode) == 0o700, f"{path} has mode {stat.S_IMODE(st.st_mode):o}"


def test_a_fresh_data_directory_is_created_private(
    tmp_path: Path, embedded_env: Callable[..., dict[str, str]]
) -> None:
    home = tmp_path / "fresh" / "delayq"
    env = embedded_env(home)

    done = run_cli("schedule", "P1", "--in", "1h", env=env)

    assert done.returncode == 0, done.stdout + done.stderr
    _assert_private_dir(home)
    assert socket_path(home).parent == home.resolve()


@pytest.mark.parametrize("where", ["xdg_runtime_dir", "tmp"])
def test_a_deep_data_directory_puts_the_socket_in_a_private_directory_of_ours(
    where: str,
    tmp_path: Path,
    runtime_dir: Path,
    embedded_env: Callable[..., dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if where == "xdg_runtime_dir":
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime_dir))
        expected = runtime_dir / "delayq"
    else:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        expected = Path(f"/tmp/delayq-{os.getuid()}")
    home = tmp_path / DEEP
    env = embedded_env(home)

    done = run_cli("schedule", "P1", "--in", "1h", env=env)

    assert done.returncode == 0, done.stdout + done.stderr
    sock = socket_path(home)
    assert stat.S_ISSOCK(os.lstat(sock).st_mode), sock
    with redis.Redis(unix_socket_path=str(sock), socket_timeout=5) as client:
        assert client.pttl("P1:cancel") > 0, "the timer is in the embedded Redis"
    assert sock.parent == expected
    _assert_private_dir(sock.parent)
    assert not sock.parent.is_relative_to(home)


def _make_hostile(kind: str, target: Path, decoy: Path) -> Path:
    """`target` made unsafe as `kind`; returns the directory an impostor's socket goes in."""
    if kind == "symlink":
        decoy.mkdir(mode=0o700)
        target.symlink_to(decoy)
        return decoy
    target.mkdir()
    if kind == "group_and_world_writable":
        target.chmod(0o777)
    elif kind == "readable_by_others":
        target.chmod(0o755)
    elif kind == "owned_by_another_user":
        if os.getuid() != 0:
            pytest.skip("giving a directory to another user needs root")
        target.chmod(0o700)
        os.chown(target, 65534, 65534)
    return target


@pytest.mark.parametrize(
    "kind",
    ["symlink", "group_and_world_writable", "readable_by_others", "owned_by_another_user"],
)
def test_a_socket_directory_someone_else_could_control_is_refused_in_one_line(
    kind: str,
    tmp_path: Path,
    runtime_dir: Path,
    redis_factory: RedisFactory,
    embedded_env: Callable[..., dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime_dir))
    home = tmp_path / DEEP
    env = embedded_env(home)
    private = runtime_dir / "delayq"
    impostor_dir = _make_hostile(kind, private, runtime_dir / "decoy")
    # An impostor's server already answers where delayq's socket would be.
    sock = impostor_dir / socket_path(home).name
    impostor = redis_factory(extra={"unixsocket": str(sock), "unixsocketperm": "777"})

    done = run_cli("schedule", "P1", "--in", "1h", env=env)

    assert done.returncode == NOT_READY, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("delayq: error: "), lines[0]
    assert str(private) in lines[0] and "private" in lines[0], lines[0]
    assert impostor.client().dbsize() == 0, "delayq talked to the impostor's server"


def test_a_command_with_another_runtime_dir_does_not_start_a_second_server_on_the_same_data(
    tmp_path: Path,
    embedded_env: Callable[..., dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A login shell has XDG_RUNTIME_DIR, a cron job does not: the socket of a deep data
    # directory is then looked for elsewhere, and two servers on one AOF would corrupt it.
    home = tmp_path / DEEP
    first, second = tmp_path / "run-a", tmp_path / "run-b"
    for path in (first, second):
        path.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(first))
    env_a = embedded_env(home)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(second))
    env_b = embedded_env(home)
    assert run_cli("schedule", "P1", "--in", "1h", env=env_a).returncode == 0

    done = run_cli("schedule", "P2", "--in", "1h", env=env_b)

    assert done.returncode == NOT_READY, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "already runs" in lines[0], lines[0]
    assert not socket_path(home).exists(), "a second server was started"

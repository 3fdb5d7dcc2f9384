"""Each peer's own environment, made by the harness and reused while its pins match.

Python peers: a virtualenv per peer under `.envs/NAME`, from `requirements/NAME.txt`
(every package pinned, `pip freeze` of a fresh install). BullMQ: `npm ci` in `bullmq/`
from its committed package-lock.json. A stamp file records what an environment was built
from (the requirements text, or the lock file, and the interpreter); a different stamp
means the environment is built again from scratch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements"
BULLMQ_DIR = HERE / "bullmq"
DEFAULT_ENVS_DIR = HERE / ".envs"
STAMP = ".delayq-peers-stamp"
#: Bounds on environment builds (pip from PyPI; npm compiles better-sqlite3, ~1 min).
INSTALL_TIMEOUT_S = 900


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    try:
        subprocess.run(
            cmd,
            cwd=cwd,
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=INSTALL_TIMEOUT_S,
        )
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: {' | '.join(tail)}") from None


def python_env(name: str, envs_dir: Path = DEFAULT_ENVS_DIR) -> Path:
    """The peer's virtualenv (made or rebuilt if needed); returns its bin directory."""
    requirements = REQUIREMENTS / f"{name}.txt"
    env = envs_dir / name
    stamp = _digest(requirements.read_bytes(), sys.version.encode())
    stamp_file = env / STAMP
    if stamp_file.is_file() and stamp_file.read_text() == stamp:
        return env / "bin"
    if env.exists():
        shutil.rmtree(env)
    envs_dir.mkdir(parents=True, exist_ok=True)
    # The harness's own interpreter makes the venv (a venv of a venv is based on the
    # same base Python): the peers run on the Python that delayq runs on.
    _run([sys.executable, "-m", "venv", str(env)])
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--no-input"]
    _run([*pip, "--no-deps", "-r", str(requirements)])
    _run([str(env / "bin" / "python"), "-m", "pip", "check"])
    stamp_file.write_text(stamp)
    return env / "bin"


def node_modules() -> Path:
    """BullMQ's node_modules from package-lock.json (npm ci when needed)."""
    lock = BULLMQ_DIR / "package-lock.json"
    modules = BULLMQ_DIR / "node_modules"
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        raise RuntimeError("BullMQ needs node and npm on PATH")
    version = subprocess.run(
        [node, "--version"], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    stamp = _digest(lock.read_bytes(), version.encode())
    stamp_file = modules / STAMP
    if stamp_file.is_file() and stamp_file.read_text() == stamp:
        return modules
    # npm ci removes node_modules first. better-sqlite3 has no prebuilt binary it can
    # fetch here, so its install script compiles it (node-gyp, ~1 minute).
    _run([npm, "ci", "--no-audit", "--no-fund"], cwd=BULLMQ_DIR)
    stamp_file.write_text(stamp)
    return modules


def python_versions(bin_dir: Path) -> dict[str, str]:
    """Installed distributions of a peer's virtualenv, name -> version."""
    out = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "list", "--format", "json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return {d["name"].lower(): d["version"] for d in json.loads(out) if d["name"] != "pip"}


def node_versions() -> dict[str, str]:
    """Versions of BullMQ's packages, from the lock file's resolved tree."""
    lock = json.loads((BULLMQ_DIR / "package-lock.json").read_text())
    wanted = ("bullmq", "ioredis", "better-sqlite3")
    return {
        name: lock["packages"][f"node_modules/{name}"]["version"]
        for name in wanted
        if f"node_modules/{name}" in lock["packages"]
    }

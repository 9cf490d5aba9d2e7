"""PID files under data/run/ (DATA_DIR/run/): every process the fleet verbs start is recorded, and only those
are stopped.

A recorded PID is signalled only while its command line is still the one recorded (PIDs get reused); nothing
is ever found or stopped by name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from ..config import ROOT


def _data() -> Path:
    """DATA_DIR as the workers read it (default data/ in the checkout; relative to the checkout)."""
    path = Path(os.environ.get("DATA_DIR") or "data").expanduser()
    return path if path.is_absolute() else ROOT / path


DATA = _data()
RUN = DATA / "run"


def pidfile(name: str, pid: int) -> Path:
    return RUN / f"{name}.{pid}.pid"


def record(name: str, pid: int, argv: list[str]) -> None:
    RUN.mkdir(parents=True, exist_ok=True)
    pidfile(name, pid).write_text(json.dumps({"pid": pid, "argv": argv, "started": time.time()}))


def recorded(name: str) -> list[tuple[Path, int, list[str]]]:
    out = []
    for f in sorted(RUN.glob(f"{name}.*.pid")):
        if not f.name[len(name) + 1 : -len(".pid")].isdigit():
            continue  # another worker whose name starts with ours
        try:
            info = json.loads(f.read_text())
            out.append((f, int(info["pid"]), list(info["argv"])))
        except (ValueError, KeyError):
            f.unlink(missing_ok=True)
    return out


def recorded_names() -> list[str]:
    """Every name with a PID file (workers started from env files outside envs/ included)."""
    names = {f.name[: -len(".pid")].rpartition(".")[0] for f in RUN.glob("*.*.pid")}
    return sorted(n for n in names if n)


def argv_of(proc: subprocess.Popen[bytes]) -> list[str]:
    return [str(a) for a in proc.args] if isinstance(proc.args, list) else [str(proc.args)]


def alive_as(pid: int, argv: list[str]) -> bool:
    """The PID is running and its command line is still the one we recorded (PIDs get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return [c.decode(errors="replace") for c in cmdline if c][1:] == argv[1:]


def stop_pid(pid: int, grace: float) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)

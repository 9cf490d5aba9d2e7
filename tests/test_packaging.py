"""The wheel `pip wheel .` builds: no setuptools warnings, and once installed it runs a worker outside the checkout.

    .venv/bin/python -m pytest -q tests/test_packaging.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from workers import discovery
from workers.config import ROOT
from workers.ops import broker

pytestmark = pytest.mark.model  # builds a wheel and starts a worker that loads the model


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The project's wheel, built the way a user would (`pip wheel . --no-deps`), and the build log.

    Built from a copy of the sources, so setuptools' build/ and *.egg-info stay out of the checkout."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("workers", "monitor", "cli", "gateway"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("whl")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return next(out.glob("nats_llm_fleet-*.whl")), r.stdout + r.stderr


@pytest.fixture(scope="module")
def installed(wheel: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed (without dependencies: the venv has them) into a directory of its own."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel[0])], check=True, timeout=300)
    return target


@pytest.fixture
def outside(tmp_path: Path, installed: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A working directory outside the checkout and an environment that imports the installed copy."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MODEL_", "WORKER_", "QUEUE_", "NATS_", "HTTP_", "DATA_", "PYTHON"))}
    env["PYTHONPATH"] = str(installed)
    yield cwd, env


def test_the_wheel_builds_without_setuptools_warnings(wheel: tuple[Path, str]) -> None:
    path, log = wheel
    warnings = [line for line in log.splitlines() if "Warning" in line or "!!" in line]
    assert not warnings, "\n".join(warnings)
    names = set(zipfile.ZipFile(path).namelist())
    assert {"workers/ops/fleet.py", "workers/ops/broker.py", "workers/bert_gguf.py", "workers/formats/__init__.py",
            "monitor/static/index.html", "monitor/static/app.js", "monitor/static/app.css", "cli/chat.py",
            "gateway/app.py"} <= names
    assert not any(n.startswith(("tests/", "scripts/", "envs/", "data/")) for n in names)


def test_the_installed_copy_is_what_python_imports(outside: tuple[Path, dict[str, str]], installed: Path) -> None:
    cwd, env = outside
    code = "import workers, monitor, cli, workers.config as c; print(workers.__file__); print(c.ROOT)"
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    module_file, root = r.stdout.split()
    assert Path(module_file).is_relative_to(installed), module_file
    assert Path(root) == cwd  # not a checkout: envs/ and data/ are the working directory's


async def test_an_installed_wheel_runs_a_worker_outside_the_checkout(
        outside: tuple[Path, dict[str, str]], nats_server, model_path: Path) -> None:
    cwd, env = outside
    (cwd / "my.env").write_text(f"MODEL_NAME=wheel-check\nMODEL_PATH={model_path}\nMODEL_FORMAT=raw\nHTTP_ADDR=\n"
                                f"NATS_URL={nats_server.url}\nNATS_CONNECT_TIMEOUT=10\n")
    log = cwd / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "workers", "--env", "my.env"], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        nc = await nats.connect(nats_server.url)
        try:
            online = await discovery.wait_online(nc, "wheel-check", pid=proc.pid, timeout=120,
                                                 alive=lambda: proc.poll() is None)
            assert online, log.read_text(errors="replace")
            msg = await nc.request("inference.request.wheel-check",
                                   json.dumps({"input": "The sky is", "params": {"max_tokens": 4}}).encode(),
                                   timeout=120)
            reply = json.loads(msg.data)
            assert not reply.get("error") and reply["tokens_out"] > 0, reply
        finally:
            await nc.close()
    finally:
        broker.stop(proc, grace=30)
    assert (cwd / "data" / "logs" / "wheel-check.sqlite").is_file()  # DATA_DIR defaults to the working directory

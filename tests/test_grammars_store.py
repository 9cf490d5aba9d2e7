"""Stored grammars never touch the shipped ones, above all with the env file's own defaults.

Every other worker test gets a temporary DATA_DIR, which hid that the default one (the checkout's data/) made the
store's folder *the* shipped data/grammars/. The last test here runs a worker as `make <worker>` does: no DATA_DIR,
the env file's MODEL_PATH, only NATS_URL and HTTP_ADDR pointed at this test's server and a free port. It writes
into the checkout's data/: one uniquely named grammar, and the worker's SQLite log in data/logs/ (both removed
again, the log only if the test made it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from workers.config import ROOT, Settings
from workers.grammars import APART, SHIPPED, GrammarStore
from workers.ops import broker

from .conftest import GEMMA_ENV, NatsServer, WorkerProc, wait_online

CHECKOUT_DATA = ROOT / "data"
SETTING_KEYS = {name.upper() for name in Settings.model_fields}


def compiles(_text: str) -> None:
    return None


def shipped_bytes() -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(SHIPPED.iterdir())}


def test_with_the_default_data_dir_the_store_keeps_apart_from_the_shipped_folder():
    assert Settings.model_fields["data_dir"].default / "grammars" == SHIPPED  # the collision this guards
    store = GrammarStore(CHECKOUT_DATA / "grammars", compiles)
    assert store.user_dir == CHECKOUT_DATA / APART and store.shipped_dir == SHIPPED


def test_any_other_data_dir_keeps_its_grammars_folder(tmp_path: Path):
    assert GrammarStore(tmp_path / "grammars", compiles).user_dir == tmp_path / "grammars"


async def test_a_store_given_the_shipped_folder_writes_and_deletes_only_beside_it(tmp_path: Path):
    shipped = tmp_path / "data" / "grammars"
    shipped.mkdir(parents=True)
    (shipped / "json.gbnf").write_text('root ::= "{}"')
    store = GrammarStore(shipped, compiles, shipped_dir=shipped)
    assert not await store.put("mine", 'root ::= "a"')
    assert await store.put("mine", 'root ::= "b"')  # replaced: still a stored grammar, still writable
    assert (tmp_path / "data" / APART / "mine.gbnf").read_text() == 'root ::= "b"'
    assert store.names() == {"mine": "stored", "json": "shipped"} and store.get("mine") == 'root ::= "b"'
    assert store.delete("mine") and store.get("mine") is None
    assert sorted(p.name for p in shipped.iterdir()) == ["json.gbnf"]


@pytest.mark.model
async def test_a_worker_on_the_env_files_defaults_never_writes_or_deletes_shipped_grammars(
        nats_server: NatsServer, model_path: Path, tmp_path: Path):
    """PUT and DELETE of a shipped name are a 403; a stored grammar lands in data/grammars-user/, and can be read
    back, replaced and deleted there; data/grammars/ is byte for byte what it was."""
    assert model_path == ROOT / "data" / "models" / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"  # the env file's
    before = shipped_bytes()
    made = [d for d in (CHECKOUT_DATA / APART, CHECKOUT_DATA / "logs") if not d.exists()]  # removed after, if empty
    db = CHECKOUT_DATA / "logs" / "gemma3-270m.sqlite"
    ours = [] if db.exists() else [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
    name = f"test-{uuid.uuid4().hex[:12]}"
    mine = [CHECKOUT_DATA / APART / f"{name}.gbnf", SHIPPED / f"{name}.gbnf"]  # where it goes; where it went
    port = broker.free_port()
    env = {k: v for k, v in os.environ.items() if k not in SETTING_KEYS}
    env.update(NATS_URL=nats_server.url, HTTP_ADDR=f"127.0.0.1:{port}", NATS_CONNECT_TIMEOUT="10")
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "workers", "--env", str(GEMMA_ENV)], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)
    w = WorkerProc(proc, "gemma3-270m", env, log, CHECKOUT_DATA)
    try:
        await wait_online(nats_server.url, w)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            for r in [await http.put("/grammars/json", content='root ::= "x"'), await http.delete("/grammars/json"),
                      await http.post("/grammars", json={"name": "yes_no", "gbnf": 'root ::= "x"'})]:
                assert r.status_code == 403 and r.json()["error"]["type"] == "read_only", r.text
            assert (await http.put(f"/grammars/{name}", content='root ::= "a"')).status_code == 201
            assert not mine[1].exists(), f"stored into the shipped folder: {mine[1]}"
            assert mine[0].read_text() == 'root ::= "a"'
            listed = {g["name"]: g["source"] for g in (await http.get("/grammars")).json()["grammars"]}
            assert listed[name] == "stored" and listed["json"] == "shipped", listed
            assert (await http.put(f"/grammars/{name}", content='root ::= "b"')).status_code == 200
            assert (await http.get(f"/grammars/{name}")).json() == {"name": name, "gbnf": 'root ::= "b"'}
            assert (await http.delete(f"/grammars/{name}")).status_code == 204
            assert (await http.get(f"/grammars/{name}")).status_code == 404 and not mine[0].exists()
            assert (await http.get("/grammars/json")).json()["gbnf"] == before["json.gbnf"].decode()
    finally:
        w.terminate()
        for f in mine + ours:
            f.unlink(missing_ok=True)
        for d in made:
            if d.exists() and not any(d.iterdir()):
                d.rmdir()
    assert shipped_bytes() == before

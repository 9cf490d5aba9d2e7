"""nats-chat as `ollama run`: conversations, /commands, Ctrl+C, Ctrl+D, a real terminal, flags, deadlines.

One nats-server and one gemma3-270m worker (one slot) for the module; every CLI is a real subprocess."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import select
import signal
import sqlite3
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli.client import duration
from workers.config import ROOT
from workers.ops import broker

from .conftest import GEMMA_ENV, GEMMA_TEMPLATE, WorkerProc, serve_nats, wait_online

NATS_CHAT = str(Path(sys.executable).parent / "nats-chat")
MODEL = "gemma3-270m"  # until the chat default (smollm2-135m) ships, the tests name the model they start


@dataclass
class Fleet:
    url: str
    worker: WorkerProc
    home: Path  # XDG_STATE_HOME of the CLIs: the history file lands here

    def env(self) -> dict[str, str]:
        return {**os.environ, "NATS_CHAT_MODEL": MODEL, "XDG_STATE_HOME": str(self.home), "NATS_URL": self.url}

    def rows(self, marker: str, n: int, timeout: float = 10) -> list[sqlite3.Row]:
        """The worker's request rows whose raw input holds `marker`, once there are `n` (the store writes late)."""
        ends = time.monotonic() + timeout
        while True:
            if self.worker.db.exists():
                with sqlite3.connect(self.worker.db) as db:
                    db.row_factory = sqlite3.Row
                    rows = db.execute("SELECT * FROM requests WHERE raw_input LIKE ? ORDER BY id",
                                      (f"%{marker}%",)).fetchall()
                if len(rows) >= n or time.monotonic() > ends:
                    return rows
            time.sleep(0.2)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("chat")
    servers = serve_nats(tmp)
    server = next(servers)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_", "WORKER_", "QUEUE_"))}
    env.update(NATS_URL=server.url, DATA_DIR=str(tmp / "data"), MODEL_PATH=str(model_path), HTTP_ADDR="",
               PROMPT_TEMPLATE=str(GEMMA_TEMPLATE), WORKER_CONCURRENCY="1", NATS_CONNECT_TIMEOUT="10")
    log = tmp / "worker.log"
    proc = subprocess.Popen([sys.executable, "-m", "workers", "--env", str(GEMMA_ENV)], env=env, cwd=ROOT,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    worker = WorkerProc(proc, MODEL, env, log, tmp / "data")
    try:
        asyncio.run(wait_online(server.url, worker))
        yield Fleet(server.url, worker, tmp / "state")
    finally:
        worker.kill()
        next(servers, None)


def chat(fleet: Fleet, *args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NATS_CHAT, *args], input=stdin, env=fleet.env(), capture_output=True, text=True,
                          timeout=timeout)


def lines(*text: str) -> str:
    return "".join(t + "\n" for t in text)


def read_until(fd: int, needle: bytes, timeout: float = 30, seen: bytes = b"") -> bytes:
    """Bytes from `fd` until `needle` shows up (AssertionError after `timeout`)."""
    ends = time.monotonic() + timeout
    while needle not in seen:
        left = ends - time.monotonic()
        assert left > 0, f"{needle!r} not seen in {timeout} s; got {seen[-400:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # a pty whose other side closed
                chunk = b""
            assert chunk, f"closed before {needle!r}; got {seen[-400:]!r}"
            seen += chunk
    return seen


# --- without a worker ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [("3s", 3.0), ("500ms", 0.5), ("2m", 120.0), ("1h30m", 5400.0),
                                               ("1.5s", 1.5), ("30", 30.0), ("0.25", 0.25)])
def test_timeout_takes_go_durations_and_plain_seconds(text: str, seconds: float) -> None:
    assert duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("args", [["-timeout", "3x", "hi"], ["-timeout", "0", "hi"], ["--timeout", "-1s", "hi"],
                                  ["--bogus", "hi"], ["-max-tokens", "many", "hi"]])
def test_a_bad_flag_is_one_line_and_exit_2(args: list[str]) -> None:
    r = subprocess.run([NATS_CHAT, "-s", f"nats://127.0.0.1:{broker.free_port()}", *args], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("nats-chat: ") and r.stderr.count("\n") == 1 and "usage" not in r.stderr, r.stderr


def test_no_nats_server_is_one_line_that_says_make_up() -> None:
    for args in (["hi"], ["-i"]):
        r = subprocess.run([NATS_CHAT, "-s", f"nats://127.0.0.1:{broker.free_port()}", *args], input="hi\n",
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "no NATS server" in r.stderr and "make up" in r.stderr
        assert r.stderr.count("\n") == 1, r.stderr


# --- with the module's worker -------------------------------------------------------------------------------------

@pytest.mark.model
def test_streamed_answers_leave_stderr_empty(fleet: Fleet) -> None:
    one = chat(fleet, "Say hello.", "-max-tokens", "6")
    assert one.returncode == 0 and one.stdout.strip() and one.stderr == "", one.stderr
    many = chat(fleet, "-i", "-max-tokens", "4", stdin=lines("Hi.", "How are you?", "/bye"))
    assert many.returncode == 0 and many.stdout.count("\n") >= 2 and many.stderr == "", many.stderr


@pytest.mark.model
def test_a_conversation_sends_its_history_and_clear_forgets_it(fleet: Fleet) -> None:
    r = chat(fleet, "-i", stdin=lines("/set temperature 0", "/set max_tokens 3", "/set top_k 5",
                                      "/set system Answer like a pirate.", "My name is Zorblax-h1.",
                                      "What is my name?", "/clear", "Who am I? h1"))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    first, second, third = fleet.rows("h1", 3)
    assert json.loads(second["params_json"]) == {"temperature": 0.0, "max_tokens": 3, "top_k": 5}
    sent = json.loads(second["raw_input"])["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[0]["content"] == "Answer like a pirate." and sent[2]["content"] == first["response_text"]
    assert second["formatted_input"].count("<start_of_turn>user") == 2 and "Zorblax" in second["formatted_input"]
    assert "Zorblax" not in third["formatted_input"]


@pytest.mark.model
def test_save_and_load_bring_a_conversation_back(fleet: Fleet, tmp_path: Path) -> None:
    saved = tmp_path / "talk.json"
    r = chat(fleet, "-i", "-max-tokens", "3", stdin=lines("Remember the word pineapple-s1.", f"/save {saved}",
                                                          "/clear", f"/load {tmp_path / 'missing.json'}",
                                                          f"/load {saved}", "Which word? s1", "/exit"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("\n") == 1 and "cannot read" in r.stderr  # the missing file: one line, session goes on
    talk = json.loads(saved.read_text())
    assert [m["role"] for m in talk["messages"]] == ["user", "assistant"] and talk["params"] == {"max_tokens": 3}
    _, last = fleet.rows("s1", 2)
    assert "pineapple-s1" in last["formatted_input"] and "Which word? s1" in last["formatted_input"]


@pytest.mark.model
def test_triple_quotes_make_one_message_of_several_lines(fleet: Fleet) -> None:
    r = chat(fleet, "-i", "-max-tokens", "2", stdin=lines('"""', "first line m1", "", "second line", '"""'))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    (row,) = fleet.rows("m1", 1)
    assert json.loads(row["raw_input"])["messages"] == [{"role": "user", "content": "first line m1\n\nsecond line"}]


@pytest.mark.model
def test_show_help_and_unknown_commands(fleet: Fleet) -> None:
    r = chat(fleet, "-i", "-temperature", "0.3", stdin=lines("/show", "/?", "/nope", "/set temperature warm"))
    assert r.returncode == 0
    assert "architecture" in r.stdout and "gemma3" in r.stdout and "Q4_K_M" in r.stdout  # from the health reply
    assert fleet.worker.model in r.stdout and "temperature" in r.stdout and "0.3" in r.stdout
    assert "/set system" in r.stdout and '"""' in r.stdout  # the help
    assert r.stderr.count("\n") == 2 and "/nope" in r.stderr and "'warm' is not a float" in r.stderr, r.stderr


@pytest.mark.model
def test_verbose_prints_ttft_and_tokens_per_second(fleet: Fleet) -> None:
    r = chat(fleet, "--verbose", "-max-tokens", "5", "-temperature", "0", "Count to ten.")
    assert r.returncode == 0 and "5 out" in r.stderr and "TTFT " in r.stderr and "tok/s" in r.stderr, r.stderr


@pytest.mark.model
def test_ctrl_c_at_an_idle_prompt_exits_0(fleet: Fleet) -> None:
    proc = subprocess.Popen([NATS_CHAT, "-i"], env=fleet.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin and proc.stdout
    proc.stdin.write(b"/?\n")
    proc.stdin.flush()
    read_until(proc.stdout.fileno(), b"begin and end")  # the help is out: the session waits for the next line
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0
    assert proc.stderr and proc.stderr.read() == b""


@pytest.mark.model
def test_ctrl_c_while_generating_cancels_it_at_the_worker_and_returns_to_the_prompt(fleet: Fleet) -> None:
    proc = subprocess.Popen([NATS_CHAT, "-i", "-max-tokens", "400"], env=fleet.env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin and proc.stdout and proc.stderr
    # counting runs long for sure: a story can end before the Ctrl+C arrives
    proc.stdin.write(b"Count from 1 to 400, one number after another. qc1\n")
    proc.stdin.flush()
    assert select.select([proc.stdout], [], [], 60)[0] and os.read(proc.stdout.fileno(), 64)  # it is generating
    proc.send_signal(signal.SIGINT)
    assert b"cancelled" in read_until(proc.stderr.fileno(), b"cancelled", timeout=10)
    proc.stdin.write(b"/set max_tokens 2\nHello qc1\n")
    proc.stdin.close()
    assert proc.wait(60) == 0
    assert proc.stderr.read() == b""  # nothing after "cancelled": no traceback from the abandoned wait
    cancelled, after = fleet.rows("qc1", 2)
    assert cancelled["status"] == "cancelled" and cancelled["finish_reason"] == "cancelled"
    assert 0 < cancelled["tokens_out"] < 400
    assert after["status"] == "ok" and after["tokens_out"] == 2  # back at the prompt, the next message ran
    with sqlite3.connect(fleet.worker.db) as db:
        states = [json.loads(m)["state"] for (m,) in db.execute(
            "SELECT meta FROM events WHERE code = 'request.cancel' AND meta LIKE ?",
            (f"%{cancelled['req_id']}%",))]
    assert states == ["running"]


@pytest.mark.model
def test_ctrl_c_during_a_one_shot_answer_cancels_it_and_exits_130_quietly(fleet: Fleet) -> None:
    proc = subprocess.Popen([NATS_CHAT, "-max-tokens", "400", "Write a very long story about rivers. qo1"],
                            env=fleet.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout and proc.stderr
    assert select.select([proc.stdout], [], [], 60)[0] and os.read(proc.stdout.fileno(), 64)  # it is generating
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 130
    assert proc.stderr.read() == b""
    (row,) = fleet.rows("qo1", 1)
    assert row["status"] == "cancelled" and 0 < row["tokens_out"] < 400


@pytest.mark.model
def test_a_caller_who_gave_up_is_never_generated_for(fleet: Fleet) -> None:
    busy = subprocess.Popen([NATS_CHAT, "--no-stream", "-max-tokens", "16", "Tell me about whales. qd1"],
                            env=fleet.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # the one slot is busy with it
    r = chat(fleet, "-timeout", "500ms", "--no-stream", "Hello qd1")
    assert r.returncode == 4 and "within 0.5 s" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert busy.wait(120) == 0
    done = {json.loads(row["raw_input"])["input"]: row for row in fleet.rows("qd1", 2, timeout=30)}
    gave_up = done["Hello qd1"]
    assert gave_up["status"] == "expired" and gave_up["tokens_out"] == 0 and "deadline" in gave_up["error"]


DONE_EDITING = b"\x1b[?2004l"  # prompt_toolkit turns bracketed paste off when a line is entered


def read_more(fd: int, seen: bytes, n: int = 4, timeout: float = 60) -> bytes:
    """At least `n` bytes beyond `seen` (what was read past some point already)."""
    ends = time.monotonic() + timeout
    while len(seen) < n:
        assert select.select([fd], [], [], max(0.0, ends - time.monotonic()))[0], f"no output in {timeout} s"
        seen += os.read(fd, 4096)
    return seen


def _controlling_tty() -> None:
    """In the child: a session of its own whose terminal is the pty, so Ctrl+C typed there is its SIGINT."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.model
def test_a_real_terminal_cancels_on_ctrl_c_keeps_history_and_leaves_on_ctrl_c_and_ctrl_d(fleet: Fleet) -> None:
    for typed, leave in ((b"Write a long story about ships. t1", b"\x03"), (b"\x1b[A", b"\x04")):
        # the second session recalls the first one's line with arrow-up, from the history file
        master, slave = pty.openpty()
        env = {**fleet.env(), "TERM": "xterm-256color", "PROMPT_TOOLKIT_NO_CPR": "1"}
        proc = subprocess.Popen([NATS_CHAT, "-max-tokens", "300"], env=env, stdin=slave, stdout=slave,
                                stderr=slave, preexec_fn=_controlling_tty)
        os.close(slave)
        try:
            seen = read_until(master, b">>> ")
            os.write(master, typed + b"\r")
            seen = read_until(master, DONE_EDITING, seen=seen)
            read_more(master, seen[seen.index(DONE_EDITING) + len(DONE_EDITING):])  # it is answering
            os.write(master, b"\x03")  # Ctrl+C while generating: the terminal sends SIGINT
            seen = read_until(master, b"cancelled")
            seen = read_until(master, b">>> ", seen=seen[seen.index(b"cancelled"):])  # back at the prompt
            assert b"Traceback" not in seen and b"never retrieved" not in seen
            os.write(master, leave)  # at an empty prompt: Ctrl+C, then Ctrl+D, leave
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            os.close(master)
    assert (fleet.home / "nats-chat" / "history").read_text().count("+Write a long story about ships. t1") == 1
    rows = fleet.rows("ships. t1", 2)
    assert [(r["status"], r["finish_reason"]) for r in rows] == [("cancelled", "cancelled")] * 2
    assert all(0 < r["tokens_out"] < 300 for r in rows)

"""Gateway routing (issue 16 item 2): role aliases, `auto` with a task type, strategies, fallback and the breaker.

The fast tests drive routing.py on its own: the breaker on an injected clock, the roles file's refusals, and the
strategies' order over a real Registry fed worker heartbeats (as the monitor's registry tests feed it). The model
tests run one nats-server, two inference workers of different models (smollm2-135m with one slot, gemma3-270m), a
third (`smollm2-spare`) that is stopped with SIGSTOP for the breaker, and one gateway whose roles file is written
here; what answered is the response's `model`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.aio.subscription import Subscription

from gateway.config import load_settings as gateway_settings
from gateway.routing import Breakers, Roles, Router, load_roles
from monitor.config import load_settings as monitor_settings
from monitor.registry import Registry, decode_health
from workers import protocol as p
from workers.config import ROOT, load_settings
from workers.modelfile import resolve
from workers.settings import ConfigError

from .conftest import GEMMA_ENV, GEMMA_TEMPLATE, WorkerProc, serve_nats, wait_online
from .gateway_support import GatewayProc, models, spawn_worker, start_gateway, until

SMOL, GEMMA, SPARE = "smollm2-135m", "gemma3-270m", "smollm2-spare"
SMOL_ENV = ROOT / "envs" / "worker.smollm2-135m.env"
FAILURES, COOLDOWN_S = 2, 3.0
ROLES = f"""
[roles]
primary = ["{SMOL}"]
fast = ["{SMOL}", "{GEMMA}"]
coder = ["{GEMMA}"]
ghosted = ["nobody-serves-this", "{GEMMA}"]
breaking = ["{SPARE}", "{SMOL}"]

[task_types]
chat = "fast"
code = "coder"
"""


# --- the breaker, on a clock the test turns ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_n_failures_then_lets_one_trial_through_per_cooldown() -> None:
    clock = Clock()
    b = Breakers(failures=3, cooldown_s=30, clock=clock)
    for _ in range(2):
        b.record("m", ok=False)
    assert b.state("m") == "closed" and b.allow("m")
    b.record("m", ok=False)
    assert b.state("m") == "open" and not b.allow("m")
    clock.now += 29.9
    assert not b.allow("m")
    clock.now += 0.2
    assert b.state("m") == "half_open"
    assert b.allow("m") and not b.allow("m"), "half-open lets exactly one trial through"
    b.record("m", ok=False)  # the trial failed: another full cool-down
    assert b.state("m") == "open" and not b.allow("m")
    clock.now += 30.1
    assert b.allow("m")
    b.record("m", ok=True)
    assert b.state("m") == "closed" and b.allow("m") and b.allow("m")
    assert b.state("other") == "closed"


def test_a_success_resets_the_count_and_an_abandoned_trial_frees_the_way_after_a_cooldown() -> None:
    clock = Clock()
    b = Breakers(failures=2, cooldown_s=10, clock=clock)
    for ok in (False, True, False):
        b.record("m", ok=ok)
    assert b.state("m") == "closed"
    b.record("m", ok=False)
    assert b.state("m") == "open"
    clock.now += 10
    assert b.allow("m") and not b.allow("m")  # the trial's outcome never comes (its client went away)
    clock.now += 10
    assert b.allow("m")


# --- the roles file ---------------------------------------------------------------------------------------------


def test_the_shipped_roles_file_loads_and_a_missing_one_means_no_roles(tmp_path: Path) -> None:
    shipped = load_roles(ROOT / "envs" / "roles.toml")
    assert set(shipped.roles) >= {"primary", "fast", "coder", "thinker", "longctx"}
    assert shipped.task_types["code"] == "coder" and shipped.roles["embedder"] == ["minilm-l6-v2"]
    assert load_roles(tmp_path / "absent.toml") == Roles()


@pytest.mark.parametrize(("text", "problem"), [
    ("[roles\nfast = []", "not valid TOML"),
    ("[roles]\nfast = []", "role fast must be a non-empty list of model names"),
    ("[roles]\nfast = \"smollm2-135m\"", "role fast must be a non-empty list"),
    ("[roles]\nfast = [\"smollm2 135m\"]", "role fast must be a non-empty list"),
    ("[roles]\nauto = [\"smollm2-135m\"]", "'auto' cannot be a role name"),
    ("[roles]\nfast = [\"a\"]\na = [\"b\"]", "'a' cannot be a role name"),
    ("[roles]\nfast = [\"a\"]\n[task_types]\ncode = \"coder\"", "task type code maps to 'coder', which is not a role"),
    ("[rolez]\nfast = [\"a\"]", "unknown table [rolez]"),
])
def test_a_malformed_roles_file_is_one_config_error_naming_the_file(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "roles.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_roles(path)
    message = str(e.value)
    assert message.startswith(f"GATEWAY_ROLES_FILE={path}: ") and problem in message and "\n" not in message


def test_a_malformed_roles_file_stops_the_gateway_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "roles.toml"
    path.write_text("[roles]\nfast = []\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_ROLES_FILE=str(path), NATS_URL="nats://127.0.0.1:9")  # refused before it connects
    done = subprocess.run([sys.executable, "-m", "gateway"], env=env, cwd=ROOT, capture_output=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr.decode().splitlines() == [f"error: GATEWAY_ROLES_FILE={path}: role fast must be a non-empty "
                                                 "list of model names, like fast = [\"smollm2-135m\", \"gemma3-270m\"]"]


# --- strategies over a registry fed heartbeats -------------------------------------------------------------------


def heartbeat(worker_id: str, model: str, *, kind: str = "inference", wait: float | None = 0.0, pending: int = 0,
              capabilities: tuple[str, ...] = ("text-generation", "chat"), status: str = "online") -> Any:
    body: dict[str, Any] = {
        "model_name": model, "worker_id": worker_id, "kind": kind, "status": status,
        "capabilities": list(capabilities), "nats_topic": f"{kind}.request.{model}", "version": "0",
        "model_info": {}, "started_at": 0.0, "uptime_s": 1.0, "heartbeat_interval_s": 60.0, "seq": 1,
        "queue_metrics": {"pending_messages": pending, "active_processing": min(pending, 1), "queue_capacity": 100,
                          "total_processed": 0, "total_failed": 0},
        "backpressure_status": {"level": "healthy", "utilization": pending / 100, "expected_wait_s": wait},
    }
    return decode_health(json.dumps(body).encode())


def router(*bodies: Any, roles: dict[str, list[str]], routing: str = "least_busy") -> Router:
    registry = Registry(monitor_settings())
    for h in bodies:
        registry.observe_health(h)
    settings = gateway_settings(gateway_routing=routing)
    return Router(registry, settings, Roles(roles, {"code": "coder", "chat": "primary"}))


def refusal(r: Router, body: dict[str, Any], kind: p.Kind = "inference") -> p.BadRequest:
    with pytest.raises(p.BadRequest) as e:
        r.candidates(kind, body)
    return e.value


def test_least_busy_orders_by_expected_wait_and_puts_models_without_a_live_worker_last() -> None:
    r = router(heartbeat("a1", "a", wait=4.0, pending=3), heartbeat("a2", "a", wait=2.5, pending=3),
               heartbeat("b1", "b", wait=3.0, pending=2), heartbeat("c1", "c", wait=None, pending=1),
               heartbeat("d1", "d"), heartbeat("s1", "s", status="stopping"),
               roles={"coder": ["ghost", "s", "c", "a", "b", "d"], "primary": ["a", "b"]})
    # d idle; a's best instance waits 2.5 s; b 3 s; c queues but cannot estimate; s and ghost have no live worker
    assert r.candidates("inference", {"model": "coder"}) == ["d", "a", "b", "c", "ghost", "s"]
    assert r.candidates("inference", {"model": "auto", "task_type": "code"}) == ["d", "a", "b", "c", "ghost", "s"]
    assert r.candidates("inference", {"model": "auto"}) == ["a", "b"]  # no task type: the primary role


def test_round_robin_rotates_a_role_and_capability_match_puts_what_the_body_needs_first() -> None:
    plain, grammar = ("text-generation", "chat"), ("text-generation", "chat", "grammar-constrained")
    r = router(heartbeat("a1", "a", capabilities=plain), heartbeat("b1", "b", capabilities=plain, wait=1.0, pending=1),
               heartbeat("c1", "c", capabilities=grammar, wait=5.0, pending=5),
               roles={"fast": ["a", "b", "c", "ghost"]}, routing="round_robin")
    turns = [r.candidates("inference", {"model": "fast"}) for _ in range(4)]
    assert turns == [["a", "b", "c", "ghost"], ["b", "c", "a", "ghost"], ["c", "a", "b", "ghost"],
                     ["a", "b", "c", "ghost"]]
    match = {"model": "fast", "routing": "capability_match"}
    assert r.candidates("inference", {**match, "grammar": "root ::= \"x\""}) == ["c", "a", "b", "ghost"]
    assert r.candidates("inference", {**match, "response_format": {"type": "json_object"}})[0] == "c"
    assert r.candidates("inference", {**match, "messages": []}) == ["a", "b", "c", "ghost"]
    assert r.candidates("inference", {"model": "fast", "routing_strategy": "least_busy"}) == ["a", "b", "c", "ghost"]


def test_a_role_keeps_its_models_of_the_requests_kind_and_bad_names_are_400() -> None:
    r = router(heartbeat("a1", "a"), heartbeat("e1", "e", kind="embedding", capabilities=("embeddings",)),
               roles={"mixed": ["e", "a", "unseen"], "embedder": ["e"]})
    assert r.candidates("inference", {"model": "mixed"}) == ["a", "unseen"]
    assert r.candidates("embedding", {"model": "mixed"}) == ["e", "unseen"]
    wrong = refusal(r, {"model": "embedder"})
    assert (wrong.status, wrong.type) == (404, "wrong_model_kind") and "/v1/embeddings" in wrong.message
    assert r.candidates("inference", {"model": "thinker"}) == ["thinker"]  # not a role: a model's name
    task = refusal(r, {"model": "auto", "task_type": "poetry"})
    assert (task.status, task.type) == (400, "invalid_task_type") and "chat, code" in task.message
    strategy = refusal(r, {"model": "mixed", "routing": "fastest"})
    assert strategy.type == "invalid_routing" and "least_busy, round_robin, capability_match" in strategy.message
    assert refusal(r, {"model": "a b"}).type == "invalid_model"
    assert r.roles_of("e") == ["mixed", "embedder"] and r.roles_of("nobody") == []


# --- real processes ------------------------------------------------------------------------------------------


@dataclass
class Fleet:
    nats_url: str
    gateway: GatewayProc
    workers: dict[str, WorkerProc]




@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("routing")
    roles = tmp / "roles.toml"
    roles.write_text(ROLES)
    servers = serve_nats(tmp)
    server = next(servers)
    data = tmp / "data"
    smol = resolve(load_settings(SMOL))
    workers = {
        SMOL: spawn_worker(SMOL_ENV, server.url, data, tmp, WORKER_CONCURRENCY=1),
        GEMMA: spawn_worker(GEMMA_ENV, server.url, data, tmp, MODEL_PATH=model_path, PROMPT_TEMPLATE=GEMMA_TEMPLATE),
        # heard from once: discovery keeps it online while it is stopped (SIGSTOP) for the breaker test
        SPARE: spawn_worker(SMOL_ENV, server.url, data, tmp, MODEL_PATH=smol, MODEL_NAME=SPARE,
                            HEARTBEAT_INTERVAL=600, WORKER_CONCURRENCY=1),
    }
    gateway: GatewayProc | None = None
    try:
        for w in workers.values():
            asyncio.run(wait_online(server.url, w))
        gateway = start_gateway(server.url, tmp, GATEWAY_ROLES_FILE=roles, GATEWAY_BREAKER_FAILURES=FAILURES,
                                GATEWAY_BREAKER_COOLDOWN_S=COOLDOWN_S)
        gw = gateway
        until(lambda: {m: c["status"] for m, c in models(gw).items()} == dict.fromkeys(workers, "online"),
               "the gateway did not discover the three workers")
        yield Fleet(server.url, gateway, workers)
    finally:
        if gateway is not None:
            gateway.stop()
        for w in workers.values():
            w.kill()
        next(servers, None)


async def chat(http: httpx.AsyncClient, model: str, headers: dict[str, str] | None = None,
               **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3, **extra}
    return await http.post("/v1/chat/completions", json=body, headers=headers)


def answered_by(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    return str(resp.json()["model"])


async def report(sub: Subscription, check: Callable[[p.BackpressureReport], bool], timeout: float = 60
                 ) -> p.BackpressureReport:
    """The next backpressure report on `sub` that passes `check` (workers send one a second while busy)."""
    ends = time.monotonic() + timeout
    while True:
        msg = await sub.next_msg(timeout=max(0.1, ends - time.monotonic()))
        got = p.BackpressureReport.model_validate_json(msg.data)
        if check(got):
            return got


@pytest.mark.model
async def test_a_role_is_answered_by_its_least_busy_model(fleet: Fleet) -> None:
    # First in the module: smollm2 has served nothing yet, so with a queue it cannot estimate its wait (the longest
    # of all); after short requests its estimate would be queue × their short mean, and could beat gemma's.
    async with httpx.AsyncClient(base_url=fleet.gateway.url, timeout=120) as http:
        nc = await nats.connect(fleet.nats_url)
        reports = await nc.subscribe(p.monitoring_subject("inference", SMOL))
        inbox = await nc.subscribe(nc.new_inbox())
        busy = [p.InferenceRequest(req_id=p.new_req_id(), input="1, 2, 3, 4, 5, 6,", raw=True,
                                   params=p.Params(max_tokens=200)) for _ in range(4)]
        try:
            for req in busy:  # straight to the one-slot smollm2 worker over NATS
                await nc.publish(p.request_subject("inference", SMOL), p.dumps(req), reply=inbox.subject)
            await report(reports, lambda r: r.pending_messages >= 2)
            await asyncio.sleep(0.5)  # the gateway's discovery hears the same report
            soon = {p.H_TIMEOUT_MS: "30000"}  # were it queued behind smollm2's work, a 504 rather than a long wait
            assert answered_by(await chat(http, "fast", headers=soon)) == GEMMA
            assert answered_by(await chat(http, "auto", headers=soon, task_type="chat")) == GEMMA  # chat → fast
        finally:
            for req in busy:
                await nc.publish(p.cancel_subject("inference", SMOL), p.dumps(p.CancelRequest(req_id=req.req_id)))
            await report(reports, lambda r: r.pending_messages == 0 and r.active_processing == 0)
            await nc.close()
        await asyncio.sleep(0.5)
        assert answered_by(await chat(http, "fast")) == SMOL  # idle again: the role's own order


@pytest.mark.model
async def test_auto_picks_the_role_of_its_task_type(fleet: Fleet) -> None:
    async with httpx.AsyncClient(base_url=fleet.gateway.url, timeout=120) as http:
        assert answered_by(await chat(http, "auto", task_type="code")) == GEMMA  # code → coder
        assert answered_by(await chat(http, "auto")) == SMOL  # no task type: primary
        unknown = await chat(http, "auto", task_type="poetry")
        assert unknown.status_code == 400
        error = unknown.json()["error"]
        assert error["type"] == "invalid_task_type" and "chat, code" in error["message"]
        # a name that is not a role is a model's name, and no model has it
        assert (await chat(http, "thinker")).status_code == 404
    cards = models(fleet.gateway)
    assert cards[SMOL]["roles"] == ["primary", "fast", "breaking"] and cards[GEMMA]["roles"] == [
        "fast", "coder", "ghosted"]


@pytest.mark.model
async def test_a_role_whose_first_model_has_no_worker_is_answered_by_the_next(fleet: Fleet) -> None:
    async with httpx.AsyncClient(base_url=fleet.gateway.url, timeout=120) as http:
        for routing in ("least_busy", "round_robin", "capability_match"):
            assert answered_by(await chat(http, "ghosted", routing=routing)) == GEMMA


@pytest.mark.model
async def test_the_breaker_routes_around_a_failing_model_and_tries_it_again_after_the_cooldown(fleet: Fleet) -> None:
    spare = fleet.workers[SPARE]
    short = {p.H_TIMEOUT_MS: "500"}  # the gateway gives up on the stopped worker after 0.5 s + its grace
    os.kill(spare.proc.pid, signal.SIGSTOP)
    try:
        async with httpx.AsyncClient(base_url=fleet.gateway.url, timeout=120) as http:
            for _ in range(FAILURES):
                failed = await chat(http, "breaking", headers=short)
                assert failed.status_code == 504, failed.text  # discovery still lists it online: tried first
            opened = time.monotonic()
            closed_door = await chat(http, SPARE, headers=short)
            assert closed_door.status_code == 503 and closed_door.json()["error"]["type"] == "circuit_open"
            assert answered_by(await chat(http, "breaking")) == SMOL

            await asyncio.sleep(opened + COOLDOWN_S + 0.5 - time.monotonic())
            # half-open: of two requests at once, one is the trial (and fails), the other is refused
            both = await asyncio.gather(*(chat(http, SPARE, headers=short) for _ in range(2)))
            reopened = time.monotonic()
            assert sorted(r.status_code for r in both) == [503, 504], [r.text for r in both]
            assert (await chat(http, SPARE, headers=short)).json()["error"]["type"] == "circuit_open"

            os.kill(spare.proc.pid, signal.SIGCONT)
            await asyncio.sleep(reopened + COOLDOWN_S + 0.5 - time.monotonic())
            assert answered_by(await chat(http, SPARE)) == SPARE  # the trial succeeds: closed again
            assert answered_by(await chat(http, SPARE)) == SPARE
    finally:
        if spare.proc.poll() is None:
            os.kill(spare.proc.pid, signal.SIGCONT)

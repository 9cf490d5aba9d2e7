"""Who is out there: `$SRV.PING` → per-model health replies, and waiting until a worker is online.

Every worker is a `nats.micro` service whose metadata names its model, and every instance answers
`models.<model>.health` (no queue group). So one ping learns the models and one health request per model
reaches every instance. The monitor's sweep, the CLIs' `--list`, `fleet up`, the tests and the benchmarks
all ask this way, through the functions here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout

from . import protocol as p

__all__ = ["PING", "gather", "health", "model_of_ping", "sweep", "wait_online"]

PING = "$SRV.PING"
# The names a worker accepts as MODEL_NAME; anything else in $SRV metadata is not asked for its health.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def model_of_ping(data: bytes) -> str | None:
    """The model a `$SRV.PING` reply belongs to, if it comes from a fleet worker with a valid model name."""
    try:
        meta = json.loads(data).get("metadata") or {}
        model, worker_id = meta.get("model"), meta.get("worker_id")
    except (ValueError, AttributeError):
        return None
    return model if isinstance(model, str) and MODEL_NAME.match(model) and worker_id else None


async def _replies(nc: NATS, subject: str, wait: float) -> AsyncGenerator[bytes, None]:
    """Ask `subject` once; yield each non-empty reply until none came for `wait` s or nobody is subscribed."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(subject, b"", reply=inbox)
        while True:
            try:
                msg = await sub.next_msg(timeout=wait)
            except NatsTimeout:
                return
            if not msg.data:
                if msg.headers and msg.headers.get("Status") == "503":
                    return  # no responders: nobody subscribes to the subject
                continue
            yield msg.data
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def gather(nc: NATS, subject: str, wait: float) -> list[bytes]:
    """Every answer to one request on `subject`, until none came for `wait` s (all instances answer)."""
    return [data async for data in _replies(nc, subject, wait)]


async def health(nc: NATS, model: str, wait: float = 0.5) -> list[dict[str, Any]]:
    """The health body of every instance of `model`."""
    return [json.loads(data) for data in await gather(nc, p.health_subject(model), wait)]


async def sweep(nc: NATS, wait: float, *, known: Iterable[str] = (),
                on_health: Callable[[bytes], None] | None = None) -> list[bytes]:
    """`$SRV.PING`, then one health request per model it names and per model in `known` (those whose service
    registration was missed); every reply is gathered on one inbox for `wait` s. Returns the health replies
    (raw bodies), handing each to `on_health` as it arrives."""
    inbox = nc.new_inbox()
    asked: set[str] = set()
    found: list[bytes] = []

    async def ask(model: str) -> None:
        if model in asked or not MODEL_NAME.match(model):
            return
        asked.add(model)
        with contextlib.suppress(Exception):
            await nc.publish(p.health_subject(model), b"", reply=f"{inbox}.health")

    async def on_reply(msg: Msg) -> None:
        if not msg.data:
            return  # a no-responders status
        if msg.subject.endswith(".ping"):
            if model := model_of_ping(msg.data):
                await ask(model)
            return
        found.append(msg.data)
        if on_health is not None:
            on_health(msg.data)

    sub = await nc.subscribe(f"{inbox}.*", cb=on_reply)
    try:
        await nc.publish(PING, b"", reply=f"{inbox}.ping")
        for model in list(known):
            await ask(model)
        await asyncio.sleep(wait)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return found


async def wait_online(nc: NATS, model: str, *, worker_id: str | None = None, pid: int | None = None,
                      timeout: float | None, alive: Callable[[], bool] = lambda: True,
                      interval: float = 0.2) -> bool:
    """Until an instance of `model` answers health with status `online`: True, or False once `timeout` s
    passed (None: no limit) or `alive()` turned false (the process we wait for exited).

    `worker_id` waits for that instance; `pid` for the one whose generated worker id ends in `-<pid>`."""
    deadline = time.monotonic() + timeout if timeout is not None else None
    while deadline is None or time.monotonic() < deadline:
        if not alive():
            return False
        async with contextlib.aclosing(_replies(nc, p.health_subject(model), 0.5)) as replies:
            async for data in replies:
                try:
                    body = json.loads(data)
                except ValueError:
                    continue
                if body.get("status") != "online":
                    continue
                wid = str(body.get("worker_id", ""))
                if (worker_id is None or wid == worker_id) and (pid is None or wid.endswith(f"-{pid}")):
                    return True
        await asyncio.sleep(interval)
    return False

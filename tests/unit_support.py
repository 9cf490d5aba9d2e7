"""What the fast tier's worker tests share: a real nats-server with the real queue on it, and an engine
stand-in for the one part these tests are not about (llama.cpp's output).

The stand-in is allowed here and only here: the behaviour under test is what happens *around* a
generation (parsing, deadlines, replies, acks, records), and the slow tier runs the same paths on
the real model.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest_asyncio
from nats.js import JetStreamContext

from workers.config import Settings
from workers.generation import Completion, Embeddings
from workers.metrics import Metrics
from workers.outcome import Ledger
from workers.protocol import Params
from workers.queue import ensure_consumer, ensure_stream
from workers.store import Store


class ScriptedEngine:
    """Answers with a fixed text split into pieces, or raises what it is told to."""

    def __init__(self, pieces: tuple[str, ...] = ("Hello", ", ", "world"), fail: BaseException | None = None,
                 finish: str = "stop") -> None:
        self.pieces, self.fail, self.finish = pieces, fail, finish
        self.calls: list[dict[str, Any]] = []
        self.busy = 0

    async def complete(self, prompt: str, params: Params, *, stop: tuple[str, ...] = (), grammar: str | None = None,
                       on_delta: Callable[[str], None] | None = None, cancel: threading.Event | None = None,
                       deadline_ms: int | None = None, label: str | None = None) -> Completion:
        self.calls.append({"prompt": prompt, "params": params, "stop": stop, "grammar": grammar,
                           "deadline_ms": deadline_ms})
        if self.fail is not None:
            raise self.fail
        for piece in self.pieces:
            if on_delta:
                on_delta(piece)
            await asyncio.sleep(0)
        finish = "cancelled" if cancel is not None and cancel.is_set() else self.finish
        return Completion(text="".join(self.pieces), tokens_in=len(prompt.split()), tokens_out=len(self.pieces),
                          finish_reason=finish, ttft_ms=0.5)  # type: ignore[arg-type]

    async def embed(self, texts: list[str], deadline_ms: int | None = None, label: str | None = None) -> Embeddings:
        self.calls.append({"texts": texts, "deadline_ms": deadline_ms})
        if self.fail is not None:
            raise self.fail
        return Embeddings(vectors=[[float(len(t)), 1.0] for t in texts], tokens=sum(len(t.split()) for t in texts))

    def abort(self) -> None:
        pass


@dataclass
class Bus:
    """A connected client on a fresh JetStream with the model's stream and durable consumer."""

    nc: nats.NATS
    js: JetStreamContext
    settings: Settings
    store: Store
    metrics: Metrics
    ledger: Ledger

    async def rows(self) -> list[dict[str, Any]]:
        import sqlite3

        await self.store.flush()
        con = sqlite3.connect(self.settings.log_path)
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute("SELECT * FROM requests ORDER BY id")]
        finally:
            con.close()


def unit_settings(url: str, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(model_name="unit.model", nats_url=url, data_dir=data_dir, http_addr="",
                                  worker_id="unit-worker", queue_ack_wait_s=2, queue_max_deliver=3)
    values.update(overrides)
    return Settings(**values)


@pytest_asyncio.fixture
async def bus_factory(nats_server: Any, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """`await bus_factory(**settings)`: the queue set up for a model with these settings."""
    opened: list[Bus] = []

    async def make(**overrides: Any) -> Bus:
        settings = unit_settings(nats_server.url, tmp_path / "data", **overrides)
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await ensure_stream(js, settings)
        await ensure_consumer(js, settings)
        store = Store(settings.log_path)
        await store.open()
        metrics = Metrics(settings.model_name)
        bus = Bus(nc, js, settings, store, metrics, Ledger(store, metrics))
        opened.append(bus)
        return bus

    yield make
    for bus in opened:
        await bus.store.close()
        await bus.nc.close()

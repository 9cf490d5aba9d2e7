"""The worker's SQLite log (docs/architecture.md, "Storage"): one `requests` row per request, `events`
for the lifecycle.

Writes go through a bounded in-memory queue drained by one writer task, so the request path
never waits on the disk. A row that cannot be queued or written is logged as an error and
counted (`dropped`), never silently lost. The few latest events worth an operator's eye are also kept in
memory (`alerts`), for the heartbeat: it must not read SQLite every few seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any, NamedTuple

import aiosqlite

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL, req_id TEXT, trace_id TEXT, worker_id TEXT, source TEXT,
    raw_input TEXT, formatted_input TEXT, params_json TEXT, grammar TEXT, response_text TEXT,
    tokens_in INTEGER, tokens_out INTEGER, queue_ms REAL, ttft_ms REAL, dur_ms REAL,
    finish_reason TEXT, deliveries INTEGER, status TEXT, error TEXT,
    cached_tokens INTEGER, batch_id INTEGER
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests(ts);
CREATE INDEX IF NOT EXISTS requests_req_id ON requests(req_id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL, level TEXT NOT NULL, code TEXT NOT NULL, msg TEXT, meta TEXT
);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts);
"""

REQUEST_COLUMNS = (
    "ts", "req_id", "trace_id", "worker_id", "source", "raw_input", "formatted_input", "params_json", "grammar",
    "response_text", "tokens_in", "tokens_out", "queue_ms", "ttft_ms", "dur_ms", "finish_reason", "deliveries",
    "status", "error", "cached_tokens", "batch_id",
)
# Columns added after the first version: a log file made by an older worker gets them when opened.
ADDED_COLUMNS = {"cached_tokens": "INTEGER", "batch_id": "INTEGER"}
_INSERT_REQUEST = (
    f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)}) VALUES ({', '.join('?' * len(REQUEST_COLUMNS))})"
)
_INSERT_EVENT = "INSERT INTO events (ts, level, code, msg, meta) VALUES (?, ?, ?, ?, ?)"
log = logging.getLogger(__name__)

# Events shown on the monitor (the heartbeat's `alerts`) when recorded at warning level or above: the queue was
# rebuilt or behaves otherwise than this worker expects, or a request could not be answered normally.
ALERT_KINDS = frozenset({
    "stream.recreated", "consumer.recreated", "stream.recreate_failed", "stream.differs", "consumer.differs",
    "request.poison", "request.dead_letter", "request.claim_taken_over", "queue.ack_failed",
})
ALERT_LEVELS = ("warning", "error")
ALERTS_KEPT = 5
ALERT_MAX_CHARS = 300  # a heartbeat carries five of them


class Recent(NamedTuple):
    """One event kept in memory for the heartbeat."""

    ts: float
    code: str
    msg: str
    level: str


class Store:
    """Asynchronous, non-blocking request and event log for one worker."""

    def __init__(self, path: Path, *, retention_days: float = 14.0, max_rows: int = 200_000,
                 queue_size: int = 10_000) -> None:
        self.path = path
        self.retention_s = retention_days * 86400
        self.max_rows = max_rows
        self.dropped = 0
        self._queue: asyncio.Queue[tuple[str, tuple[Any, ...]] | None] = asyncio.Queue(queue_size)
        self._db: aiosqlite.Connection | None = None
        self._writer: asyncio.Task[None] | None = None
        self.alerts: deque[Recent] = deque(maxlen=ALERTS_KEPT)  # newest last

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path)
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA busy_timeout=5000")
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.executescript(SCHEMA)
        async with self._db.execute("PRAGMA table_info(requests)") as cur:
            have = {row[1] for row in await cur.fetchall()}
        for name, kind in ADDED_COLUMNS.items():
            if name not in have:
                await self._db.execute(f"ALTER TABLE requests ADD COLUMN {name} {kind}")
        await self._db.commit()
        await self.prune()
        self._writer = asyncio.create_task(self._write_loop(), name="store-writer")

    async def close(self) -> None:
        if self._writer is not None:
            await self._queue.put(None)
            await self._writer
            self._writer = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    def request(self, **row: Any) -> None:
        row.setdefault("ts", time.time())
        unknown = set(row) - set(REQUEST_COLUMNS)
        if unknown:
            raise TypeError(f"unknown request columns: {sorted(unknown)}")
        self._put(_INSERT_REQUEST, tuple(row.get(c) for c in REQUEST_COLUMNS))

    def event(self, code: str, msg: str = "", level: str = "info", **meta: Any) -> None:
        ts = time.time()
        if code in ALERT_KINDS and level in ALERT_LEVELS:
            short = msg if len(msg) <= ALERT_MAX_CHARS else msg[:ALERT_MAX_CHARS - 1] + "…"
            self.alerts.append(Recent(ts, code, short, level))
        self._put(_INSERT_EVENT, (ts, level, code, msg, json.dumps(meta, default=str) if meta else None))

    def _put(self, sql: str, args: tuple[Any, ...]) -> None:
        try:
            self._queue.put_nowait((sql, args))
        except asyncio.QueueFull:
            self.dropped += 1
            log.error("store: log queue full, dropped a row for %s (%d so far)", self.path.name, self.dropped)

    async def _write_loop(self) -> None:
        assert self._db is not None
        last_prune = time.monotonic()
        while True:
            item = await self._queue.get()
            batch = [item]
            while not self._queue.empty() and len(batch) < 500:
                batch.append(self._queue.get_nowait())
            done = None in batch
            rows = [b for b in batch if b is not None]
            try:
                for sql, args in rows:
                    await self._db.execute(sql, args)
                await self._db.commit()
            except Exception as e:  # the log must never take the worker down
                self.dropped += len(rows)
                log.error("store: writing %d rows to %s failed: %s", len(rows), self.path, e)
            for _ in batch:
                self._queue.task_done()
            if time.monotonic() - last_prune > 3600:
                await self.prune()
                last_prune = time.monotonic()
            if done:
                return

    async def flush(self) -> None:
        """Wait until everything queued so far is committed (or counted as dropped): tests and shutdown."""
        if self._writer is not None and not self._writer.done():
            await self._queue.join()

    async def prune(self) -> None:
        """Apply retention: rows older than the retention window, then anything past max_rows."""
        assert self._db is not None
        cutoff = time.time() - self.retention_s
        try:
            for table in ("requests", "events"):
                await self._db.execute(f"DELETE FROM {table} WHERE ts < ?", (cutoff,))
                await self._db.execute(
                    f"DELETE FROM {table} WHERE id <= (SELECT MAX(id) FROM {table}) - ?", (self.max_rows,)
                )
            await self._db.commit()
        except Exception as e:
            log.error("store: pruning %s failed: %s", self.path, e)


def read_recent(path: Path, table: str, limit: int = 20) -> list[dict[str, Any]]:
    """The newest rows of a table, newest first (synchronous; for the `make logs` command)."""
    import sqlite3

    if table not in ("requests", "events"):
        raise ValueError(table)
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(f"SELECT * FROM {table} ORDER BY id DESC LIMIT ?", (limit,))]
    finally:
        con.close()

"""The Requests view's memory: the last finished requests across the fleet, as Celery Flower's task list.

Workers publish one `protocol.RequestEvent` per finished request on `events.request.<model>`. Anyone on the bus
can publish there too, so a body is size-checked by the feed, its strings cleaned and cut here (a forged 60 kB
error text is kept as 1,024 characters), and it must validate as a RequestEvent or it is dropped. The log keeps
MONITOR_REQUESTS_MAX entries, oldest dropped first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from workers import protocol as p

from . import clean
from .shapes import RequestEntry

IO_MAX = 2000  # input / output: the worker sends at most this many characters (LOG_PROMPTS=1)
SHORT = ("model_name", "worker_id", "req_id", "status", "finish_reason", "error_code", "trace_id", "instance",
         "source", "kind")


def decode_request_event(data: bytes) -> p.RequestEvent:
    """A request event off the bus, its strings cleaned and bounded; ValueError or ValidationError if it is
    not one."""
    fields: dict[str, Any] = {}
    for key, value in list(clean.wire_object(data).items())[: clean.ITEMS_MAX]:
        if not isinstance(key, str):
            continue
        if isinstance(value, str):
            limit = clean.NAME_MAX if key in SHORT else IO_MAX if key in ("input", "output") else clean.TEXT_MAX
            value = clean.text(value, limit)
        elif isinstance(value, (list, dict)):
            continue  # a RequestEvent has no nested fields: nothing forged there is kept
        fields[key] = value
    ev = p.RequestEvent.model_validate(fields)
    if not ev.model_name.strip() or not ev.worker_id.strip() or not ev.req_id.strip():
        raise ValueError("event names no model, worker or request")
    return ev


def entry(ev: p.RequestEvent) -> RequestEntry:
    return RequestEntry(**ev.model_dump(exclude={"instance", "cached_tokens"}))


class RequestLog:
    """The last `size` finished requests, oldest first."""

    def __init__(self, size: int) -> None:
        self.items: deque[RequestEntry] = deque(maxlen=size)

    def add(self, ev: p.RequestEvent) -> RequestEntry:
        item = entry(ev)
        self.items.append(item)
        return item

    def select(self, model: str | None = None, status: str | None = None, limit: int | None = None,
               newest_first: bool = True) -> list[RequestEntry]:
        """Entries of `model` (as written or as its subject token) with `status`, the newest `limit`."""
        found: Iterable[RequestEntry] = reversed(self.items)
        if model:
            found = (r for r in found if model in (r.model_name, p.token(r.model_name)))
        if status:
            found = (r for r in found if r.status == status)
        out: list[RequestEntry] = []
        for r in found:
            if limit is not None and len(out) >= limit:
                break
            out.append(r)
        return out if newest_first else out[::-1]

"""The terminal view: a live, htop-like table of the fleet (Rich), read straight from NATS.

`python -m monitor tui` runs full screen until `q`; the sort keys are shown in the footer. Each model's row has
its instances under it (`└ worker`), with the window stats the workers send (p50/p95 latency, tokens/s, expected
wait, error rate; a dash from older workers), and the newest finished requests follow the table. `--once`
sweeps, prints one table and exits. Neither needs the web server: they run the same registry and feed in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from workers import protocol as p
from workers.settings import redact

from .config import MonitorSettings
from .feed import Feed, NatsUnavailable
from .registry import STATUS_ORDER, Registry
from .shapes import InstanceEntry, Liveness, RequestEntry, ServiceEntry, Slots, WindowEntry

STATUS_STYLE: dict[Liveness, str] = {"online": "green", "draining": "cyan", "starting": "cyan", "stale": "yellow",
                                     "offline": "red"}
LEVEL_STYLE: dict[p.Level, str] = {"healthy": "green", "warning": "yellow", "critical": "bold red"}
REQUEST_ROWS = 8  # newest finished requests under the table
LEVEL_ORDER: dict[p.Level, int] = {"healthy": 0, "warning": 1, "critical": 2}
# key -> (column label, sort key); pressing the same key again reverses the order
SORTS: dict[str, tuple[str, Callable[[ServiceEntry], str | float]]] = {
    "m": ("model", lambda s: s.model_name),
    "s": ("status", lambda s: STATUS_ORDER[s.status]),
    "i": ("inst", lambda s: s.online_count),
    "d": ("queue", lambda s: s.queue_metrics.pending_messages),
    "l": ("level", lambda s: LEVEL_ORDER[s.backpressure_status.level]),
    "r": ("req/s", lambda s: s.requests_per_s or 0.0),
    "t": ("last seen", lambda s: -s.last_seen),
}


def queue_bar(pending: int, capacity: int, level: p.Level, width: int = 16) -> Text:
    share = min(1.0, pending / capacity) if capacity else 0.0
    filled = max(1, round(share * width)) if pending else 0
    bar = Text("█" * filled, style=LEVEL_STYLE[level])
    bar.append("░" * (width - filled), style="grey35")
    bar.append(f" {pending}/{capacity}")
    return bar


def slot_text(u: Slots | None) -> Text:
    """`busy/slots`, the requests waiting for room if any, and the KV cache's use when the engine reports it."""
    if u is None:
        return Text("–")
    out = Text(f"{u.busy}/{u.slots}")
    if u.waiting:
        out.append(f" +{u.waiting} waiting", style="yellow")
    if u.kv_used is not None:
        out.append(f" · KV {u.kv_used:.0%}")
    return out


def ms(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:.0f}ms" if v < 1000 else f"{v / 1000:.1f}s"


def latency(w: WindowEntry | None) -> Text:
    return Text("–" if w is None else f"{ms(w.latency_p50_ms)}/{ms(w.latency_p95_ms)}")


def tokens(w: WindowEntry | None) -> Text:
    return Text("–" if w is None else f"{w.tokens_per_s:.1f}")


def wait(s: float | None) -> Text:
    if s is None:
        return Text("–")
    return Text(f"{s:.1f}s" if s < 60 else duration(s), style="yellow" if s >= 10 else "")


def errors(w: WindowEntry | None) -> Text:
    if w is None:
        return Text("–")
    return Text(f"{w.error_rate:.0%}", style="red" if w.errors else "")


def ago(t: float | None) -> str:
    if not t:
        return "never"
    return f"{duration(time.time() - t)} ago"


def duration(s: float) -> str:
    s = max(0, int(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def table(services: list[ServiceEntry], sort: str = "m", reverse: bool = False, expand: bool = True) -> Table:
    """The fleet as one row per model (rows are Text, so wire strings never act as Rich markup)."""
    label, key = SORTS.get(sort, SORTS["m"])
    t = Table(expand=expand, header_style="bold", pad_edge=False, box=None, row_styles=["", "on grey11"])
    for col in ("model", "kind", "inst", "status", "queue", "level", "slots", "req/s", "p50/p95", "tok/s", "wait",
                "err", "done", "failed", "last seen", "up"):
        mark = (" ▲" if reverse else " ▼") if col == label else ""
        t.add_column(col + mark, no_wrap=col != "model", justify="right" if col in (
            "inst", "req/s", "p50/p95", "tok/s", "wait", "err", "done", "failed") else "left")
    for s in sorted(services, key=key, reverse=reverse):
        q, bp = s.queue_metrics, s.backpressure_status
        t.add_row(
            Text(s.model_name, style="bold"), Text(s.kind),
            Text(f"{s.online_count}/{s.instance_count}"),
            Text(s.status, style=STATUS_STYLE[s.status]),
            queue_bar(q.pending_messages, q.queue_capacity, bp.level),
            Text(bp.level, style=LEVEL_STYLE[bp.level]),
            slot_text(s.slots),
            Text("–" if s.requests_per_s is None else f"{s.requests_per_s:.2f}"),
            latency(s.stats), tokens(s.stats), wait(bp.expected_wait_s), errors(s.stats),
            Text(str(q.total_processed)), Text(str(q.total_failed)),
            Text(ago(s.last_seen)), Text(duration(s.uptime)),
        )
        for i in s.instances:
            t.add_row(*instance_row(i), style="grey70")
    return t


def instance_row(i: InstanceEntry) -> list[Text]:
    """An instance under its model: the same columns, its own numbers (kind, inst and queue stay blank)."""
    q = i.queue_metrics
    return [Text(f" └ {i.worker_id}", overflow="ellipsis"), Text(""), Text(""),
            Text(i.status, style=STATUS_STYLE[i.status]), Text(""), Text(i.backpressure_status.level),
            slot_text(i.slots), Text("–" if i.requests_per_s is None else f"{i.requests_per_s:.2f}"),
            latency(i.stats), tokens(i.stats), wait(i.backpressure_status.expected_wait_s), errors(i.stats),
            Text(str(q.total_processed)), Text(str(q.total_failed)), Text(ago(i.last_seen)),
            Text(duration(i.uptime))]


def requests_table(items: list[RequestEntry]) -> Table:
    """The newest finished requests (Flower's task list), newest first: the dashboard's Requests columns."""
    t = Table(title="requests", title_justify="left", title_style="bold", header_style="bold", box=None,
              pad_edge=False)
    for col in ("time", "model", "worker", "request", "status", "latency", "tokens in/out", "error"):
        t.add_column(col, no_wrap=True, justify="right" if col in ("latency", "tokens in/out") else "left",
                     overflow="ellipsis", max_width=40 if col in ("model", "worker", "request") else None)
    for r in items:
        t.add_row(Text(time.strftime("%H:%M:%S", time.localtime(r.ts))), Text(r.model_name), Text(r.worker_id),
                  Text(r.req_id),
                  Text(r.status, style="green" if r.status == "ok" else "yellow" if r.status in (
                      "cancelled", "expired", "rejected", "handed_back") else "red"),
                  Text(ms(r.latency_ms)), Text(f"{r.tokens_in}/{r.tokens_out}"), Text(r.error_code or ""))
    return t


def alerts(services: list[ServiceEntry], limit: int = 5) -> Text | None:
    """The fleet's newest worker alerts, one line each (newest last), or None if there are none."""
    found = sorted(((a, s.model_name) for s in services for a in s.alerts), key=lambda pair: pair[0].ts)[-limit:]
    if not found:
        return None
    lines = Text("alerts", style="bold")
    for a, model in found:
        style = LEVEL_STYLE[a.level] if a.level != "healthy" else "grey62"
        lines.append("\n")
        lines.append_text(Text.assemble(("⚠ " if a.level != "healthy" else "· ", style), (a.kind, style), "  ",
                                        a.message, "  ", (f"{model} · {a.worker_id} · {ago(a.ts)}", "grey62")))
    return lines


def screen(registry: Registry, settings: MonitorSettings, sort: str, reverse: bool) -> Group:
    services = registry.services()
    live = sum(s.online_count for s in services)
    total = sum(s.instance_count for s in services)
    conn = Text("connected", style="green") if registry.nats_connected else Text("NATS unreachable", style="red")
    head = Text.assemble(("fleet monitor", "bold"), "  ", redact(settings.nats_url), " ", conn,
                         f"  ·  {len(services)} models · {live}/{total} instances live · ",
                         time.strftime("%H:%M:%S"))
    body: Table | Text = table(services, sort, reverse) if services else Text(
        "no workers seen yet: start some with `make up` (they appear on their first heartbeat)", style="yellow")
    keys = "  ".join(f"{k} {label}" for k, (label, _) in SORTS.items())
    foot = Text(f"sort: {keys}  (again: reverse)   q quit", style="grey62")
    warned = alerts(services)
    recent = registry.requests.select(limit=REQUEST_ROWS)
    done: Table | Text = requests_table(recent) if recent else Text(
        "no requests finished since the monitor started", style="grey62")
    return Group(head, Text(""), body, Text(""), *((warned, Text("")) if warned else ()), done, Text(""), foot)


async def snapshot(settings: MonitorSettings) -> Registry:
    """Connect, subscribe and sweep once; the registry then holds the fleet as it is."""
    registry = Registry(settings)
    feed = Feed(registry, settings)
    await feed.connect(settings.nats_connect_timeout)
    try:
        await feed.start()
        registry.tick()
    finally:
        await feed.close()
    return registry


def once(settings: MonitorSettings, console: Console | None = None) -> int:
    console = console or (Console() if sys.stdout.isatty() else Console(width=160))
    try:
        registry = asyncio.run(snapshot(settings))
    except NatsUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if registry.models:
        services = registry.services()
        console.print(table(services, expand=False))
        if warned := alerts(services):
            console.print(warned)
        if recent := registry.requests.select(limit=REQUEST_ROWS):
            console.print(requests_table(recent))
    else:
        console.print(f"no workers answered at {redact(settings.nats_url)}", markup=False)
    return 0


@contextlib.contextmanager
def _keys(queue: asyncio.Queue[str]) -> Iterator[None]:
    """Single key presses from a terminal (cbreak mode), restored on the way out."""
    if not sys.stdin.isatty():
        yield
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    loop = asyncio.get_running_loop()
    tty.setcbreak(fd)
    loop.add_reader(fd, lambda: queue.put_nowait(os.read(fd, 1).decode(errors="ignore")))
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


async def live(settings: MonitorSettings, sort: str = "m") -> int:
    registry = Registry(settings)
    feed = Feed(registry, settings)
    try:
        await feed.connect(settings.nats_connect_timeout)
    except NatsUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    await feed.start()
    keys: asyncio.Queue[str] = asyncio.Queue()
    reverse = False
    try:
        with _keys(keys), Live(screen(registry, settings, sort, reverse), screen=True, auto_refresh=False) as view:
            while True:
                with contextlib.suppress(TimeoutError):
                    key = await asyncio.wait_for(keys.get(), timeout=1.0)
                    if key in ("q", "Q", "\x1b"):
                        return 0
                    if key in SORTS:
                        reverse = not reverse if key == sort else False
                        sort = key
                view.update(screen(registry, settings, sort, reverse), refresh=True)
    finally:
        await feed.close()

"""What the monitor sends out: the JSON of `/api/services`, `/api/services/{model}`, `/healthz` and the events
of `/api/events`, as pydantic models.

The registry builds these; the views only read and serialise them (`model_dump(mode="json")`). The dashboard
(static/app.js) reads the same JSON, so a field renamed here is a field renamed there. The incoming shapes
(heartbeats, reports) are in workers/protocol.py.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from workers import protocol as p

# How the monitor judges an instance, best first; `stale` and `offline` are the monitor's own verdicts.
Liveness = Literal["online", "draining", "starting", "stale", "offline"]


class _Shape(BaseModel):
    # extra="forbid": a misspelt field fails where the registry builds it, not in the dashboard
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    event: ClassVar[str] = ""  # the SSE event name this shape goes out as (empty: not sent as an event)


class Pressure(_Shape):
    """`backpressure_status`, of a model or of one instance."""

    level: p.Level
    """The level the worker reported with these numbers (the same mapping as `protocol.backpressure_level`)."""
    utilization: float
    """pending_messages / queue_capacity, rounded to 4 places; 0.0 while the capacity is 0."""
    expected_wait_s: float | None = None
    """What a request queued now would wait, seconds (`protocol.expected_wait`), as the worker reported it with
    these numbers; a model's is the largest over its live instances. Null from older workers, and while nothing
    was served recently."""


class InstanceQueue(_Shape):
    """One instance's queue numbers: the freshest of its heartbeat and its backpressure reports."""

    pending_messages: int
    """The model's JetStream depth (pending + unacknowledged) as this instance last saw it."""
    active_processing: int
    """Requests in this instance's hands."""
    queue_capacity: int
    """QUEUE_MAX_PER_MODEL of this instance."""
    total_processed: int
    """Requests this instance has finished since it started."""
    total_failed: int
    """Requests this instance has failed since it started."""
    last_processed_at: float | None
    """Epoch seconds of its last finished request; null if none yet."""


class ServiceQueue(_Shape):
    """A model's queue numbers, put together from its instances."""

    pending_messages: int
    """JetStream's depth for the model, from the instance heard from most recently (live ones first): the
    stream is shared, so every replica reports the same number."""
    active_processing: int
    """Requests running, summed over the live instances."""
    queue_capacity: int
    """The capacity reported with `pending_messages`."""
    total_processed: int
    """Requests finished, summed over the listed instances (forgotten instances take theirs with them)."""
    total_failed: int
    """Requests failed, summed over the listed instances."""
    last_processed_at: float | None
    """The latest finish over the instances, epoch seconds; null if none has finished one."""


class Slots(_Shape):
    """What an engine holds (`protocol.SlotUsage`), of one instance or summed over a model's live instances. The
    kv_* fields come from the batched engine (ENGINE=batched); they are null where no instance reports them."""

    slots: int
    """Requests it can run at once."""
    busy: int
    """Requests running now."""
    waiting: int
    """Requests admitted and waiting for a slot or for room in the KV cache."""
    kv_tokens: int | None
    """The KV cache's size in tokens."""
    kv_reserved: int | None
    """Tokens reserved by running requests (prompt + max_tokens each)."""
    kv_kept: int | None
    """Tokens kept from finished requests for prefix reuse (given up when a new request needs the room)."""
    kv_used: float | None
    """(kv_reserved + kv_kept) / kv_tokens, rounded to 4 places; null while kv_tokens is unknown or 0."""


class History(_Shape):
    """The model's chart samples, oldest first: one every MONITOR_HISTORY_INTERVAL, at most MONITOR_HISTORY_LEN
    (by default 300 every 2 s: the last 10 minutes); all lists have the same length."""

    t: list[float]
    """Epoch seconds of each sample (1 decimal)."""
    queue_depth: list[int]
    """`queue_metrics.pending_messages` at each sample."""
    requests_per_s: list[float]
    """`requests_per_s` at each sample; the live instances' summed `stats.rate_per_s` while that is unknown
    (0.0 without either)."""
    tokens_per_s: list[float | None] = []
    """`stats.tokens_per_s` at each sample; null where no instance reported window stats."""
    latency_p50_ms: list[float | None] = []
    """`stats.latency_p50_ms` at each sample; null where unknown."""
    latency_p95_ms: list[float | None] = []
    """`stats.latency_p95_ms` at each sample; null where unknown."""


class WindowEntry(_Shape):
    """What users watch, over the workers' last STATS_WINDOW_S seconds (`protocol.WindowStats`). An instance's is
    what its last heartbeat carried; a model's combines its live instances' as follows: counts and rates
    (`requests`, `rate_per_s`, `errors`, `tokens_out`, `tokens_per_s`) are summed; `error_rate` is the summed
    errors / summed requests; `latency_p95_ms` is the largest instance p95 (a bound, not a fleet percentile); the
    p50s are the median of the instances' p50s (of an even count, the mean of the middle two), as the monitor has
    no raw samples to merge. A percentile is null where no instance reports one."""

    window_s: float
    """The window's length, seconds (a model's: the longest of its instances')."""
    instances: int
    """How many instances these numbers come from (1 for an instance's own)."""
    requests: int
    """Requests finished in the window, any status."""
    rate_per_s: float
    """Requests finished per second over the window."""
    errors: int
    """Requests that ended failed, rejected, expired or dead-lettered (cancelled is not an error)."""
    error_rate: float
    """errors / requests (0.0 without requests), 4 places."""
    latency_p50_ms: float | None
    """Median time from taken by a worker to answered, of ok requests."""
    latency_p95_ms: float | None
    """95th percentile of the same."""
    ttft_p50_ms: float | None
    """Median time to the first token (generations)."""
    queue_wait_p50_ms: float | None
    """Median time from enqueued to taken by a worker."""
    tokens_out: int
    """Tokens generated in the window."""
    tokens_per_s: float
    """tokens_out / window: throughput."""
    decode_tokens_per_s: float | None
    """Median decode speed of one request, tokens per second."""


class SlotEntry(_Shape):
    """One request in an instance's hands, as llama-server's /slots shows it (`protocol.SlotRequest`)."""

    req_id: str
    """The request."""
    state: Literal["waiting", "prefill", "decode"]
    """`waiting` (admitted, no slot or no KV room yet), `prefill` (reading the prompt) or `decode`."""
    slot: int | None
    """The engine's sequence or context number; null while waiting."""
    tokens_in: int
    """Prompt tokens (0 until counted)."""
    tokens_out: int
    """Tokens generated so far."""
    elapsed_ms: float
    """Since the worker started it."""


class RequestEntry(_Shape):
    """The `request` event and an item of `GET /api/requests`: one finished request (`protocol.RequestEvent`),
    its strings cleaned and bounded (names 256 characters, error text 1,024, input and output 2,000)."""

    event: ClassVar[str] = "request"

    ts: float
    """Epoch seconds it finished, as the worker says."""
    model_name: str
    """The model that served it."""
    worker_id: str
    """The instance that served it."""
    kind: p.Kind
    """`inference` or `embedding`."""
    req_id: str
    """The request's id."""
    source: Literal["nats", "http"]
    """How it came in."""
    status: str
    """ok, cancelled, rejected, expired, failed, handed_back or dead_letter."""
    finish_reason: str | None
    """stop, length, error or cancelled (generations)."""
    error_code: str | None
    """The error's type (context_overflow, expired, ...) when it ended in one."""
    error: str | None
    """`<status> <type>: <message>` as in the worker's SQLite row."""
    latency_ms: float | None
    """Taken by the worker -> answered."""
    queue_ms: float
    """Enqueued -> taken."""
    ttft_ms: float | None
    """Taken -> first token (generations)."""
    tokens_in: int
    """Prompt tokens."""
    tokens_out: int
    """Tokens generated."""
    trace_id: str | None
    """The caller's trace id, if it sent one."""
    input: str | None
    """The prompt's first 2,000 characters, only from a worker with LOG_PROMPTS=1."""
    output: str | None
    """The answer's first 2,000 characters, only from a worker with LOG_PROMPTS=1."""


class AlertEntry(_Shape):
    """A warning a worker sends with its heartbeat (`protocol.Alert`): the stream was recreated, a request
    crashed workers, ... Workers keep their newest few; the monitor shows what the last body held."""

    ts: float
    """Epoch seconds it happened, as the worker says."""
    kind: str
    """The event's name in the worker's log (`stream.recreated`, `request.poison`, ...)."""
    message: str
    """One sentence for the operator."""
    level: p.Level
    """`warning` or `critical` (`healthy`: informational)."""


class WorkerAlert(AlertEntry):
    """An alert in a model's entry, with the instance it came from."""

    worker_id: str
    """The instance that sent it."""


class InstanceEntry(_Shape):
    """One worker process as the monitor sees it."""

    worker_id: str
    """The worker's WORKER_ID (by default `<model>-<host>-<pid>`); instances are keyed by it."""
    status: Liveness
    """The monitor's verdict: the worker's own status while it is heard from on time; `stale` after one
    announced heartbeat interval (plus MONITOR_STALE_GRACE); `offline` after two, or at once on `stopping`."""
    worker_status: p.WorkerStatus
    """The status in the worker's last body: starting, online, draining or stopping."""
    endpoint: str | None
    """The worker's HTTP endpoint, null if it serves none."""
    version: str
    """The worker's software version."""
    first_seen: float
    """Epoch seconds the monitor first heard from it."""
    last_seen: float
    """Epoch seconds the monitor last heard from it (heartbeat, health reply or backpressure report)."""
    age_s: float
    """Seconds since then, on the monitor's clock (2 decimals)."""
    uptime: float
    """Seconds the worker has been up: its reported uptime plus the time since, while it is live (1 decimal)."""
    started_at: float
    """Epoch seconds the worker started, as it reports."""
    heartbeat_interval_s: float
    """The heartbeat interval the worker announced; its liveness is judged against it."""
    seq: int
    """The sequence number of its last heartbeat."""
    queue_metrics: InstanceQueue
    backpressure_status: Pressure
    slots: Slots | None
    """Its engine's slots and KV cache, the freshest of its heartbeat and its backpressure reports; null until
    its model is loaded, and from workers older than the field."""
    requests_per_s: float | None
    """Requests finished per second, from the change in total_processed between bodies at least a second
    apart; null until there are two."""
    stats: WindowEntry | None
    """Its last STATS_WINDOW_S seconds from its last heartbeat; null from workers older than the field."""
    host: p.HostStats | None
    """Its machine's CPU, memory (and GPUs) from its last heartbeat; null from workers older than the field."""
    slot_requests: list[SlotEntry]
    """What each busy or waiting slot is doing (llama-server's /slots), as fresh as `slots`; empty when idle
    and from workers older than the field."""
    confirmed: bool
    """Whether it has answered one of the monitor's health requests (a live worker on the bus, not only a
    heartbeat, which anyone may publish): MONITOR_MAX_INSTANCES evicts unconfirmed instances first."""
    alerts: list[AlertEntry]
    """The worker's recent warnings from its last body, newest last (at most 5)."""


class ServiceEntry(_Shape):
    """One model: every instance that announces the same `model_name`. The item of `GET /api/services`, the
    body of `GET /api/services/{model}` and of the `service` event."""

    event: ClassVar[str] = "service"

    model_name: str
    """The model's name as its workers write it, dots and all."""
    token: str
    """The name as a NATS subject token (`nomic-embed-v1.5` -> `nomic-embed-v1_5`); the REST path takes
    either."""
    kind: p.Kind
    """`inference` or `embedding`, from the most recently heard instance."""
    status: Liveness
    """The best status among its instances (online, draining, starting, stale, offline: in that order)."""
    capabilities: list[str]
    """The union of its instances' capabilities, sorted."""
    model_info: dict[str, Any]
    """The model card (architecture, quantization, context size, ...) from the most recently heard instance."""
    endpoint: str | None
    """An HTTP endpoint of a live instance, else the most recently heard instance's; null if none serves HTTP."""
    nats_topic: str
    """The subject requests for the model are sent to."""
    version: str
    """The software version of the most recently heard instance."""
    queue_metrics: ServiceQueue
    backpressure_status: Pressure
    """The level and utilization that go with `queue_metrics.pending_messages`."""
    slots: Slots | None
    """Slots and KV cache summed over the live instances that report them; null if none does."""
    requests_per_s: float | None
    """Requests finished per second, summed over the live instances whose rate is known; null if none is."""
    stats: WindowEntry | None
    """The live instances' window stats combined (how: see WindowEntry); null if none reports them."""
    first_seen: float
    """Epoch seconds the monitor first heard of the model (anew, if all its instances were once forgotten)."""
    last_seen: float
    """Epoch seconds the monitor last heard from any of its instances."""
    uptime: float
    """The longest uptime among its live instances, seconds (1 decimal); 0.0 if none is live."""
    instance_count: int
    """Instances listed (offline ones until they are purged)."""
    online_count: int
    """Instances that are online, draining or starting."""
    instances: list[InstanceEntry]
    """Sorted by worker_id."""
    alerts: list[WorkerAlert]
    """The newest alerts over its instances (at most 10), oldest first."""
    history: History


class Snapshot(_Shape):
    """The first event of every `/api/events` stream: the whole fleet; the events after it are changes."""

    event: ClassVar[str] = "snapshot"

    at: float
    """The monitor's wall clock, epoch seconds (the dashboard corrects its own clock by it)."""
    nats_connected: bool
    """Whether the monitor is connected to NATS right now."""
    services: list[ServiceEntry]
    """Every model, sorted by name, as `GET /api/services` lists them."""
    requests: list[RequestEntry]
    """The last finished requests across the fleet (at most MONITOR_REQUESTS_MAX), oldest first, as
    `GET /api/requests` lists them; each new one follows as a `request` event."""


class StatusChange(_Shape):
    """The `status` event: an instance's liveness changed."""

    event: ClassVar[str] = "status"

    model_name: str
    """The instance's model."""
    worker_id: str
    """The instance."""
    from_: Liveness | Literal["new"] = Field(serialization_alias="from")
    """The status before; `new` for an instance heard from for the first time. Sent as `from`."""
    to: Liveness
    """The status now."""
    at: float
    """Epoch seconds of the change."""

    @model_serializer(mode="wrap")
    def _from_as_written(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # `from` is a Python keyword; renamed here, so every dump says `from` without needing by_alias=True
        return {("from" if k == "from_" else k): v for k, v in handler(self).items()}


class ServiceRemoved(_Shape):
    """The `removed` event: the model's last instance was purged or evicted; the model is gone."""

    event: ClassVar[str] = "removed"

    model_name: str
    """The model that is gone."""
    at: float
    """Epoch seconds of the removal."""


class NatsChange(_Shape):
    """The `nats` event: the monitor's NATS connection went down or came back."""

    event: ClassVar[str] = "nats"

    connected: bool
    """Whether the monitor is connected now."""
    at: float
    """Epoch seconds of the change."""


# What an SSE listener receives after its snapshot; each shape names its event in `event`.
Event = ServiceEntry | StatusChange | ServiceRemoved | NatsChange | RequestEntry


class Stats(_Shape):
    """The monitor's own counters and sizes, for `/metrics` and `/healthz`."""

    heartbeats: int
    """Heartbeats taken in."""
    reports: int
    """Backpressure reports taken in."""
    request_events: int
    """Request events (`events.request.*`) taken in."""
    health_replies: int
    """Health replies taken in (discovery sweeps)."""
    invalid: int
    """Bodies dropped because they did not parse or validate."""
    oversized: int
    """Bodies dropped for being over MONITOR_MAX_MESSAGE_BYTES."""
    foreign: int
    """Heartbeats and health replies ignored because another instance token holds their worker_id (a forgery,
    or two workers sharing a WORKER_ID)."""
    evicted: int
    """Instances dropped to stay within MONITOR_MAX_INSTANCES."""
    purged: int
    """Offline instances dropped after PURGE_AFTER."""
    instances: int
    """Instances in the registry now."""
    models: int
    """Models in the registry now."""
    sse_clients: int
    """Open `/api/events` streams."""


class _Verdict(_Shape):
    status: Literal["ok", "degraded"]
    """`ok` while the monitor is connected to NATS (HTTP 200), else `degraded` (HTTP 503)."""
    nats_connected: bool
    """Whether the monitor is connected to NATS."""


class Healthz(Stats, _Verdict):
    """The body of `GET /healthz`: the verdict, then the counters. (pydantic orders fields from the last base
    to the first, so listing Stats first puts the verdict at the top of the JSON, where it has always been.)"""

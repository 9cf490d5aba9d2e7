"""The wire contract: subjects, header names and message schemas.

Workers, the monitor and the CLIs all import this module, so it must stay light
(pydantic only; never llama_cpp or nats).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

VERSION = "0.1.0"

Kind = Literal["inference", "embedding"]
Level = Literal["healthy", "warning", "critical"]
WorkerStatus = Literal["starting", "online", "draining", "stopping"]
FinishReason = Literal["stop", "length", "error", "cancelled"]

# --- subjects --------------------------------------------------------------

STREAM_NAME = "FLEET_REQUESTS"
QUEUE_SUBJECTS = "queue.>"

# Headers the ingress adds to a queued message.
H_REPLY_TO = "Fleet-Reply-To"
H_ENQUEUED_AT = "Fleet-Enqueued-At"  # ms since the epoch
H_DEADLINE = "Fleet-Deadline"  # ms since the epoch; after it the caller has given up
H_REQ_ID = "Fleet-Req-Id"
H_INGRESS = "Fleet-Ingress"  # worker_id of the ingress that queued it
# Headers a caller may set (kept through the queue into the log row and the reply headers).
H_TIMEOUT_MS = "Fleet-Timeout-Ms"
H_TRACE_ID = "Fleet-Trace-Id"
H_TRACEPARENT = "traceparent"  # W3C trace context
H_PRIORITY = "Fleet-Priority"  # 1 (default) to 3: which of the model's queues the request waits in
CALLER_HEADERS = (H_TIMEOUT_MS, H_TRACE_ID, H_TRACEPARENT, H_PRIORITY)
# Priorities, highest first: each has its own subject and durable consumer per model, and a worker with a free
# slot takes from the highest that has a request (docs/architecture.md, "Priorities").
PRIORITIES = (3, 2, 1)
DEFAULT_PRIORITY = 1
# Set on an answer sent although another attempt of the same request may have answered too.
H_DUPLICATE = "Fleet-Duplicate"
# JetStream's de-duplication id: the ingress sets it to the req_id (a retry within the window is one job).
H_MSG_ID = "Nats-Msg-Id"
# ADR-32 error headers on error replies.
H_ERROR_CODE = "Nats-Service-Error-Code"
H_ERROR = "Nats-Service-Error"

_TOKEN_BAD = re.compile(r"[^A-Za-z0-9_-]")


def token(model: str) -> str:
    """A model name as one NATS subject token / durable name (dots and other separators become `_`)."""
    return _TOKEN_BAD.sub("_", model)


def request_subject(kind: Kind, model: str) -> str:
    """Public core request subject; the model name is used as written (it may contain dots)."""
    return f"{kind}.request.{model}"


def queue_subject(kind: Kind, model: str, priority: int = DEFAULT_PRIORITY) -> str:
    """Internal JetStream subject; never published to by callers. Priority 1 keeps the one-token name it always
    had; 2 and 3 add a `.p2` / `.p3` token (a model's token has no dots, so no name can collide)."""
    base = f"queue.{kind}.{token(model)}"
    return base if priority == DEFAULT_PRIORITY else f"{base}.p{priority}"


def consumer_name(kind: Kind, model: str, priority: int = DEFAULT_PRIORITY) -> str:
    base = f"work-{kind}-{token(model)}"
    return base if priority == DEFAULT_PRIORITY else f"{base}-p{priority}"


def priority_of(headers: Mapping[str, str] | None, body_priority: Any = None) -> int:
    """The request's priority: the body's `priority`, else the Fleet-Priority header, else 1; BadRequest
    `invalid_priority` for anything but 1, 2 or 3."""
    if body_priority is not None:
        if isinstance(body_priority, bool) or body_priority not in PRIORITIES:
            raise BadRequest("invalid_priority", f"priority {str(body_priority)[:20]!r} is not 1, 2 or 3 (3 is served "
                             "first; leave it out for 1)")
        return int(body_priority)
    given = (headers or {}).get(H_PRIORITY)
    if given is None:
        return DEFAULT_PRIORITY
    if given.strip() not in ("1", "2", "3"):
        raise BadRequest("invalid_priority", f"{H_PRIORITY} {given[:20]!r} is not 1, 2 or 3 (3 is served first)")
    return int(given)


def health_subject(model: str) -> str:
    return f"models.{model}.health"


def heartbeat_subject(model: str) -> str:
    return f"models.{token(model)}.heartbeat"


def monitoring_subject(kind: Kind, model: str) -> str:
    return f"monitoring.{kind}.{token(model)}"


def request_event_subject(model: str) -> str:
    """Where a worker publishes one RequestEvent per finished request (the monitor's Requests view). Workers
    publish their own model's; the monitor reads `events.request.*`; clients may do neither."""
    return f"events.request.{token(model)}"


REQUEST_EVENTS = "events.request.*"


def cancel_subject(kind: Kind, model: str) -> str:
    """Core subject every instance of a model listens on for `{"req_id": ...}` cancellations of any request
    (an open bus, or operators: the least-privilege example grants it to no client)."""
    return f"{kind}.cancel.{model}"


def owner_cancel_subject(kind: Kind, owner: str, model: str) -> str:
    """Where a caller cancels its own requests: honoured only for requests whose reply inbox is
    `_INBOX.<owner>.…`, so a server that lets each user publish only `<kind>.cancel.<user>.>` (and read only
    `_INBOX.<user>.>`) keeps one caller from cancelling another's request."""
    return f"{kind}.cancel.{owner}.{model}"


INBOX_PREFIX = "_INBOX"
REPLY_PREFIXES = (INBOX_PREFIX + ".",)  # where answers may go unless REPLY_PREFIXES says more
_SUBJECT_OK = re.compile(r"^[^\s*>]+$")


def is_inbox(subject: str, prefixes: tuple[str, ...] = REPLY_PREFIXES) -> bool:
    """A reply subject answers may go to: one of `prefixes` (`_INBOX.` by default), no wildcards, no blanks,
    no empty tokens."""
    return (subject.startswith(prefixes) and bool(_SUBJECT_OK.match(subject)) and ".." not in subject
            and not subject.endswith(".") and len(subject) <= MAX_SUBJECT)


def check_reply_to(subject: str | None, prefixes: tuple[str, ...] = REPLY_PREFIXES) -> None:
    """A 400 for a reply subject answers may not go to (a queue, a request subject, `$JS.API…`)."""
    if subject is not None and not is_inbox(subject, prefixes):
        allowed = " or ".join(f"{x}…" for x in prefixes)
        raise BadRequest("invalid_reply_to", f"reply_to {subject[:80]!r} is not an inbox; answers go only to "
                         f"{allowed} subjects")


def inbox_owner(inbox: str | None) -> str | None:
    """The owner token of a reply inbox `_INBOX.<owner>.<id>…` (nats-py's request inboxes have one too: the
    connection's random prefix); None for a bare `_INBOX.<id>` or anything else."""
    if not inbox:
        return None
    parts = inbox.split(".")
    return parts[1] if len(parts) >= 3 and parts[0] == "_INBOX" and parts[1] else None


def service_name(model: str) -> str:
    """ADR-32 service names allow only A-Z a-z 0-9 - _."""
    return token(model)


def ingress_group(kind: Kind, model: str) -> str:
    return f"ingress-{kind}-{token(model)}"


MAX_SUBJECT = 1024
REQ_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
MAX_STOPS = 16  # stop strings per request
MAX_LOGIT_BIAS = 1024  # token biases per request (OpenAI allows 300)
MAX_STOP_CHARS = 256
MAX_JSON_DEPTH = 64  # nesting of a request body; real ones use 4


TRACE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def trace_id(headers: Mapping[str, str]) -> str | None:
    """The caller's trace id: `Fleet-Trace-Id`, else the trace-id field of a W3C `traceparent`; a malformed one is
    a 400 `invalid_header` (NATS ingress and HTTP alike)."""
    given, parent = headers.get(H_TRACE_ID), headers.get(H_TRACEPARENT)
    if given is not None:
        if not TRACE_ID.fullmatch(given):
            raise BadRequest("invalid_header", f"{H_TRACE_ID} is 1-128 letters, digits, '_', '-', '.' or ':'")
        return given
    if parent is not None:
        if not (m := TRACEPARENT.fullmatch(parent)):
            raise BadRequest("invalid_header", "traceparent is not W3C trace context (00-<32 hex trace id>-<16 "
                             "hex parent id>-<2 hex flags>)")
        return m[1]
    return None


def now_ms() -> int:
    return int(time.time() * 1000)


def new_req_id() -> str:
    return uuid.uuid4().hex[:16]


# --- messages ----------------------------------------------------------------


class _Message(BaseModel):
    # Unknown fields are ignored; wrong types are rejected (no silent coercion of "abc" to a number).
    model_config = ConfigDict(extra="ignore", strict=False)


class Params(_Message):
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    repeat_penalty: float | None = Field(default=None, gt=0.0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (-100 bans it, 100 forces it)
    stop: list[str] | None = None
    seed: int | None = None
    grammar: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias_bounded(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        if v is not None:
            if len(v) > MAX_LOGIT_BIAS:
                raise ValueError(f"at most {MAX_LOGIT_BIAS} token biases")
            if any(t < 0 for t in v) or any(not -100.0 <= b <= 100.0 for b in v.values()):
                raise ValueError("token ids are >= 0 and biases between -100 and 100")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _stop_bounded(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if len(v) > MAX_STOPS:
                raise ValueError(f"at most {MAX_STOPS} stop strings")
            if any(len(x) > MAX_STOP_CHARS or not x for x in v):
                raise ValueError(f"stop strings are 1-{MAX_STOP_CHARS} characters")
        return v


class ChatMessage(_Message):
    role: Literal["system", "user", "assistant", "model"]
    content: str


def _req_id(v: str | None) -> str | None:
    if v is not None and not REQ_ID.match(v):
        raise ValueError("req_id is 1-128 letters, digits, '_', '-', '.' or ':' (omit it and the worker picks one)")
    return v


class InferenceRequest(_Message):
    req_id: str | None = None
    input: str | None = None
    messages: list[ChatMessage] | None = None
    params: Params = Field(default_factory=Params)
    raw: bool = False
    stream: bool = False
    reply_to: str | None = None
    timeout_ms: int | None = Field(default=None, gt=0)
    priority: int | None = Field(default=None, ge=1, le=3)

    _check_req_id = field_validator("req_id")(_req_id)

    def check(self, limits: Limits | None = None) -> None:
        limits = limits or Limits()
        if self.params.max_tokens is not None and self.params.max_tokens > limits.max_tokens:
            raise BadRequest("context_overflow", f"max_tokens {self.params.max_tokens} is more than this model "
                             f"answers ({limits.max_tokens}, MAX_TOKENS_LIMIT); ask for fewer")
        if self.params.grammar is not None and "::=" in self.params.grammar:
            if (problem := gbnf_problem(self.params.grammar, limits)) is not None:
                raise BadRequest("invalid_grammar", problem)
        check_reply_to(self.reply_to, limits.reply_prefixes)
        if self.messages:
            if not any(m.content.strip() for m in self.messages):
                raise BadRequest("empty_input", "messages contain no text; send at least one non-empty message")
        elif self.input is None or not self.input.strip():
            raise BadRequest("empty_input", "input is empty; send {\"input\": \"your prompt\"}")


class EmbeddingRequest(_Message):
    req_id: str | None = None
    input: str | list[str]
    model: str | None = None
    reply_to: str | None = None
    timeout_ms: int | None = Field(default=None, gt=0)
    priority: int | None = Field(default=None, ge=1, le=3)

    _check_req_id = field_validator("req_id")(_req_id)

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def check(self, limits: Limits | None = None) -> None:
        limits = limits or Limits()
        check_reply_to(self.reply_to, limits.reply_prefixes)
        texts = self.texts()
        if len(texts) > limits.embed_max_inputs:
            raise BadRequest("too_many_inputs", f"{len(texts)} inputs in one request; the limit is "
                             f"{limits.embed_max_inputs} (EMBED_MAX_INPUTS): split them over several requests")
        if not texts:
            raise BadRequest("empty_input", "input is an empty list; send a string or a list of strings")
        for i, t in enumerate(texts):
            if not t.strip():
                raise BadRequest("empty_input", f"input[{i}] is empty; every text must contain something")


class ErrorBody(_Message):
    code: int
    type: str
    message: str


class InferenceResponse(_Message):
    req_id: str
    model: str
    text: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    cached_tokens: int | None = None  # of tokens_in, taken from the KV cache (prefix reuse)
    finish_reason: FinishReason = "stop"
    duration_ms: float = 0.0
    queue_ms: float = 0.0
    worker_id: str = ""
    reasoning: str | None = None  # harmony models: the analysis channel
    error: ErrorBody | None = None
    done: bool | None = None  # set on the final message of a streamed answer


class StreamChunk(_Message):
    req_id: str
    index: int
    delta: str


class CancelRequest(_Message):
    req_id: str


class EmbeddingItem(_Message):
    object: Literal["embedding"] = "embedding"
    embedding: list[float]
    index: int


class Usage(_Message):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(_Message):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem] = Field(default_factory=list)
    model: str
    usage: Usage = Field(default_factory=lambda: Usage(prompt_tokens=0, total_tokens=0))
    req_id: str
    duration_ms: float = 0.0
    queue_ms: float = 0.0
    worker_id: str = ""
    error: ErrorBody | None = None


class QueueMetrics(_Message):
    pending_messages: int  # JetStream: num_pending + num_ack_pending of the model's consumer
    active_processing: int  # in this instance's hands right now
    queue_capacity: int
    total_processed: int
    total_failed: int
    last_processed_at: float | None = None  # epoch seconds of the last finished request; None if none yet
    slots: SlotUsage | None = None  # the engine's slots and KV cache (None until the model is loaded)


class SlotRequest(_Message):
    """One request in a worker's hands, as llama-server's /slots shows it: what each slot is doing."""

    req_id: str
    state: Literal["waiting", "prefill", "decode"]  # waiting: admitted, no slot or no KV room yet
    slot: int | None = None  # the engine's sequence (batched) or context number; None while waiting
    tokens_in: int = 0  # prompt tokens (0 until counted)
    tokens_out: int = 0  # generated so far
    elapsed_ms: float = 0.0  # since the worker started it


class SlotUsage(_Message):
    """What a worker's engine holds right now. Batched engine: sequences decoded together and the tokens of its
    shared KV cache (reserved by running requests: prompt + max_tokens each, or kept from finished ones for
    prefix reuse); the per-context engine reports only its contexts."""

    slots: int  # requests it can run at once
    busy: int  # running now
    waiting: int = 0  # admitted by the worker, waiting for a slot or for room in the KV cache
    kv_tokens: int | None = None  # the KV cache's size in tokens
    kv_reserved: int | None = None  # tokens reserved by running requests
    kv_kept: int | None = None  # tokens kept from finished requests for prefix reuse (given up when needed)
    requests: list[SlotRequest] = Field(default_factory=list)  # what each busy or waiting slot is doing


class WindowStats(_Message):
    """One worker's requests that finished in the last `window_s` seconds (STATS_WINDOW_S): what users watch.
    Percentiles are of `ok` requests and None when there are none; rates divide by the window (or by the time
    since the worker started, if shorter)."""

    window_s: float
    requests: int = 0  # finished in the window, any status
    rate_per_s: float = 0.0  # requests / window
    errors: int = 0  # finished as failed, rejected, expired or dead_letter (cancelled is not an error)
    error_rate: float = 0.0  # errors / requests; 0.0 when there were none
    latency_p50_ms: float | None = None  # dur_ms: taken by the worker -> answered
    latency_p95_ms: float | None = None
    ttft_p50_ms: float | None = None  # generations: taken -> first token
    queue_wait_p50_ms: float | None = None  # enqueued -> taken by a worker
    prefill_p50_ms: float | None = None  # generations: the prompt's share (= time to first token)
    decode_p50_ms: float | None = None  # generations: first token -> last
    tokens_out: int = 0  # generated in the window (embeddings: 0)
    tokens_per_s: float = 0.0  # tokens_out / window: the worker's throughput
    decode_tokens_per_s: float | None = None  # median per request: tokens_out / decode time (a request's speed)
    mean_service_ms: float | None = None  # mean dur_ms of ok requests: what expected_wait_s is computed from


class HostStats(_Message):
    """The machine a worker runs on (psutil), in its heartbeat."""

    cpu_percent: float  # all cores, since the last heartbeat
    memory_percent: float
    memory_used_mb: float
    memory_total_mb: float
    process_rss_mb: float  # this worker process
    load_1m: float | None = None
    gpus: list[dict[str, Any]] = Field(default_factory=list)  # name, utilization %, memory used/total MB if any


class Backpressure(_Message):
    level: Level  # from expected_wait_s (protocol.wait_level), critical also when the queue is full
    utilization: float  # pending / queue capacity
    expected_wait_s: float | None = None  # what a new request would wait: see protocol.expected_wait


class Alert(_Message):
    """Something an operator should see on the monitor (the stream was recreated, a request crashed workers)."""

    ts: float  # epoch seconds
    kind: str  # the event name in the worker's log (stream.recreated, request.poison, …)
    message: str
    level: Level = "warning"


class Health(_Message):
    """The health reply and the heartbeat body."""

    model_name: str
    worker_id: str
    kind: Kind
    status: WorkerStatus
    capabilities: list[str]
    endpoint: str | None = None
    nats_topic: str
    version: str
    model_info: dict[str, Any]
    queue_metrics: QueueMetrics
    backpressure_status: Backpressure
    started_at: float
    uptime_s: float
    heartbeat_interval_s: float
    seq: int
    # A random token per worker process, the same in every heartbeat: the monitor keeps the first one it saw for a
    # worker_id and ignores heartbeats with another (a forged `stopping`), until that worker has gone quiet.
    instance: str | None = None
    alerts: list[Alert] = Field(default_factory=list)  # the worker's recent warnings, newest last (at most 5)
    stats: WindowStats | None = None  # the last STATS_WINDOW_S seconds (None from an older worker)
    host: HostStats | None = None


class RequestEvent(_Message):
    """Published by a worker on request_event_subject when a request finishes, whatever the outcome (the
    monitor's Requests view, as Celery Flower's task list). No prompt or answer text unless LOG_PROMPTS=1."""

    ts: float  # epoch seconds it finished
    model_name: str
    worker_id: str
    kind: Kind
    req_id: str
    source: Literal["nats", "http"] = "nats"
    status: str  # ok, cancelled, rejected, expired, failed, handed_back, dead_letter (workers/outcome.py)
    finish_reason: str | None = None
    error_code: str | None = None  # the error body's type (context_overflow, expired, …) when it ended in one
    error: str | None = None  # "<status> <type>: <message>" as in the SQLite row
    latency_ms: float | None = None  # taken by the worker -> answered
    queue_ms: float = 0.0  # enqueued -> taken
    ttft_ms: float | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cached_tokens: int | None = None
    trace_id: str | None = None
    instance: str | None = None  # as in Health
    input: str | None = None  # only with LOG_PROMPTS=1 (first 2000 characters)
    output: str | None = None  # only with LOG_PROMPTS=1 (first 2000 characters)


class BackpressureReport(_Message):
    model_name: str
    worker_id: str
    pending_messages: int
    active_processing: int
    queue_capacity: int
    utilization: float
    status: Level
    worker_count: int
    timestamp: float
    instance: str | None = None  # as in Health: the monitor ignores reports from another instance
    slots: SlotUsage | None = None  # as in Health's queue_metrics
    expected_wait_s: float | None = None  # as in Health's backpressure_status


def expected_wait(pending: int, mean_service_s: float | None, live_slots: int) -> float | None:
    """What a request queued now would wait before a worker takes it. `pending` counts the model's requests queued
    or running; while fewer than the live workers' slots, one is free and the wait is 0.0. Otherwise the request
    starts after `pending - live_slots + 1` of them end, and the slots end one each recent mean service time
    between them: that count × mean ÷ slots. None when a request would wait but nothing was served recently (no
    service time to go by)."""
    if pending < max(live_slots, 1):
        return 0.0
    if mean_service_s is None or live_slots <= 0:
        return None
    return round((pending - live_slots + 1) * mean_service_s / live_slots, 3)


def wait_level(expected_wait_s: float | None, utilization: float, warning_s: float = 10.0,
               critical_s: float = 60.0, capacity_warning: float = 0.5, capacity_critical: float = 0.8) -> Level:
    """THE level of a model's queue: by the expected wait (BACKPRESSURE_WAIT_WARNING_S / _CRITICAL_S); a full
    queue (utilization ≥ 1: new requests are refused) is critical whatever the wait. Without a wait estimate
    (nothing served lately) the capacity fraction decides (BACKPRESSURE_WARNING / _CRITICAL), as
    backpressure_level."""
    if utilization >= 1.0:
        return "critical"
    if expected_wait_s is None:
        return backpressure_level(utilization, capacity_warning, capacity_critical)
    if expected_wait_s >= critical_s:
        return "critical"
    if expected_wait_s >= warning_s:
        return "warning"
    return "healthy"


def backpressure_level(utilization: float, warning: float = 0.5, critical: float = 0.8) -> Level:
    """THE mapping from queue utilization to a level; heartbeat, report, metrics and monitor all use it."""
    if utilization >= critical:
        return "critical"
    if utilization >= warning:
        return "warning"
    return "healthy"


# --- errors -------------------------------------------------------------------


class BadRequest(Exception):
    """A request the worker will not run; answered at once with a 4xx-style error."""

    status = 400
    recorded = False  # already in the request log (the HTTP routes log a refusal once)

    def __init__(self, type_: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.type = type_
        self.message = message
        if status is not None:
            self.status = status


@dataclass(frozen=True)
class Limits:
    """How much one request may ask of a worker (the worker's settings; these defaults are for tests)."""

    max_tokens: int = 1 << 20  # MAX_TOKENS_LIMIT (a worker: its CTX_SIZE unless set lower)
    embed_max_inputs: int = 2048  # EMBED_MAX_INPUTS, as OpenAI
    grammar_max_bytes: int = 64 * 1024  # GRAMMAR_MAX_BYTES
    grammar_max_depth: int = 64  # GRAMMAR_MAX_DEPTH: nesting of ( ) groups
    grammar_max_rules: int = 1000  # GRAMMAR_MAX_RULES: `::=` definitions
    grammar_max_optional: int = 128  # GRAMMAR_MAX_OPTIONAL: `?` and `*` items
    reply_prefixes: tuple[str, ...] = REPLY_PREFIXES


def gbnf_problem(text: str, limits: Limits) -> str | None:
    """Why a GBNF grammar is refused before llama.cpp sees it, or None. Its parser recurses once per nested group
    (20,000 levels crash the process), a left-recursive chain of 50,000 rules aborts it, and a chain of optional
    items makes the sampler's work per token grow exponentially (200 `"a"?` in a row: minutes per token, inside
    one C call nothing can interrupt). Counted outside strings, character classes and comments."""
    size = len(text.encode(errors="replace"))
    if size > limits.grammar_max_bytes:
        return (f"the grammar is {size} bytes; the limit is {limits.grammar_max_bytes} (GRAMMAR_MAX_BYTES): "
                "simplify it")
    depth = deepest = rules = optional = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":  # a comment runs to the end of the line
            while i < n and text[i] not in "\r\n":
                i += 1
        elif c in "\"[":  # a literal or a character class: skip it, honouring backslash escapes
            close = "\"" if c == "\"" else "]"
            i += 1
            while i < n and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        elif c in "?*":
            optional += 1
        elif c == ":" and text.startswith("::=", i):
            rules += 1
        i += 1
    if deepest > limits.grammar_max_depth:
        return (f"the grammar nests groups {deepest} deep; the limit is {limits.grammar_max_depth} "
                "(GRAMMAR_MAX_DEPTH): name the inner groups as rules")
    if rules > limits.grammar_max_rules:
        return f"the grammar has {rules} rules; the limit is {limits.grammar_max_rules} (GRAMMAR_MAX_RULES)"
    if optional > limits.grammar_max_optional:
        return (f"the grammar has {optional} optional or repeated items (? and *); the limit is "
                f"{limits.grammar_max_optional} (GRAMMAR_MAX_OPTIONAL), as each one multiplies the work per token")
    return None


def loads(data: bytes | str) -> Any:
    """JSON for a request body: 400 `invalid_json` for bad syntax or nesting deeper than MAX_JSON_DEPTH, 400
    `invalid_input` for bytes that are not UTF-8 and for lone surrogates (text llama.cpp cannot take)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRequest("invalid_input", f"body is not UTF-8 (byte {e.start}); send UTF-8 text") from None
    if _too_deep(data):
        raise BadRequest("invalid_json", f"body nests arrays or objects more than {MAX_JSON_DEPTH} deep")
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as e:
        raise BadRequest("invalid_json", f"body is not valid JSON ({e.msg} at character {e.pos})") from None
    except RecursionError:
        raise BadRequest("invalid_json", f"body nests more than {MAX_JSON_DEPTH} deep") from None
    if _SURROGATE_ESCAPE.search(data) is None:  # decoded UTF-8 holds none: only a `\udXXX` escape makes one
        return obj
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("invalid_input", "the body holds a lone UTF-16 surrogate (such as \\ud800), which is not "
                         "text; send valid Unicode") from None
    return obj


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _too_deep(text: str) -> bool:
    """Whether brackets nest deeper than MAX_JSON_DEPTH, cheaply and without recursion (strings skipped)."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return False
    depth, in_string, escaped = 0, False, False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif c in "]}":
            depth -= 1
    return False


def parse_request(kind: Kind, data: bytes, limits: Limits | None = None) -> InferenceRequest | EmbeddingRequest:
    """Decode and validate a request body, raising BadRequest with one readable sentence."""
    obj = loads(data)
    if not isinstance(obj, dict):
        raise BadRequest("invalid_request", "body must be a JSON object such as {\"input\": \"Hello\"}")
    try:
        req = KINDS[kind].request.model_validate(obj)
    except ValidationError as e:
        raise BadRequest("invalid_request", validation_message(e)) from None
    req.check(limits)
    return req


def validation_message(e: ValidationError) -> str:
    """pydantic's first complaint as one sentence naming the field."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    return f"{where}: {err['msg'].removeprefix('Value error, ')}"


# --- model kinds ---------------------------------------------------------------


@dataclass(frozen=True)
class KindSpec:
    """What a model kind means everywhere: its messages, its error reply, what it advertises and serves.

    Parsing, replies, capabilities, the engine and the HTTP guards read this table; adding a kind
    means adding a row here (and teaching the engine to run it), not another `if kind == ...`.
    """

    request: type[InferenceRequest] | type[EmbeddingRequest]
    response: type[InferenceResponse] | type[EmbeddingResponse]
    capability: str  # the capability every worker of this kind advertises (encoders may drop it, see modelinfo)
    generates: bool  # produces text: prompt formats, grammars, streaming and cancel apply
    http_route: str  # the OpenAI route that serves it, named in "wrong kind" errors

    def error_response(self, req_id: str, model: str, worker_id: str, err: ErrorBody,
                       finish_reason: FinishReason = "error") -> InferenceResponse | EmbeddingResponse:
        """The reply a caller gets when this kind's request fails: the kind's own response shape plus `error`."""
        if self.response is InferenceResponse:
            return InferenceResponse(req_id=req_id, model=model, worker_id=worker_id, error=err,
                                     finish_reason=finish_reason)
        return EmbeddingResponse(req_id=req_id, model=model, worker_id=worker_id, error=err)


KINDS: dict[Kind, KindSpec] = {
    "inference": KindSpec(request=InferenceRequest, response=InferenceResponse, capability="text-generation",
                          generates=True, http_route="/v1/chat/completions"),
    "embedding": KindSpec(request=EmbeddingRequest, response=EmbeddingResponse, capability="embeddings",
                          generates=False, http_route="/v1/embeddings"),
}


def error_body(status: int, type_: str, message: str) -> ErrorBody:
    return ErrorBody(code=status, type=type_, message=message)


def error_headers(err: ErrorBody) -> dict[str, str]:
    return {H_ERROR_CODE: str(err.code), H_ERROR: err.message}


def dumps(model: BaseModel) -> bytes:
    return model.model_dump_json(exclude_none=True).encode()


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode()

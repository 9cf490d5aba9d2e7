"""Async jobs and signed webhooks (issue 16 item 9): `POST /v1/jobs` answers 202 at once and runs the request later;
the result is kept for `GET /v1/jobs/{id}` and, with a `callback_url`, POSTed there signed.

A job is one request to `/v1/chat/completions`, `/v1/completions` or `/v1/embeddings`, sent through this gateway's
own ASGI app in process with the caller's key headers, so it gets everything a direct request gets (keys, rate
limits, routing, the cache, the fleet's queue), and nothing has a second copy of those rules. The record (status
queued → running → succeeded | failed, the response JSON or error body, its HTTP status) lives in the JetStream
Key-Value bucket FLEET_JOBS with a TTL of JOBS_TTL_S, so any gateway answers GET for a job any other accepted.

Signatures are Stripe's scheme: `X-Fleet-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`,
on our callbacks and on what `POST /webhooks/ingest` accepts from other systems (a body like POST /v1/jobs'); the
timestamp must be within 300 s of now, so a captured request cannot be replayed later. Several `v1=` are accepted
(a sender rotating its secret signs with both).

The limit: a job runs in the gateway that accepted it. If that gateway dies mid-job, the fleet request is still
answered by a worker (JetStream), but nobody is left to receive the answer. Each gateway running jobs writes a
heartbeat under `gateway.<id>` in the bucket every HEARTBEAT_S; a GET of a queued or running job whose gateway has
not been heard from for LOST_AFTER_S answers (and records) `failed` with `gateway_lost`: resubmit it. Gateways'
clocks are compared, so they should be NTP-synced (the margin is seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import socket
import time
import uuid
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from nats.errors import Error as NatsError
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import APIError, BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from workers import protocol as p
from workers.httpkit import Handler, error, error_fields, json_object, read_body, refusal

from .clients import INTERNAL
from .routes import Parts

BUCKET = "FLEET_JOBS"
SIGNATURE = "X-Fleet-Signature"
TOLERANCE_S = 300  # a signature's timestamp may be this far from now, either way
HEARTBEAT_S = 2.0
LOST_AFTER_S = 10.0  # five missed heartbeats, and room for clocks a little apart
CALLBACK_TRIES = 4  # the first and three retries, 1, 2 and 4 s apart
CALLBACK_TIMEOUT_S = 10.0
# Headers the job's in-process request keeps from the request that made it: the key (so keys and rate limits
# apply), the deadline and the trace.
FORWARDED = ("authorization", "x-api-key", *(h.lower() for h in p.CALLER_HEADERS))
PENDING = ("queued", "running")
log = logging.getLogger(__name__)


class JobSpec(BaseModel):
    """The body of POST /v1/jobs and of a signed POST /webhooks/ingest."""

    model_config = ConfigDict(extra="forbid")

    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"] = "/v1/chat/completions"
    """the OpenAI route that runs `request`"""
    request: dict[str, Any]
    """the OpenAI body, as that route takes it (`"stream": true` is refused: a job's answer is one JSON)"""
    callback_url: str | None = None
    """where the finished job is POSTed, signed (needs WEBHOOK_SECRET)"""


def sign(secret: str, body: bytes, t: int | None = None) -> str:
    """The X-Fleet-Signature value for `body` at unix time `t` (now)."""
    t = int(time.time()) if t is None else t
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, header: str | None, body: bytes, now: float | None = None) -> None:
    """Raises BadRequest 401: `invalid_signature` unless one `v1` is the HMAC of `body` at the header's `t`,
    `stale_signature` when that `t` is more than TOLERANCE_S from now."""
    fields = [part.strip().partition("=") for part in (header or "").split(",")]
    stamps = [v for k, _, v in fields if k == "t"]
    macs = [v for k, _, v in fields if k == "v1"]
    if len(stamps) != 1 or not stamps[0].isdigit() or len(stamps[0]) > 12 or not macs:
        raise p.BadRequest("invalid_signature", f"send {SIGNATURE}: t=<unix seconds>,v1=<hex HMAC-SHA256 of "
                           "\"<t>.<body>\" with the shared secret>", status=401)
    t = int(stamps[0])
    wanted = sign(secret, body, t).partition("v1=")[2]
    if not any(hmac.compare_digest(wanted, mac) for mac in macs):
        raise p.BadRequest("invalid_signature", f"{SIGNATURE} does not match the body; sign the exact bytes sent "
                           "with the shared secret (WEBHOOK_SECRET)", status=401)
    if abs((time.time() if now is None else now) - t) > TOLERANCE_S:
        raise p.BadRequest("stale_signature", f"the signature's timestamp is more than {TOLERANCE_S} s from the "
                           "gateway's clock; sign each request when it is sent (and keep clocks in sync)",
                           status=401)


class JobStore:
    """The FLEET_JOBS bucket: job records under their id, and each job-running gateway's heartbeat."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.gateway = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._kv: KeyValue | None = None
        self._beating: asyncio.Task[None] | None = None

    async def kv(self) -> KeyValue:
        if self._kv is None:
            js = self.parts.fleet.nc().jetstream()
            try:
                self._kv = await js.key_value(BUCKET)
            except BucketNotFoundError:
                try:
                    self._kv = await js.create_key_value(KeyValueConfig(
                        bucket=BUCKET, history=1, ttl=self.parts.settings.jobs_ttl_s, storage=StorageType.FILE,
                        description="async jobs of the gateways (gateway/jobs.py)"))
                except APIError:  # another gateway made it at the same moment (perhaps with another TTL): use it
                    self._kv = await js.key_value(BUCKET)
        return self._kv

    async def put(self, record: dict[str, Any]) -> dict[str, Any]:
        record = {**record, "heartbeat": time.time()}
        await (await self.kv()).put(record["id"], json.dumps(record).encode())
        return record

    async def get(self, job_id: str) -> tuple[dict[str, Any], int] | None:
        try:
            entry = await (await self.kv()).get(job_id)
        except KeyNotFoundError:
            return None
        return json.loads(entry.value or b"{}"), entry.revision or 0

    async def beating(self) -> None:
        """Start this gateway's heartbeat (once; the first beat is written before this returns)."""
        if self._beating is None:
            await self._beat()
            self._beating = asyncio.ensure_future(self._beat_forever())

    async def _beat(self) -> None:
        await (await self.kv()).put(f"gateway.{self.gateway}", json.dumps({"heartbeat": time.time()}).encode())

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            with contextlib.suppress(NatsError, APIError, TimeoutError, p.BadRequest):
                await self._beat()

    async def lost(self, record: dict[str, Any], revision: int) -> dict[str, Any]:
        """`record`, marked failed `gateway_lost` (and kept so) when it is pending and its gateway is silent."""
        if record.get("status") not in PENDING:
            return record
        heard = float(record.get("heartbeat") or 0)
        if time.time() - heard > LOST_AFTER_S:
            with contextlib.suppress(KeyNotFoundError):
                beat = await (await self.kv()).get(f"gateway.{record.get('gateway')}")
                heard = max(heard, float(json.loads(beat.value or b"{}").get("heartbeat") or 0))
        if time.time() - heard <= LOST_AFTER_S:
            return record
        failed = finished(record, "failed", None, {"error": error_fields(
            502, "gateway_lost", f"the gateway running this job ({record.get('gateway')}) has not been heard from "
            f"for {LOST_AFTER_S:g} s; its answer is lost: submit the job again")})
        with contextlib.suppress(KeyWrongLastSequenceError):  # its gateway wrote meanwhile: that record stands
            await (await self.kv()).update(record["id"], json.dumps(failed).encode(), last=revision)
        return failed


def finished(record: dict[str, Any], status: str, http_status: int | None, body: Any) -> dict[str, Any]:
    """`record` done: the answer's JSON in `result`, or the error body's `error` fields in `error`."""
    ok = status == "succeeded"
    err = body.get("error", body) if isinstance(body, dict) else body
    return {**record, "status": status, "finished": int(time.time()), "http_status": http_status,
            "result": body if ok else None, "error": None if ok else err}


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A record as GET and the callback show it (the heartbeat is the gateways' own business)."""
    return {k: v for k, v in record.items() if k != "heartbeat"}


class Jobs:
    """Accepts jobs, runs them in this gateway's event loop, and delivers their callbacks."""

    def __init__(self, parts: Parts) -> None:
        self.parts, self.store = parts, JobStore(parts)
        self.secret = parts.settings.webhook_secret.get_secret_value()  # WEBHOOK_SECRET_FILE read with the settings
        self._running: set[asyncio.Task[None]] = set()

    def spec_of(self, body: dict[str, Any]) -> JobSpec:
        spec = JobSpec.model_validate(body)
        if spec.request.get("stream"):
            raise p.BadRequest("invalid_request", "a job cannot stream: send \"stream\": false (or leave it out) "
                               "in \"request\"")
        if spec.callback_url is not None:
            url = urlsplit(spec.callback_url)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise p.BadRequest("invalid_callback_url", "callback_url must be an http:// or https:// URL")
            if not self.secret:
                raise p.BadRequest("webhooks_disabled", "a callback_url needs a signing key: set WEBHOOK_SECRET "
                                   "(or WEBHOOK_SECRET_FILE) on the gateway, or leave callback_url out and poll "
                                   "GET /v1/jobs/{id}")
        return spec

    async def submit(self, app: ASGIApp, spec: JobSpec, headers: dict[str, str]) -> dict[str, Any]:
        """Record the job as queued and start it; the queued record."""
        await self.store.beating()
        record = await self.store.put({
            "id": f"job-{uuid.uuid4().hex}", "object": "job", "status": "queued", "created": int(time.time()),
            "finished": None, "endpoint": spec.endpoint, "model": spec.request.get("model"), "req_id": None,
            "http_status": None, "result": None, "error": None, "gateway": self.store.gateway,
            "callback": {"url": spec.callback_url, "status": None, "attempts": 0} if spec.callback_url else None})
        task = asyncio.ensure_future(self.run(app, record, spec, headers))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return record

    async def run(self, app: ASGIApp, record: dict[str, Any], spec: JobSpec, headers: dict[str, str]) -> None:
        try:
            record = await self.store.put({**record, "status": "running"})
            done = await self.answer(app, record, spec, headers)
            try:
                done = await self.store.put(done)
            except (NatsError, APIError) as e:  # too large for the bucket's messages, most likely
                done = await self.store.put(finished(record, "failed", 502, {"error": error_fields(
                    502, "result_not_kept", f"the answer could not be stored ({e!r}); ask for less (fewer inputs, "
                    "smaller max_tokens) or send the request directly")}))
            if spec.callback_url is not None:
                outcome = await self.deliver(spec.callback_url, done)
                await self.store.put({**done, "callback": outcome})
        except Exception:  # NATS gone while recording: GET reports gateway_lost after LOST_AFTER_S
            log.exception("job %s could not be recorded", record["id"])

    async def answer(self, app: ASGIApp, record: dict[str, Any], spec: JobSpec,
                     headers: dict[str, str]) -> dict[str, Any]:
        """The job's request through this gateway's own app; the record finished with its answer."""
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway",
                                         timeout=None) as client:
                resp = await client.post(spec.endpoint, json=spec.request, headers=headers)
            body = resp.json()
        except Exception as e:  # a bug of ours: the job fails with the contract's 500
            log.exception("job %s failed", record["id"])
            return finished(record, "failed", 500, {"error": error_fields(
                500, "internal_error", f"internal error ({type(e).__name__}); see the gateway's log")})
        record = {**record, "req_id": resp.headers.get(p.H_REQ_ID)}
        return finished(record, "succeeded" if resp.status_code == 200 else "failed", resp.status_code, body)

    async def deliver(self, url: str, record: dict[str, Any]) -> dict[str, Any]:
        """POST the finished record to `url`, signed; retried on no answer or a 5xx / 429. The outcome."""
        body = json.dumps(public(record)).encode()
        status: int | None = None
        problem: str | None = None
        attempt = 0
        async with httpx.AsyncClient(timeout=CALLBACK_TIMEOUT_S) as client:
            for attempt in range(1, CALLBACK_TRIES + 1):
                try:
                    resp = await client.post(url, content=body, headers={
                        "Content-Type": "application/json", SIGNATURE: sign(self.secret, body)})
                    status, problem = resp.status_code, None
                    if status < 500 and status != 429:
                        break
                except httpx.HTTPError as e:
                    status, problem = None, f"{type(e).__name__}: {e}"[:300]
                if attempt < CALLBACK_TRIES:
                    await asyncio.sleep(2 ** (attempt - 1))
        outcome: dict[str, Any] = {"url": url, "status": status, "attempts": attempt}
        if problem:
            outcome["error"] = problem
        return outcome


def job_routes(parts: Parts) -> list[Route]:
    """POST /v1/jobs, GET /v1/jobs/{id} and POST /webhooks/ingest."""
    jobs = Jobs(parts)

    def refusing(fn: Handler) -> Handler:
        async def wrapped(request: Request) -> Response:
            try:
                return await fn(request)
            except (p.BadRequest, ValidationError) as e:
                return refusal(e)
            except (NatsError, APIError, TimeoutError) as e:
                return error(503, "nats_unavailable", f"the jobs bucket cannot be reached ({type(e).__name__}); "
                             "retry in a few seconds")
            except Exception as e:
                log.exception("%s %s failed", request.method, request.url.path)
                return error(500, "internal_error", f"internal error ({type(e).__name__}); see the gateway's log")
        return wrapped

    async def accepted(request: Request, body: dict[str, Any], extra: dict[str, str] | None = None) -> Response:
        spec = jobs.spec_of(body)
        headers = {k: v for k in FORWARDED if (v := request.headers.get(k)) is not None} | (extra or {})
        record = await jobs.submit(request.app, spec, headers)
        return JSONResponse({k: record[k] for k in ("id", "object", "status", "created")}, status_code=202)

    @refusing
    async def create(request: Request) -> Response:
        if parts.clients.keys:
            parts.clients.who(request)  # a missing or wrong key is 401 now, not a failed job later
        return await accepted(request, json_object(await read_body(request, parts.settings.gateway_max_request_bytes)))

    @refusing
    async def ingest(request: Request) -> Response:
        if not jobs.secret:
            raise p.BadRequest("webhooks_disabled", "webhook ingest is off: set WEBHOOK_SECRET (or "
                               "WEBHOOK_SECRET_FILE) on the gateway and sign requests with it", status=503)
        raw = await read_body(request, parts.settings.gateway_max_request_bytes)
        verify(jobs.secret, request.headers.get(SIGNATURE), raw)
        # the signature is its credential: the job runs as the client `webhook` (no key, no limits)
        return await accepted(request, json_object(raw), {INTERNAL: parts.clients.internal})

    @refusing
    async def show(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        found = await jobs.store.get(job_id) if job_id.startswith("job-") and job_id[4:].isalnum() else None
        if found is None:
            raise p.BadRequest("job_not_found", f"no job {job_id!r}: it never existed or is older than "
                               f"JOBS_TTL_S ({parts.settings.jobs_ttl_s:g} s)", status=404)
        record = await jobs.store.lost(*found)
        return JSONResponse(public(record))

    return [
        Route("/v1/jobs", create, methods=["POST"]),
        Route("/v1/jobs/{job_id}", show, methods=["GET"]),
        Route("/webhooks/ingest", ingest, methods=["POST"]),
    ]

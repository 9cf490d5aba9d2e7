"""One JetStream message's whole life, and the pull loop that feeds them in.

Pull from the model's durable consumers with at most `in_flight_limit` messages in flight, priority 3 and 2 first
(asked without waiting), then 1 (docs/architecture.md, "Priorities"). For each message:
check the caller's deadline, parse, run (keeping the message alive and streaming pieces if asked),
then leave through one exit (`_settle`): reply and ack, give it back for another try, or hand it
back at once when a drain ran out of time; and record the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from . import protocol as p
from .answered import Answered, Attempts
from .config import Settings
from .metrics import Metrics
from .outcome import Finished, Intake, Ledger
from .queue import Replier, reply_in_payload, reply_targets
from .runner import DeltaPump, Execution, Request, Runner
from .store import Store

FETCH_WAIT_S = 1.0  # a pull lost with a dead consumer leader costs at most this
NO_WAIT_PULL = b'{"batch": 1, "no_wait": true}'
NO_WAIT_TIMEOUT_S = 2.0
ASK_EVERY_S = 1.0  # the queues above priority 1 are asked at least this often, heard of or not
STATUS = "Status"  # the header of a JetStream status message (nats.js.api.Header.STATUS)
ABORT_WAIT_S = 30.0
log = logging.getLogger(__name__)


class Above:
    """The model's queues above priority 1, asked highest first and without waiting (JetStream's `no_wait` pull:
    a message at once, or a 404 status when the queue is empty). The pulls answer on one inbox of this worker's
    (a delivered message keeps its own subject, so a request/reply inbox would not match it), one at a time.

    They are asked only when something may wait there: the worker hears every publish to those queue subjects (a
    JetStream publish is a core one too, `listen`), and asks at least every ASK_EVERY_S anyway, for a request given
    back or redelivered (nothing is published then). A fleet that never uses priorities pays no round trip."""

    def __init__(self, nc: NATS, durables: dict[int, str], queues: dict[int, str]) -> None:
        self.nc = nc
        self.subjects = [f"$JS.API.CONSUMER.MSG.NEXT.{p.STREAM_NAME}.{durables[pr]}"
                         for pr in sorted(durables, reverse=True)]
        self.queues = list(queues.values())
        self._inbox: Subscription | None = None
        self._subs: list[Subscription] = []
        self._lock = asyncio.Lock()
        self.heard = 1  # publishes heard (the first: whatever was queued before this worker started)
        self.cleared = 0  # all heard up to this were found taken
        self.asked_at = -ASK_EVERY_S

    async def listen(self, new: Callable[[], None]) -> None:
        """Hear each request queued above priority 1 (by any instance's ingress) and call `new`."""
        async def heard(_msg: Msg) -> None:
            self.heard += 1
            new()

        self._subs = [await self.nc.subscribe(q, cb=heard) for q in self.queues]

    def worth_asking(self) -> bool:
        return self.heard > self.cleared or time.monotonic() - self.asked_at >= ASK_EVERY_S

    async def next(self) -> Msg | None:
        """The oldest request of the highest priority that has one; None when none waits."""
        if not self.worth_asking():
            return None
        async with self._lock:
            seen, self.asked_at = self.heard, time.monotonic()
            if self._inbox is None:
                self._inbox = await self.nc.subscribe(self.nc.new_inbox())
            for subject in self.subjects:
                while self._inbox.pending_msgs:  # the answer to a pull that timed out: a request is ours to run
                    if _request(late := await self._inbox.next_msg(timeout=0.1)):
                        return late
                await self.nc.publish(subject, NO_WAIT_PULL, reply=self._inbox.subject)
                if _request(msg := await self._inbox.next_msg(timeout=NO_WAIT_TIMEOUT_S)):
                    return msg
            self.cleared = max(self.cleared, seen)  # a publish heard meanwhile is asked for at the next turn
        return None

    async def close(self) -> None:
        for sub in [*self._subs, *([self._inbox] if self._inbox else [])]:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs, self._inbox = [], None


def _request(msg: Msg) -> bool:
    """A delivered request, not a status (404 no messages, 408, 409 …)."""
    return not (msg.headers or {}).get(STATUS)


class Consumer:
    def __init__(self, psub: JetStreamContext.PullSubscription, *, settings: Settings, runner: Runner,
                 replier: Replier, ledger: Ledger, store: Store, metrics: Metrics,
                 answered: Answered | None = None, attempts: Attempts | None = None,
                 above: Above | None = None) -> None:
        self.psub, self.settings, self.runner, self.replier = psub, settings, runner, replier
        self.above = above  # None: priority 1 only
        self.ledger, self.store, self.metrics = ledger, store, metrics
        self.answered = answered  # None: at-least-once (a redelivered request may be answered twice)
        self.attempts = attempts  # None: no crash counting (a poison message is retried up to max_deliver)
        self.limits = settings.limits
        self.in_flight: dict[asyncio.Task[None], Msg] = {}
        self._lent: set[asyncio.Task[None]] = set()  # tasks that gave their slot back early (_lend_slot)
        self.slots = asyncio.Semaphore(in_flight_limit(settings))
        self.aborted = False  # set when a drain runs out of time: whatever is running goes back to the queue
        self._pull: asyncio.Task[None] | None = None
        self._wakers: set[asyncio.Task[None]] = set()

    # --- the pull loop ---------------------------------------------------------------------

    def start(self) -> None:
        self._pull = asyncio.create_task(self._pull_loop(), name="pull")

    async def stop_pulling(self) -> None:
        """Stop fetching and drop the pull subscription. A message JetStream delivered after a fetch gave up
        would otherwise sit in the subscription unread, and the connection's drain would wait its whole
        timeout (30 s) for it at shutdown; unread, it is simply redelivered after ack_wait."""
        for waker in list(self._wakers):
            waker.cancel()
        if self._pull is not None:
            self._pull.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pull
            self._pull = None
            with contextlib.suppress(Exception):
                await self.psub.unsubscribe()
            if self.above is not None:
                await self.above.close()

    async def drain(self, timeout: float, abort: Callable[[], None]) -> None:
        """Stop pulling, let in-flight requests finish for up to `timeout`, then abort and hand back the rest."""
        await self.stop_pulling()
        if self.in_flight:
            await asyncio.wait(list(self.in_flight), timeout=timeout)
        if self.in_flight:
            # Out of time: stop the generations and hand the messages back now (not after ack_wait),
            # so another worker takes them. The threads must finish before the contexts are freed.
            self.aborted = True
            abort()
            await asyncio.wait(list(self.in_flight), timeout=ABORT_WAIT_S)

    async def _next(self) -> Msg:
        """The next request for a free slot: the highest priority queue above 1 that has one, else priority 1's
        (waiting up to FETCH_WAIT_S for one)."""
        if self.above is not None and (msg := await self.above.next()) is not None:
            return msg
        return (await self.psub.fetch(1, timeout=FETCH_WAIT_S))[0]

    def wake(self) -> None:
        """A request was queued above priority 1: a spare slot takes it now rather than after the pull of priority
        1 that holds one slot ends (FETCH_WAIT_S at most, all this costs a one-slot worker)."""
        if self._pull is None or self.above is None or self.slots.locked():
            return
        waker = asyncio.create_task(self._take_above(), name="wake")
        self._wakers.add(waker)
        waker.add_done_callback(self._wakers.discard)

    async def _take_above(self) -> None:
        if self.above is None or self.slots.locked():
            return
        await self.slots.acquire()
        try:
            msg = await self.above.next()
        except Exception:  # disconnected or JetStream busy: the pull loop asks again at its next turn
            msg = None
        if msg is None:
            self.slots.release()
            return
        self._start(msg)

    def _start(self, msg: Msg) -> None:
        task = asyncio.create_task(self.handle(msg))
        self.in_flight[task] = msg
        self.metrics.running.labels(self.settings.model_name).set(len(self.in_flight))
        task.add_done_callback(self._done)

    async def _pull_loop(self) -> None:
        backoff = 0.1
        while True:
            await self.slots.acquire()
            try:
                msg = await self._next()
            except (TimeoutError, nats.errors.TimeoutError):
                self.slots.release()
                continue
            except asyncio.CancelledError:
                self.slots.release()
                raise
            except Exception as e:  # disconnected, JetStream restarting: wait and retry
                self.slots.release()
                self.store.event("queue.fetch_failed", str(e) or type(e).__name__, level="warning")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.1
            self._start(msg)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.in_flight.pop(task, None)
        self.metrics.running.labels(self.settings.model_name).set(len(self.in_flight))
        if task in self._lent:
            self._lent.discard(task)
        else:
            self.slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("worker: request task failed: %r", task.exception())

    # --- one message -------------------------------------------------------------------------

    async def handle(self, msg: Msg) -> None:
        s = self.settings
        h = msg.headers or {}
        start = p.now_ms()
        req_id = h.get(p.H_REQ_ID) or p.new_req_id()
        enqueued = _int(h.get(p.H_ENQUEUED_AT), start)
        deadline = _int(h.get(p.H_DEADLINE), enqueued + s.default_timeout_ms)
        intake = Intake(req_id=req_id, worker_id=s.worker_id, trace_id=h.get(p.H_TRACE_ID),
                        traceparent=h.get(p.H_TRACEPARENT), raw_input=msg.data.decode(errors="replace"),
                        deliveries=msg.metadata.num_delivered or 1, queue_ms=float(start - enqueued))
        targets = [h.get(p.H_REPLY_TO)]
        if intake.deliveries > 1 and self.answered is not None and await self.answered.answered_by_other(msg):
            self.store.event("request.duplicate", "delivered again after it was answered (by this worker or "
                             "another); acked without running it", req_id=req_id, deliveries=intake.deliveries)
            await self._ack(msg)
            return
        crashes = await self.attempts.begin(msg) if self.attempts is not None else 0
        if crashes >= s.poison_max_crashes:
            await self._poisoned(msg, intake, crashes, targets)
            return
        if crashes:
            self.store.event("request.suspect", f"the last {crashes} attempt(s) at this request ended with their "
                             "worker gone (killed, crashed or stopped); running it again", level="warning",
                             req_id=req_id, deliveries=intake.deliveries)
        reply: tuple[bytes, dict[str, str] | None] | None = None
        try:
            if start > deadline:
                raise p.BadRequest("expired", f"the caller's deadline passed {start - deadline} ms before a worker "
                                   "was free; the request was skipped", status=504)
            req = p.parse_request(s.model_kind, msg.data, self.limits)
            targets.append(req.reply_to)
            owner = p.inbox_owner(targets[0] or req.reply_to)  # whose cancels count (protocol.owner_cancel_subject)
            if self.runner.was_cancelled(req_id, owner):
                raise p.BadRequest("cancelled", "the caller cancelled the request before it ran", status=499)
            done = await self._run(req, req_id, msg, intake, self._targets(targets), owner, deadline)
        except p.BadRequest as e:  # a real answer, even during a drain
            finished = Finished.refused(intake, e, float(p.now_ms() - start))
            reply = self.replier.error(req_id, e.status, e.type, e.message, finished.finish_reason or "error")
        except Exception as e:
            finished = (Finished.handed_back(intake) if self.aborted
                        else Finished.failed(intake, e, float(p.now_ms() - start)))
        else:  # an aborted generation is cut short: not an answer
            finished = Finished.handed_back(intake) if self.aborted else Finished.ok(intake, done.facts)
            reply = (p.dumps(done.body), None)
        await self._settle(msg, finished, reply, self._targets(targets), crashes)

    def _targets(self, candidates: list[str | None]) -> list[str]:
        return reply_targets(*candidates, prefixes=self.limits.reply_prefixes)

    async def _poisoned(self, msg: Msg, intake: Intake, crashes: int, targets: list[str | None]) -> None:
        """The request took `crashes` workers down with it: answer dead_letter and remove it, whatever the cause."""
        message = (f"the request crashed {crashes} workers and was removed from the queue; see the worker log "
                   "(make logs) and do not send it again unchanged")
        data, headers = self.replier.error(intake.req_id, 500, "dead_letter", message)
        payload_reply = reply_in_payload(msg.data)
        await self.replier.send(self._targets([*targets, payload_reply]), data,
                                self._traced(headers, intake), intake.req_id)
        self.store.event("request.poison", message, level="error", req_id=intake.req_id,
                         deliveries=intake.deliveries)
        await self._ack(msg)
        self.ledger.record(Finished.dead_letter(intake, message))

    async def _settle(self, msg: Msg, finished: Finished, reply: tuple[bytes, dict[str, str] | None] | None,
                      targets: list[str], crashes: int = 0) -> None:
        """The one exit: answer and ack, or give the message back; then record how it ended."""
        recorded = False
        if finished.status == "handed_back":
            await self._give_back(msg, crashes)  # at once: another worker takes it
        elif finished.status == "failed" or reply is None:
            # Unexpected: another try after a pause; after max_deliver the dead-letter handler answers.
            self.store.event("request.failed", finished.error or "", level="error", req_id=finished.intake.req_id,
                             deliveries=finished.intake.deliveries)
            await self._give_back(msg, crashes, delay=1.0)
        else:
            data, headers = reply
            headers = self._traced(headers, finished.intake)
            claim = "mine" if self.answered is None else await self.answered.claim(msg)
            if claim == "theirs":
                self.store.event("request.duplicate", "delivered again after another worker answered it; "
                                 "not answered twice", req_id=finished.intake.req_id)
            else:
                if claim != "mine":
                    headers[p.H_DUPLICATE] = "true"
                insist = finished.status not in ("cancelled", "expired")  # those callers have stopped listening

                def decided() -> None:  # recorded before the answer waits for its caller: the log does not wait
                    nonlocal recorded
                    recorded = True
                    self.ledger.record(finished)

                if not await self._answer(targets, data, headers, finished.intake.req_id, msg, insist, decided):
                    # Not confirmed (the connection dropped): no ack, the claim released, so the next attempt
                    # answers (marked Fleet-Duplicate: this answer may have reached the caller all the same).
                    if self.answered is not None:
                        await self.answered.release(msg)
                    await self._give_back(msg, crashes)
                    self.ledger.record(Finished.handed_back(finished.intake))
                    return
                if self.answered is not None:
                    self.answered.answer_confirmed(msg)
            await self._ack(msg)
        if not recorded:
            self.ledger.record(finished)

    async def _answer(self, targets: list[str], data: bytes, headers: dict[str, str], req_id: str,
                      msg: Msg | None = None, insist: bool = True, decided: Callable[[], None] | None = None) -> bool:
        """Publish the answer and wait until the server has it: a publish during a reconnect waits in the
        client's buffer, so keep asking (a flush goes out behind it) until the server confirms or ack_wait runs
        out; False when it never does (the message is then answered again by the next attempt).

        A confirmed answer may still have found nobody listening: after a broker restart the worker can be back
        before its caller has subscribed again, and the server drops what no subscription matches. Such copies
        (the server says so: `Replier.unheard`) are sent again until the caller listens, for up to
        REPLY_LISTEN_S, while the message is kept; then it is given up as a caller gone. Not with `insist` off (the
        answer to a cancel or an expired request: that caller has stopped listening). Once the server has confirmed
        a first copy the outcome is decided (`decided()` records it, so the log does not wait for the caller)."""
        give_up = time.monotonic() + self.settings.reply_listen_s
        first = True
        while True:
            try:
                sent = await self.replier.send(targets, data, headers or None, req_id, watch=True)
            except Exception as e:
                if not first:  # a copy the server confirmed earlier stands
                    return True
                self.store.event("reply.unconfirmed", f"the answer could not be sent ({e!r}); it will be sent "
                                 "again", level="warning", req_id=req_id)
                return False
            # Two round trips: the server's no-responders status arrives before the first PONG as measured here, but
            # once under load (CI) a copy nobody heard was counted as heard; a second round trip gives a status that
            # trails the first PONG the time to arrive (0.1-0.3 ms more per answer).
            if not await self._confirmed(req_id) or not await self._confirmed(req_id):
                return not first  # a copy the server confirmed earlier stands
            targets = await self.replier.unheard(sent)
            if not targets or not insist:
                return True
            if first and decided is not None:
                decided()
            first = False
            if time.monotonic() > give_up:
                self.store.event("reply.unheard", f"nobody listened on {', '.join(targets)} for "
                                 f"{self.settings.reply_listen_s:g} s: the caller has gone; its answer is only in "
                                 "this log", level="warning", req_id=req_id)
                return True
            if self._lend_slot():  # the first time: waiting for a caller is no reason to pull less
                self.store.event("reply.waiting", f"nobody listens on {', '.join(targets)} (a caller reconnecting?);"
                                 f" sending the answer again for up to {self.settings.reply_listen_s:g} s",
                                 req_id=req_id)
            if msg is not None:
                with contextlib.suppress(Exception):
                    await msg.in_progress()
            await asyncio.sleep(0.25)

    async def _confirmed(self, req_id: str) -> bool:
        deadline = time.monotonic() + self.settings.queue_ack_wait_s
        while True:
            try:
                await self.replier.nc.flush(timeout=1)
                return True
            except Exception as e:
                if time.monotonic() > deadline or self.replier.nc.is_closed:
                    self.store.event("reply.unconfirmed", f"the server did not confirm the answer ({e!r}); it "
                                     "will be sent again", level="warning", req_id=req_id)
                    return False
                await asyncio.sleep(0.2)

    def _lend_slot(self) -> bool:
        """Give the current task's in-flight slot back before the task ends; True the first time."""
        task = asyncio.current_task()
        if task is None or task in self._lent:
            return False
        if task in self.in_flight:
            self._lent.add(task)
            self.slots.release()
        return True

    async def _give_back(self, msg: Msg, crashes: int, delay: float | None = None) -> None:
        if self.attempts is not None:
            await self.attempts.settled(msg, crashes)
        with contextlib.suppress(Exception):  # disconnected: redelivered after ack_wait instead
            await msg.nak(delay=delay)

    @staticmethod
    def _traced(headers: dict[str, str] | None, intake: Intake) -> dict[str, str]:
        out = dict(headers or {})
        if intake.trace_id:
            out[p.H_TRACE_ID] = intake.trace_id
        return out

    async def _ack(self, msg: Msg) -> None:
        """Ack and wait for JetStream's confirmation, again until it comes (within ack_wait): an ack sent while
        the consumer has no leader (an election: seconds) is lost and the answered request delivered again."""
        deadline = time.monotonic() + self.settings.queue_ack_wait_s
        while True:
            try:
                await msg.ack_sync(timeout=1.0)
                return
            except nats.errors.NoRespondersError:  # the consumer is gone (deleted; healing.py recreates it)
                self.store.event("queue.ack_failed", "the ack found no consumer; the message went with it",
                                 level="warning")
                return
            except (TimeoutError, nats.errors.Error) as e:
                if time.monotonic() > deadline:
                    self.store.event("queue.ack_failed", f"no confirmation of the ack: {e!r}", level="warning")
                    return
                await asyncio.sleep(0.1)

    async def _run(self, req: Request, req_id: str, msg: Msg, intake: Intake, targets: list[str],
                   owner: str | None, deadline: int) -> Execution:
        """Run on the engine, keeping the JetStream message alive; stream pieces if the caller asked."""
        keepalive = asyncio.create_task(self._keep_alive(msg))
        pump: DeltaPump | None = None
        if isinstance(req, p.InferenceRequest) and req.stream:
            async def publish(index: int, delta: str) -> None:
                await self.replier.send(targets, p.dumps(p.StreamChunk(req_id=req_id, index=index, delta=delta)))

            pump = DeltaPump(publish)
        try:
            done = await self.runner.execute(req, req_id, queue_ms=intake.queue_ms, owner=owner,
                                             on_delta=pump.push if pump else None, deadline_ms=deadline)
        finally:
            keepalive.cancel()
            if pump is not None:
                await pump.close()
        if pump is not None and isinstance(done.body, p.InferenceResponse):
            done.body.done = True
        return done

    async def _keep_alive(self, msg: Msg) -> None:
        """Tell JetStream the message is still being worked on, well within ack_wait."""
        interval = max(0.5, self.settings.queue_ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(Exception):
                await msg.in_progress()


def in_flight_limit(settings: Settings) -> int:
    """Requests a worker runs at once: WORKER_CONCURRENCY, or for embeddings as many as one decode can group
    (EMBED_BATCH_MAX), since a request waiting for the next decode is cheaper in the worker than in the queue."""
    if p.KINDS[settings.model_kind].generates:
        return settings.worker_concurrency
    return max(settings.worker_concurrency, settings.embed_batch_max)


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        return default

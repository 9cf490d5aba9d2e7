"""The request path end to end: plain core requests in, one answer out, through JetStream."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import nats
import pytest

from workers import protocol as p

from .conftest import EMBED_ENV, ask

pytestmark = pytest.mark.model  # every test here starts a worker that loads the model

SUBJECT = "inference.request.gemma3-270m"


async def collect(nc: nats.NATS, inbox: str, first_timeout: float, linger: float) -> list[nats.aio.msg.Msg]:
    """Every message on `inbox`: wait for the first, then keep listening `linger` seconds for extras."""
    sub = await nc.subscribe(inbox)
    got = [await sub.next_msg(timeout=first_timeout)]
    end = time.monotonic() + linger
    while (left := end - time.monotonic()) > 0:
        try:
            got.append(await sub.next_msg(timeout=left))
        except nats.errors.TimeoutError:
            break
    await sub.unsubscribe()
    return got


async def test_plain_core_request_gets_the_answer_as_its_only_reply(start_worker, nc):
    await start_worker()
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(SUBJECT, b'{"input":"Say hello.","params":{"max_tokens":8,"temperature":0}}', reply=inbox)
    first = await sub.next_msg(timeout=60)
    body = json.loads(first.data)
    assert "stream" not in body and "seq" not in body, f"got a PubAck: {body}"
    assert body["text"] and body["model"] == "gemma3-270m" and body["tokens_out"] >= 1
    assert body["finish_reason"] in ("stop", "length") and body["worker_id"]
    try:
        extra = await sub.next_msg(timeout=1.5)
        raise AssertionError(f"second reply: {extra.data!r}")
    except nats.errors.TimeoutError:
        pass


async def test_raw_protocol_client_gets_the_answer(start_worker, nats_server):
    """What `nats req` does, spelled out on a socket: SUB an inbox, PUB with a reply subject, read MSG."""
    await start_worker()

    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", nats_server.port), timeout=60) as s:
            f = s.makefile("rb")
            assert f.readline().startswith(b"INFO")
            payload = b'{"input":"Name a colour.","params":{"max_tokens":6,"temperature":0}}'
            s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":false}\r\n'
                      b"SUB _INBOX.raw 1\r\n"
                      + f"PUB {SUBJECT} _INBOX.raw {len(payload)}\r\n".encode() + payload + b"\r\nPING\r\n")
            while True:
                line = f.readline()
                if line.startswith(b"MSG"):
                    size = int(line.split()[-1])
                    return f.read(size + 2)[:-2]
                assert not line.startswith(b"-ERR"), line

    body = json.loads(await asyncio.to_thread(exchange))
    assert body["text"] and body["tokens_out"] >= 1


async def test_embeddings_for_a_string_and_a_list(start_worker, nc):
    await start_worker(EMBED_ENV)
    subject = "embedding.request.gemma3-270m-embed"
    one = await ask(nc, subject, {"input": "The cat sat on the mat."})
    assert one["object"] == "list" and len(one["data"]) == 1
    assert len(one["data"][0]["embedding"]) == 640 and one["usage"]["prompt_tokens"] > 0
    many = await ask(nc, subject, {"input": ["The cat sat on the mat.", "Stock prices fell.", "Hello"]})
    assert [d["index"] for d in many["data"]] == [0, 1, 2]
    assert all(len(d["embedding"]) == 640 for d in many["data"])
    again = await ask(nc, subject, {"input": "The cat sat on the mat."})
    assert again["data"][0]["embedding"] == one["data"][0]["embedding"]  # identical text, identical vector
    # inside a batch the same text comes out the same up to float rounding
    a, b = one["data"][0]["embedding"], many["data"][0]["embedding"]
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3
    assert many["data"][0]["embedding"] != many["data"][1]["embedding"]


async def test_payload_reply_to_is_answered_too(start_worker, nc):
    """Older clients put `reply_to` in the body and publish without a reply subject."""
    await start_worker()
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    body = {"input": "Hi", "reply_to": inbox, "params": {"max_tokens": 4, "temperature": 0}}
    await nc.publish(SUBJECT, json.dumps(body).encode())
    msg = await sub.next_msg(timeout=60)
    assert json.loads(msg.data)["tokens_out"] >= 1


async def test_two_workers_of_a_dotted_model_share_the_load_once_each(start_worker, nc):
    name = "gemma3.test-270m"
    a = await start_worker(MODEL_NAME=name, WORKER_CONCURRENCY=1)
    b = await start_worker(MODEL_NAME=name, WORKER_CONCURRENCY=1)
    subject = p.request_subject("inference", name)
    inboxes = [nc.new_inbox() for _ in range(8)]
    subs = [await nc.subscribe(i) for i in inboxes]
    for i, inbox in enumerate(inboxes):
        body = {"req_id": f"share-{i}", "input": f"Count to {i + 2}.", "params": {"max_tokens": 24}}
        await nc.publish(subject, json.dumps(body).encode(), reply=inbox)
    replies = [json.loads((await s.next_msg(timeout=120)).data) for s in subs]
    await asyncio.sleep(1.0)
    for s in subs:  # exactly one answer per caller
        assert s.pending_msgs == 0
    assert sorted(r["req_id"] for r in replies) == sorted(f"share-{i}" for i in range(8))
    workers = {r["worker_id"] for r in replies}
    assert workers == {f"{name}-{socket.gethostname()}-{w.proc.pid}" for w in (a, b)}

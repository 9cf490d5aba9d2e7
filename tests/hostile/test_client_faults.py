"""The CLIs' client when the broker goes away: a clear error at once, never a wait for the whole timeout and
never silence (issue 13). A plain nats-py subscriber stands in for a worker that has not answered yet: it is a
real NATS client on a real server, which is all this needs."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

from cli.client import FleetClient, NoServer


async def test_a_broker_lost_mid_request_is_an_error_at_once_and_so_is_the_next_request(nats_server):
    slow = await nats.connect(nats_server.url, max_reconnect_attempts=0)

    async def never(_msg: nats.aio.msg.Msg) -> None:
        pass

    await slow.subscribe("inference.request.m", cb=never)
    await slow.flush()
    async with FleetClient(nats_server.url) as client:
        waiting = asyncio.create_task(client.infer("m", {"input": "hi"}, timeout=30))
        await asyncio.sleep(0.3)
        nats_server.proc.kill()
        nats_server.proc.wait()
        t0 = time.monotonic()
        with pytest.raises(NoServer, match="lost while waiting"):
            await waiting
        assert time.monotonic() - t0 < 2
        with pytest.raises(NoServer, match="not sent"):
            await client.infer("m", {"input": "hi"}, timeout=30)
        with pytest.raises(NoServer, match="not sent"):
            async for _ in client.stream("m", {"input": "hi"}, timeout=30):
                pass
    await slow.close()

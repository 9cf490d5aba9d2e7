"""The listening socket every HTTP server of the fleet uses (worker API, monitor, gateway): asyncio must see it as TCP,
or it leaves Nagle on for each connection and a response written in two pieces waits ~40 ms for the client's
delayed ACK (measured: /health 44 ms with `socket.create_server`'s socket, 2.5 ms with this one)."""

from __future__ import annotations

import asyncio
import socket

from workers.httpkit import listen
from workers.ops import broker


async def test_accepted_connections_have_nagle_off() -> None:
    port = broker.free_port()
    sock = listen("127.0.0.1", port)
    nodelay: list[int] = []

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nodelay.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(accepted, sock=sock)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(100):
            if nodelay:
                break
            await asyncio.sleep(0.01)
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert nodelay == [1]


def test_a_taken_port_is_an_oserror_at_once() -> None:
    port = broker.free_port()
    first = listen("127.0.0.1", port)
    try:
        try:
            listen("127.0.0.1", port)
        except OSError:
            return
        raise AssertionError("a second listen on a taken port succeeded")
    finally:
        first.close()

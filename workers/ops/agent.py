"""The host agent: `make up`'s fleet manager, answering on NATS, so the gateway can load and unload models
(`POST /v1/models/{id}/load` / `unload`).

One agent per machine (`python -m workers.ops.agent`, started by `make up`). It answers

- `fleet.agents`: who it is (`host`), which workers it can start (the env files of envs/) and which of them run;
- `fleet.agent.<host>.load` `{"model": name}`: start the worker from `envs/worker.<name>.env` exactly as
  `make up` does (in the background, PID recorded under data/run/, log in data/run/<name>.log), wait for its ready
  heartbeat, and answer `online` with its pid, or `failed` with the last line of its log; `running` when one of ours
  already runs;
- `fleet.agent.<host>.unload` `{"model": name}`: stop the workers of that name it recorded (SIGTERM: they drain,
  handing back what they cannot finish), and answer `stopped` with their pids, or `not_running`.

Errors are `{"error": {"code", "type", "message"}}` like every other reply of the fleet. The agent only ever
signals PIDs it recorded (data/run/), as `make stop` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
from typing import Any

from nats.aio.client import Client as NATS
from pydantic import Field, ValidationError
from pydantic_settings import SettingsConfigDict

from .. import protocol as p
from ..config import available_workers
from ..connection import NatsUnavailable, connect
from ..logsetup import setup_logging
from ..settings import ConfigError, NatsSettings, config_error
from . import fleet
from .pids import pidfile, stop_pid

log = logging.getLogger(__name__)

AGENTS = "fleet.agents"  # every agent answers with its card
STOP_GRACE_S = 40.0  # as `make stop`: a draining worker finishes or hands back its requests within this


def agent_subject(host: str, verb: str) -> str:
    return f"fleet.agent.{p.token(host)}.{verb}"


class AgentSettings(NatsSettings):
    model_config = SettingsConfigDict(extra="ignore", validate_default=True)

    agent_host: str = Field(default_factory=socket.gethostname, min_length=1)  # the name the gateway asks for
    agent_load_timeout_s: float = Field(default=300.0, gt=0)  # for a worker's ready heartbeat (downloads included)


def load_settings(**overrides: Any) -> AgentSettings:
    try:
        return AgentSettings(**overrides)
    except ValidationError as e:
        raise config_error(e) from None


def _stop(name: str, pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # gone meanwhile
        stop_pid(pid, STOP_GRACE_S)
    pidfile(name, pid).unlink(missing_ok=True)


def error(status: int, type_: str, message: str) -> dict[str, Any]:
    return {"error": {"code": status, "type": type_, "message": message}}


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.host = settings.agent_host
        self.nc: NATS | None = None  # serve()'s connection: the agent's own identity asks the health of what it starts
        self._busy: dict[str, asyncio.Lock] = {}  # one load or unload of a model at a time
        self._tasks: set[asyncio.Task[None]] = set()

    def card(self) -> dict[str, Any]:
        names = available_workers()
        return {"host": self.host, "models": names,
                "running": {n: pids for n in names if (pids := fleet.running(n))}}

    async def load(self, name: str) -> dict[str, Any]:
        if (refused := self._unknown(name)) is not None:
            return refused
        async with self._busy.setdefault(name, asyncio.Lock()):
            if pids := fleet.running(name):
                return {"host": self.host, "model": name, "status": "running", "pids": pids}
            try:
                spec = fleet.spec(name)
            except ConfigError as e:
                return error(400, "invalid_worker", f"envs/worker.{name}.env: {e}")
            proc = fleet.start_background(name, spec.argv, env={"NATS_URL": self.settings.nats_url})
            if await fleet.wait_online(spec.settings, proc, self.settings.agent_load_timeout_s, self.nc):
                log.info("agent: %s online (pid %d)", name, proc.pid)
                return {"host": self.host, "model": name, "status": "online", "pids": [proc.pid]}
            why = fleet.not_online(name, proc, self.settings.agent_load_timeout_s)
            log.warning("agent: %s did not come online: %s", name, why)
            return {**error(502, "load_failed", f"{name} on {self.host}: {why}"), "host": self.host}

    async def unload(self, name: str) -> dict[str, Any]:
        if (refused := self._unknown(name)) is not None:
            return refused
        async with self._busy.setdefault(name, asyncio.Lock()):
            pids = fleet.running(name)
            if not pids:
                return {"host": self.host, "model": name, "status": "not_running", "pids": []}
            await asyncio.gather(*(asyncio.to_thread(_stop, name, pid) for pid in pids))
            log.info("agent: %s stopped (pids %s)", name, pids)
            return {"host": self.host, "model": name, "status": "stopped", "pids": pids}

    def _unknown(self, name: str) -> dict[str, Any] | None:
        if name in (names := available_workers()):
            return None
        return error(404, "unknown_worker", f"{self.host} has no envs/worker.{name}.env; it can start "
                     f"{', '.join(names) or 'nothing'}")

    # --- NATS -------------------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        s = self.settings
        nc = self.nc = await connect(s.nats_url, name=f"agent-{self.host}", timeout=s.nats_connect_timeout,
                                     auth=s.nats_auth())
        try:
            await nc.subscribe(AGENTS, cb=self._on_card)
            for verb, act in (("load", self.load), ("unload", self.unload)):
                await nc.subscribe(agent_subject(self.host, verb), cb=self._handler(act))
            await nc.flush()
            print(f"agent {self.host}: answering {AGENTS} and {agent_subject(self.host, '{load,unload}')}",
                  flush=True)
            await stop.wait()
            for task in list(self._tasks):
                task.cancel()
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()

    async def _on_card(self, msg: Any) -> None:
        if msg.reply:
            await msg.respond(json.dumps(self.card()).encode())

    def _handler(self, act: Any) -> Any:
        async def handle(msg: Any) -> None:
            # each in its own task: a load waits for a model to come up, and must not hold the others back
            task = asyncio.create_task(self._answer(msg, act))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return handle

    async def _answer(self, msg: Any, act: Any) -> None:
        try:
            body = json.loads(msg.data or b"{}")
            name = body.get("model") if isinstance(body, dict) else None
            if not isinstance(name, str) or not name:
                reply = error(400, "invalid_request", 'send {"model": "<worker name from envs/>"}')
            else:
                reply = await act(name)
        except ValueError:
            reply = error(400, "invalid_request", 'the body is not JSON; send {"model": "<name>"}')
        except Exception as e:  # a bug of ours: said, not raised into nats-py's callback
            log.exception("agent: %s failed", msg.subject)
            reply = error(500, "internal_error", f"the agent on {self.host} failed ({type(e).__name__}); see its log")
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(json.dumps(reply).encode())


def main() -> int:
    setup_logging()
    try:
        settings = load_settings()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Agent(settings).serve(stop)

    try:
        asyncio.run(run())
    except NatsUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`POST /v1/models/{id}/load` and `/unload`: the host agents (workers/ops/agent.py) start or drain workers.

The gateway asks every agent on `fleet.agents` who it is and what it can start, picks one (the `host` of the body,
else an agent already running the model, else the one running the fewest workers) and asks it on
`fleet.agent.<host>.load`; unload asks every agent that runs the model (or the body's `host`). The agent answers
once the worker sent its ready heartbeat (load) or has drained and exited (unload). With GATEWAY_KEYS_FILE only a key
with `admin = true` may do either (403 otherwise).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from workers import discovery
from workers import protocol as p
from workers.httpkit import json_object, read_body
from workers.ops.agent import AGENTS, agent_subject

from .clients import Clients
from .config import GatewaySettings
from .fleet import Fleet


async def change(request: Request, verb: str, *, clients: Clients, settings: GatewaySettings, fleet: Fleet
                 ) -> Response:
    """Load or unload (`verb`) the model the path names, through the host agents."""
    if not clients.is_admin(request.state.client):
        raise p.BadRequest("forbidden", "loading and unloading models needs a key with admin = true in "
                           "GATEWAY_KEYS_FILE", status=403)
    model = request.path_params["model"]
    if not discovery.MODEL_NAME.match(model) or len(model) > 200:
        raise p.BadRequest("invalid_model", f"{model[:80]!r} is not a model name (letters, digits, '.', '_', '-')")
    raw = await read_body(request, settings.gateway_max_request_bytes)
    host = json_object(raw).get("host") if raw.strip() else None
    if host is not None and (not isinstance(host, str) or not host):
        raise p.BadRequest("invalid_request", "host is an agent's host name, as the agents announce it")
    nc = fleet.nc()
    request.state.model = model
    cards = [c for c in map(_card, await discovery.gather(nc, AGENTS, settings.gateway_agent_wait_s)) if c]
    if not cards:
        raise p.BadRequest("no_agent", f"no host agent answered on {AGENTS}; `make up` starts one on its machine "
                           "(or run python -m workers.ops.agent there)", status=503)
    if host is not None:
        if not (cards := [c for c in cards if c["host"] == host]):
            raise p.BadRequest("unknown_host", f"no agent on host {host!r} answered", status=404)
    able = [c for c in cards if model in c["models"]]
    if not able:
        hosts = ", ".join(sorted(c["host"] for c in cards))
        raise p.BadRequest("unknown_worker", f"no agent can start {model}: none of {hosts} has "
                           f"envs/worker.{model}.env", status=404)
    if verb == "load":
        chosen = [min(able, key=lambda c: (model not in c["running"], len(c["running"])))]
    else:
        chosen = [c for c in able if model in c["running"]] or able[:1]
    timeout = settings.gateway_load_timeout_s
    replies = await asyncio.gather(*(_ask(nc, c["host"], verb, model, timeout) for c in chosen))
    if (failed := next((r for r in replies if "error" in r), None)) is not None:
        err = failed["error"]
        raise p.BadRequest(str(err.get("type", "agent_error")), str(err.get("message", "")),
                           status=int(err.get("code", 502)))
    body: dict[str, Any] = {"id": model, "object": f"model.{verb}", "status": replies[0]["status"],
                            "hosts": [{"host": r["host"], "status": r["status"], "pids": r.get("pids", [])}
                                      for r in replies]}
    return JSONResponse(body)


async def _ask(nc: Any, host: str, verb: str, model: str, timeout: float) -> dict[str, Any]:
    try:
        msg = await nc.request(agent_subject(host, verb), json.dumps({"model": model}).encode(), timeout=timeout)
    except TimeoutError:
        return {"error": {"code": 504, "type": "agent_timeout",
                          "message": f"the agent on {host} did not answer within {timeout:g} s "
                                     "(GATEWAY_LOAD_TIMEOUT_S); its worker may still be loading"}}
    reply = json.loads(msg.data)
    return reply if isinstance(reply, dict) else {"error": {"code": 502, "type": "agent_error",
                                                            "message": f"the agent on {host} answered {reply!r}"}}


def _card(data: bytes) -> dict[str, Any] | None:
    """An agent's card, or None for one that does not parse."""
    try:
        card = json.loads(data)
    except ValueError:
        return None
    if not isinstance(card, dict) or not isinstance(card.get("host"), str):
        return None
    card.setdefault("models", [])
    card.setdefault("running", {})
    return card

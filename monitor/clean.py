"""Wire strings made safe to show, once, where they come in.

Anyone on the bus can publish a heartbeat, so every string in one (names, model card values, capabilities,
alerts) is cleaned before the registry stores it: terminal escape sequences go whole (`ESC]0;title BEL`,
`ESC[2J`), line breaks and tabs become a space, the other C0/C1 controls, DEL, bidi overrides and lone surrogates
are dropped, and lengths are capped. REST, SSE, the TUI and the dashboard then all show the same clean value.
"""

from __future__ import annotations

import re
from typing import Any

from workers import protocol as p

NAME_MAX = 256  # model names, worker ids, endpoints, capabilities, alert kinds
TEXT_MAX = 1024  # model card values, alert messages
ITEMS_MAX = 64  # entries kept per list or object
ALERTS_MAX = 5  # the newest alerts kept per instance (workers send at most 5)
NAMES = ("model_name", "worker_id", "endpoint", "nats_topic", "version", "instance")

# Whole escape sequences first, so their parameters (`0;pwned`, `2J`) go with the ESC that starts them.
_SEQUENCE = re.compile(
    r"(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC, DCS, SOS, PM, APC
    r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"  # CSI
    r"|\x1b[ -/]*[0-~]?"  # the short ones (charset, keypad, reset)
)
_SPACE = re.compile(r"[\t\n\v\f\r\x85\u2028\u2029]")
_DROP = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def text(s: str, limit: int = TEXT_MAX) -> str:
    """`s` without control characters or escape sequences, at most `limit` characters."""
    if not s.isprintable():  # the common case, a clean name, costs one scan
        s = _DROP.sub("", _SPACE.sub(" ", _SEQUENCE.sub("", s)))
    return s if len(s) <= limit else s[: limit - 1] + "…"


def tree(obj: Any, limit: int = TEXT_MAX) -> Any:
    """Every string in decoded JSON cleaned (keys too, as names), lists and objects cut to ITEMS_MAX entries."""
    if isinstance(obj, str):
        return text(obj, limit)
    if isinstance(obj, list):
        return [tree(v, limit) for v in obj[:ITEMS_MAX]]
    if isinstance(obj, dict):
        return {text(str(k), NAME_MAX): tree(v, limit) for k, v in list(obj.items())[:ITEMS_MAX]}
    return obj


def body(obj: dict[str, Any]) -> dict[str, Any]:
    """A heartbeat, health reply or backpressure report as decoded JSON, cleaned; names capped at NAME_MAX."""
    if isinstance(obj.get("alerts"), list):
        obj["alerts"] = obj["alerts"][-ALERTS_MAX:]  # newest last
    out: dict[str, Any] = tree(obj)
    for key in NAMES:
        if isinstance(out.get(key), str):
            out[key] = text(out[key], NAME_MAX)
    if isinstance(out.get("capabilities"), list):
        out["capabilities"] = [text(c, NAME_MAX) if isinstance(c, str) else c for c in out["capabilities"]]
    for alert in out.get("alerts") or ():
        if isinstance(alert, dict) and isinstance(alert.get("kind"), str):
            alert["kind"] = text(alert["kind"], NAME_MAX)
    return out


def wire_object(data: bytes) -> dict[str, Any]:
    """A body off the bus parsed as a JSON object (not yet cleaned); ValueError if it is not one."""
    try:
        obj = p.loads(data)
    except p.BadRequest as e:
        raise ValueError(e.message) from None
    if not isinstance(obj, dict):
        raise ValueError("body is not a JSON object")
    return obj

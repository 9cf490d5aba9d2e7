"""The attack report's payloads as a table: what a hostile or broken caller sends, and the coded error the fleet
must answer with (status, error type). Reusable: each row is bytes on the wire, so the same table drives NATS
requests here and can be replayed against any front door that forwards bodies unchanged."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Hostile:
    name: str
    body: bytes
    status: int
    type: str
    headers: dict[str, str] = field(default_factory=dict)


def _j(obj: object) -> bytes:
    return json.dumps(obj).encode()


DEEP_GRAMMAR = "root ::= " + "(" * 20_000 + '"a"' + ")" * 20_000  # SIGSEGV in llama.cpp's parser (40 KB)

INFERENCE: list[Hostile] = [
    Hostile("json nested 10^5 deep", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    Hostile("object nested 10^4 deep", b'{"a":' * 10_000 + b"1" + b"}" * 10_000, 400, "invalid_json"),
    Hostile("lone surrogate", b'{"input": "hi \\ud800 there"}', 400, "invalid_input"),
    Hostile("not UTF-8", b'{"input": "caf\xe9"}', 400, "invalid_input"),
    Hostile("messages as a string", _j({"messages": "hello"}), 400, "invalid_request"),
    Hostile("messages as numbers", _j({"messages": [1, 2]}), 400, "invalid_request"),
    Hostile("messages as an object", _j({"messages": {"role": "user", "content": "hi"}}), 400, "invalid_request"),
    Hostile("max_tokens 10**12", _j({"input": "hi", "params": {"max_tokens": 10**12}}), 400, "context_overflow"),
    Hostile("max_tokens 10**30", _j({"input": "hi", "params": {"max_tokens": 10**30}}), 400, "context_overflow"),
    Hostile("grammar 20,000 deep", _j({"input": "hi", "params": {"grammar": DEEP_GRAMMAR}}), 400, "invalid_grammar"),
    Hostile("grammar 200 KB", _j({"input": "hi", "params": {"grammar": 'root ::= "' + "a" * 200_000 + '"'}}),
            400, "invalid_grammar"),
    Hostile("grammar of 200 optional items (minutes per token)",
            _j({"input": "hi", "params": {"grammar": "root ::= " + '"a"? ' * 200 + '"b"'}}), 400, "invalid_grammar"),
    Hostile("grammar of 2,000 rules", _j({"input": "hi", "params": {"grammar": "root ::= r0\n" + "".join(
        f'r{i} ::= r{i + 1} | "a"\n' for i in range(2000)) + 'r2000 ::= "b"'}}), 400, "invalid_grammar"),
    Hostile("600 KB req_id", _j({"input": "hi", "req_id": "r" * 600_000}), 400, "invalid_request"),
    Hostile("req_id with a subject wildcard", _j({"input": "hi", "req_id": "a.>"}), 400, "invalid_request"),
    Hostile("100 stop strings", _j({"input": "hi", "params": {"stop": ["x"] * 100}}), 400, "invalid_request"),
    Hostile("reply_to another model's queue", _j({"input": "hi", "reply_to": "queue.inference.other"}), 400,
            "invalid_reply_to"),
    Hostile("reply_to a request subject", _j({"input": "hi", "reply_to": "inference.request.other"}), 400,
            "invalid_reply_to"),
    Hostile("reply_to the JetStream API", _j({"input": "hi", "reply_to": "$JS.API.STREAM.DELETE.FLEET_REQUESTS"}),
            400, "invalid_reply_to"),
    Hostile("reply_to an inbox wildcard", _j({"input": "hi", "reply_to": "_INBOX.>"}), 400, "invalid_reply_to"),
    Hostile("7 MB header", _j({"input": "hi"}), 413, "headers_too_large", {"X-Junk": "j" * 7_000_000}),
    Hostile("bad trace id", _j({"input": "hi"}), 400, "invalid_header", {"Fleet-Trace-Id": "no spaces please"}),
    Hostile("bad traceparent", _j({"input": "hi"}), 400, "invalid_header", {"traceparent": "00-xyz"}),
    Hostile("bad Fleet-Timeout-Ms", _j({"input": "hi"}), 400, "invalid_header", {"Fleet-Timeout-Ms": "soon"}),
]

EMBEDDING: list[Hostile] = [
    Hostile("5,000 inputs", _j({"input": ["word"] * 5_000}), 400, "too_many_inputs"),
    Hostile("inputs as numbers", _j({"input": [1, 2]}), 400, "invalid_request"),
    Hostile("lone surrogate", b'{"input": ["\\udfff"]}', 400, "invalid_input"),
]

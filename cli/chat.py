"""nats-chat: talk to a model on the fleet, one shot or interactively.

    nats-chat -input "What is NATS?"          nats-chat -m gemma3-270m -i
    nats-chat --list                          nats-chat -input "Hi" --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from workers import protocol as p

from .client import FleetClient, FleetError, add_connection_flags, client_for, model_from_subject, run_cli

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)
HELP = "/help this text · /model NAME switch model · /reset forget the conversation · /quit leave"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nats-chat", description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("-subject", "--subject", help="request subject (default inference.request.<model>)")
    ap.add_argument("-m", "--model", default=os.environ.get("NATS_CHAT_MODEL", "gemma3-270m"))
    ap.add_argument("-input", "--input", help="the prompt (one-shot mode)")
    ap.add_argument("-i", "--interactive", action="store_true", help="a conversation")
    ap.add_argument("-max-tokens", "--max-tokens", type=int, dest="max_tokens")
    ap.add_argument("-temperature", "--temperature", type=float)
    ap.add_argument("-timeout", "--timeout", type=float, default=120.0, help="seconds to wait for each message")
    ap.add_argument("-grammar", "--grammar", help="a stored grammar name or inline GBNF")
    ap.add_argument("-v", "--verbose", action="store_true", help="footer with tokens, queue ms, duration, tok/s")
    ap.add_argument("--raw", action="store_true", help="send the input without the prompt template")
    ap.add_argument("--json", action="store_true", help="print the full response as JSON")
    ap.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    ap.add_argument("--system", help="a system prompt")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--list", action="store_true", help="live models on the fleet")
    add_connection_flags(ap)
    return ap


def model_of(args: argparse.Namespace) -> str:
    return model_from_subject(args.subject, "inference", args.model)


def params_of(args: argparse.Namespace) -> dict[str, Any]:
    keys = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed,
            "grammar": args.grammar}
    return {k: v for k, v in keys.items() if v is not None}


async def answer(fleet: FleetClient, model: str, body: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Send one request; stream the text to the terminal unless --json/--no-stream."""
    t0 = time.perf_counter()
    if args.json or args.no_stream:
        reply = await fleet.infer(model, body, timeout=args.timeout)
        if args.json:
            out.print_json(json.dumps(reply))
        else:
            out.print(reply["text"], markup=False)
    else:
        reply = {}
        # aclosing: the stream's subscription goes when we stop reading, not later at garbage collection after
        # the connection has closed (which printed "Task exception was never retrieved" after every answer)
        async with contextlib.aclosing(fleet.stream(model, body, timeout=args.timeout)) as stream:
            async for msg in stream:
                if msg.get("done") or "delta" not in msg:
                    reply = msg
                    break
                out.print(msg["delta"], end="", markup=False)
        out.print()
    if args.verbose and not args.json:
        secs = time.perf_counter() - t0
        rate = reply.get("tokens_out", 0) / (reply.get("duration_ms", 0) / 1000) if reply.get("duration_ms") else 0
        err.print(f"[dim]{reply.get('tokens_in', 0)} in / {reply.get('tokens_out', 0)} out · queue "
                  f"{reply.get('queue_ms', 0):.0f} ms · {secs * 1000:.0f} ms · {rate:.1f} tok/s · "
                  f"{reply.get('finish_reason')} · {reply.get('worker_id')}[/]")
    return reply


async def list_models(fleet: FleetClient) -> int:
    found = await fleet.discover()
    if not found:
        err.print("no workers found on the fleet; start some with `make up`")
        return 3
    table = Table(title="live models")
    for col in ("model", "kind", "status", "queue", "worker", "capabilities"):
        table.add_column(col)
    for h in sorted(found, key=lambda h: (h["model_name"], h["worker_id"])):
        q = h["queue_metrics"]
        table.add_row(h["model_name"], h.get("kind", ""), h["status"],
                      f"{q['pending_messages']}/{q['queue_capacity']} ({h['backpressure_status']['level']})",
                      h["worker_id"], ", ".join(h["capabilities"]))
    out.print(table)
    return 0


async def interactive(fleet: FleetClient, model: str, args: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    err.print(f"[bold]{model}[/] · {HELP}")
    loop = asyncio.get_running_loop()
    while True:
        try:
            line = await loop.run_in_executor(None, _read, "you> ")
        except EOFError:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/help":
            err.print(HELP)
            continue
        if text == "/reset":
            history = history[:1] if args.system else []
            err.print("conversation cleared")
            continue
        if text.startswith("/model"):
            model = text.split(maxsplit=1)[1] if " " in text else model
            err.print(f"now talking to [bold]{model}[/]")
            continue
        turn = [*history, {"role": "user", "content": text}]
        req_id = p.new_req_id()
        body = {"req_id": req_id, "params": params_of(args), "raw": args.raw}
        body |= {"input": text} if args.raw else {"messages": turn}
        task = asyncio.create_task(answer(fleet, model, body, args))
        loop.add_signal_handler(signal.SIGINT, task.cancel)  # Ctrl+C stops this answer, not the session
        try:
            reply = await task
        except asyncio.CancelledError:
            await fleet.cancel(model, req_id)
            err.print("\n[yellow]cancelled[/]")
            continue
        except FleetError as e:
            err.print(f"[red]{e}[/]")
            continue
        finally:
            loop.remove_signal_handler(signal.SIGINT)
        history = [*turn, {"role": "assistant", "content": reply.get("text", "")}]


def _read(prompt: str) -> str:
    return input(prompt) if sys.stdin.isatty() else _read_pipe(prompt)


def _read_pipe(prompt: str) -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


async def run(args: argparse.Namespace) -> int:
    async with client_for(args) as fleet:
        if args.list:
            return await list_models(fleet)
        model = model_of(args)
        if args.interactive:
            return await interactive(fleet, model, args)
        text = args.input if args.input is not None else (sys.stdin.read() if not sys.stdin.isatty() else None)
        if not text:
            raise FleetError("nothing to send: give -input TEXT, pipe text in, or use -i")
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        body: dict[str, Any] = {"params": params_of(args), "raw": args.raw}
        body |= {"messages": [*messages, {"role": "user", "content": text}]} if messages else {"input": text}
        await answer(fleet, model, body, args)
        return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("nats-chat", run(parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

"""nats-chat: talk to a model on the fleet, as `ollama run` does.

    nats-chat                                  a conversation (type /? for the commands)
    nats-chat "What is NATS?"                  one answer, streamed
    nats-chat -m gemma3-270m --raw -input "The capital of France is" -timeout 30s
    nats-chat --list                           live models on the fleet
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
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table

from workers import protocol as p

from .client import (
    FleetClient,
    FleetError,
    Parser,
    add_connection_flags,
    client_for,
    duration,
    model_from_subject,
    run_cli,
)

DEFAULT_MODEL = "smollm2-135m"  # an instruction-tuned chat model; NATS_CHAT_MODEL or -m picks another
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
# what /set takes, and how each value is read
SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "max_tokens": int, "seed": int,
            "repeat_penalty": float}
SHOWN = ("architecture", "parameter_count", "context_size", "embedding_size", "quantization", "model_family",
         "modalities")  # of the health reply's model_info, what /show prints
HELP = """Commands:
  /set temperature 0.3   set a sampling parameter (temperature, top_p, top_k, max_tokens, seed, repeat_penalty)
  /set system <text>     set the system message
  /set verbose | quiet   show tokens/s and time to first token after each answer, or not
  /show                  the model's details, from its workers' health replies
  /clear                 forget the conversation
  /save FILE, /load FILE the conversation as JSON
  /model NAME            talk to another model
  /bye, /exit            leave (as Ctrl+D; Ctrl+C stops an answer, or leaves at an empty prompt)
  /?, /help              this text
Use \"\"\" to begin and end a message of several lines."""


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="nats-chat", description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("prompt", nargs="*", help="the message (one answer); none: a conversation")
    ap.add_argument("-subject", "--subject", help="request subject (default inference.request.<model>)")
    ap.add_argument("-m", "--model", default=os.environ.get("NATS_CHAT_MODEL", DEFAULT_MODEL),
                    help=f"the model (default {DEFAULT_MODEL}, or NATS_CHAT_MODEL)")
    ap.add_argument("-input", "--input", help="the message (one answer), as an option")
    ap.add_argument("-i", "--interactive", action="store_true", help="a conversation, even with stdin not a terminal")
    ap.add_argument("-max-tokens", "--max-tokens", type=int, dest="max_tokens")
    ap.add_argument("-temperature", "--temperature", type=float)
    ap.add_argument("-top-p", "--top-p", type=float, dest="top_p")
    ap.add_argument("-top-k", "--top-k", type=int, dest="top_k")
    ap.add_argument("-repeat-penalty", "--repeat-penalty", type=float, dest="repeat_penalty")
    ap.add_argument("-seed", "--seed", type=int)
    ap.add_argument("-timeout", "--timeout", type=duration, default=120.0, metavar="DURATION",
                    help="how long to wait for each answer: seconds or a Go duration (500ms, 3s, 2m); the worker "
                    "drops or stops the request after it (default 120)")
    ap.add_argument("-grammar", "--grammar", help="a stored grammar name or inline GBNF")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="tokens, time to first token and tok/s after each answer")
    ap.add_argument("--raw", action="store_true", help="send the input without the prompt template")
    ap.add_argument("--json", action="store_true", help="print the full response as JSON")
    ap.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    ap.add_argument("--system", help="a system message")
    ap.add_argument("--list", action="store_true", help="live models on the fleet")
    add_connection_flags(ap)
    return ap


def params_of(args: argparse.Namespace) -> dict[str, Any]:
    keys = [*SETTABLE, "grammar"]
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


async def answer(fleet: FleetClient, model: str, body: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Send one request; stream the text to the terminal unless --json/--no-stream."""
    t0 = time.perf_counter()
    ttft: float | None = None
    if args.json or args.no_stream:
        reply = await fleet.infer(model, body, timeout=args.timeout)
        if args.json:
            out.print_json(json.dumps(reply))
        else:
            out.print(reply["text"], markup=False)
    else:
        reply = {}
        # aclosing: the stream's subscription goes when we stop reading (an answer's end, Ctrl+C), not at garbage
        # collection after the connection has closed ("Task exception was never retrieved")
        async with contextlib.aclosing(fleet.stream(model, body, timeout=args.timeout)) as stream:
            async for msg in stream:
                if msg.get("done") or "delta" not in msg:
                    reply = msg
                    break
                ttft = time.perf_counter() - t0 if ttft is None else ttft
                out.print(msg["delta"], end="", markup=False)
        out.print()
    if args.verbose and not args.json:
        err.print(footer(reply, time.perf_counter() - t0, ttft), style="dim", markup=False)
    return reply


def footer(reply: dict[str, Any], secs: float, ttft: float | None) -> str:
    """`--verbose`: tokens, time to first token (as this client saw it), queue wait, total, generation rate."""
    dur = reply.get("duration_ms") or 0
    rate = reply.get("tokens_out", 0) / (dur / 1000) if dur else 0.0
    parts = [f"{reply.get('tokens_in', 0)} in / {reply.get('tokens_out', 0)} out"]
    parts += [f"TTFT {ttft * 1000:.0f} ms"] if ttft is not None else []
    parts += [f"queue {reply.get('queue_ms', 0):.0f} ms", f"{secs * 1000:.0f} ms", f"{rate:.1f} tok/s",
              str(reply.get("finish_reason")), str(reply.get("worker_id"))]
    return " · ".join(parts)


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


def _interrupt_on_sigint(task: asyncio.Future[Any]) -> None:
    """Ctrl+C (SIGINT) cancels `task` instead of raising KeyboardInterrupt wherever the loop happens to be."""
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, task.cancel)


class Lines(Protocol):
    async def read(self, prompt: str) -> str:
        """The next line without its newline; EOFError at the end, KeyboardInterrupt on Ctrl+C."""


def history_file() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "nats-chat" / "history"


class TerminalLines:
    """A terminal: prompt_toolkit's line editing, arrow-key history kept in a file, Ctrl+C/Ctrl+D as keys."""

    def __init__(self) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, History, InMemoryHistory

        history: History
        try:
            path = history_file()
            path.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(path))
        except OSError:
            history = InMemoryHistory()
        self.session: PromptSession[str] = PromptSession(history=history)

    async def read(self, prompt: str) -> str:
        placeholder = "Send a message (/? for help)" if prompt == ">>> " else ""
        return await self.session.prompt_async(prompt, placeholder=placeholder)


class PipeLines:
    """Stdin that is not a terminal: plain lines, no prompt; SIGINT while waiting is a KeyboardInterrupt."""

    def __init__(self) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.transport: asyncio.BaseTransport | None = None

    async def _open(self) -> asyncio.StreamReader:
        reader = asyncio.StreamReader()
        try:
            self.transport, _ = await asyncio.get_running_loop().connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        except ValueError:  # a regular file: reading it never blocks
            reader.feed_data(sys.stdin.buffer.read())
            reader.feed_eof()
        return reader

    def close(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(OSError, ValueError):  # a terminal's file is shared: leave it blocking again
                os.set_blocking(sys.stdin.fileno(), True)
            self.transport.close()

    async def read(self, prompt: str) -> str:
        loop = asyncio.get_running_loop()
        if self.reader is None:
            self.reader = await self._open()
        line = asyncio.ensure_future(self.reader.readline())
        _interrupt_on_sigint(line)
        try:
            data = await line
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None
        finally:
            loop.remove_signal_handler(signal.SIGINT)
        if not data:
            raise EOFError
        return data.decode(errors="replace").rstrip("\r\n")


class Session:
    """One conversation: the messages so far, the sampling settings, the model; reads, answers, runs /commands."""

    def __init__(self, fleet: FleetClient, model: str, args: argparse.Namespace, lines: Lines) -> None:
        self.fleet, self.model, self.args, self.lines = fleet, model, args, lines
        self.system: str | None = args.system
        self.params = params_of(args)
        self.messages: list[dict[str, str]] = []

    async def run(self) -> int:
        while True:
            try:
                text = await self.message()
            except (EOFError, KeyboardInterrupt):
                return 0
            if not text:
                continue
            if text.startswith("/") and not text.startswith("//"):
                if not await self.command(text):
                    return 0
                continue
            await self.ask(text)

    async def message(self) -> str:
        """One message: a line, or the lines between two `\"\"\"`."""
        line = await self.lines.read(">>> ")
        if not line.lstrip().startswith('"""'):
            return line.strip()
        rest = line.lstrip()[3:]
        if rest.rstrip().endswith('"""'):
            return rest.rstrip()[:-3].strip()
        parts = [rest] if rest.strip() else []
        while True:
            line = await self.lines.read("... ")
            if line.rstrip().endswith('"""'):
                parts.append(line.rstrip()[:-3])
                return "\n".join(parts).strip()
            parts.append(line)

    def body(self, text: str) -> dict[str, Any]:
        if self.args.raw:
            return {"input": text, "raw": True, "params": self.params}
        system = [{"role": "system", "content": self.system}] if self.system else []
        return {"messages": [*system, *self.messages, {"role": "user", "content": text}], "params": self.params}

    async def ask(self, text: str) -> None:
        """One turn; Ctrl+C while it runs cancels it at the worker and comes back to the prompt."""
        req_id = p.new_req_id()
        task = asyncio.ensure_future(answer(self.fleet, self.model, {"req_id": req_id, **self.body(text)}, self.args))
        _interrupt_on_sigint(task)
        try:
            reply = await task
        except asyncio.CancelledError:
            if not task.cancelled():  # we are being cancelled ourselves, not the answer
                raise
            out.print()
            with contextlib.suppress(FleetError):
                await self.fleet.cancel(self.model, req_id)
            err.print("cancelled", style="yellow", markup=False)
            return
        except FleetError as e:
            err.print(str(e), style="red", markup=False)
            return
        finally:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
        if not self.args.raw:
            self.messages += [{"role": "user", "content": text},
                              {"role": "assistant", "content": reply.get("text", "")}]

    async def command(self, text: str) -> bool:
        """Run a /command; False to leave."""
        name, _, rest = text.partition(" ")
        rest = rest.strip()
        if name in ("/bye", "/exit", "/quit"):
            return False
        if name in ("/?", "/help"):
            out.print(HELP, markup=False)
        elif name == "/set":
            self.set(rest)
        elif name == "/show":
            await self.show()
        elif name in ("/clear", "/reset"):
            self.messages = []
            out.print("Cleared the conversation.")
        elif name == "/save" and rest:
            self.save(rest)
        elif name == "/load" and rest:
            self.load(rest)
        elif name == "/model" and rest:
            self.model = rest
            out.print(f"Now talking to {rest}.", markup=False)
        else:
            err.print(f"unknown command or missing argument: {text!r}; type /? for help", markup=False)
        return True

    def set(self, rest: str) -> None:
        key, _, value = rest.partition(" ")
        value = value.strip()
        if key == "system" and value:
            self.system = value
            out.print("Set the system message.")
        elif key in ("verbose", "quiet") and not value:
            self.args.verbose = key == "verbose"
            out.print(f"Set {key} mode.")
        elif key in SETTABLE and value:
            try:
                self.params[key] = SETTABLE[key](value)
            except ValueError:
                err.print(f"/set {key}: {value!r} is not a {SETTABLE[key].__name__}", markup=False)
                return
            out.print(f"Set parameter {key!r} to {value!r}.", markup=False)
        else:
            err.print(f"/set takes system TEXT, verbose, quiet or one of {', '.join(SETTABLE)} with a value",
                      markup=False)

    async def show(self) -> None:
        try:
            found = await self.fleet.health(self.model)
        except FleetError as e:
            err.print(str(e), markup=False)
            return
        if not found:
            err.print(f"no worker is serving {self.model}; start one with `make start WORKER={self.model}`",
                      markup=False)
            return
        info = found[0].get("model_info") or {}
        rows = [("model", self.model)] + [(k.replace("_", " "), ", ".join(map(str, v)) if isinstance(v, list)
                                           else str(v)) for k, v in info.items()
                                          if k in SHOWN and v not in (None, "", [])]
        rows.append(("capabilities", ", ".join(found[0].get("capabilities", []))))
        for h in sorted(found, key=lambda h: h["worker_id"]):
            q = h.get("queue_metrics", {})
            rows.append(("worker", f"{h['worker_id']} {h.get('status')} · {q.get('pending_messages', 0)} queued"))
        rows += [("system", self.system)] if self.system else []
        rows += [(k, str(v)) for k, v in self.params.items()]
        width = max(len(k) for k, _ in rows)
        out.print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows), markup=False)

    def save(self, name: str) -> None:
        path = Path(name).expanduser()
        data = {"model": self.model, "system": self.system, "params": self.params, "messages": self.messages}
        try:
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            err.print(f"/save: cannot write {path}: {e.strerror}", markup=False)
            return
        out.print(f"Saved {len(self.messages)} message(s) to {path}.", markup=False)

    def load(self, name: str) -> None:
        path = Path(name).expanduser()
        try:
            data = json.loads(path.read_text())
            saved = data if isinstance(data, list) else data["messages"]
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in saved]
        except OSError as e:
            err.print(f"/load: cannot read {path}: {e.strerror}", markup=False)
            return
        except (ValueError, KeyError, TypeError):
            err.print(f"/load: {path} is not a conversation saved by /save", markup=False)
            return
        if isinstance(data, dict):
            self.system = data.get("system") or self.system
            self.params |= {k: v for k, v in (data.get("params") or {}).items() if k in SETTABLE or k == "grammar"}
        self.messages = [m for m in messages if m["role"] != "system"]
        out.print(f"Loaded {len(self.messages)} message(s) from {path}.", markup=False)


async def one_shot(fleet: FleetClient, model: str, text: str, args: argparse.Namespace) -> int:
    """One answer; Ctrl+C cancels it at the worker and exits 130."""
    body: dict[str, Any] = {"req_id": p.new_req_id(), "params": params_of(args), "raw": args.raw}
    if args.system and not args.raw:
        body["messages"] = [{"role": "system", "content": args.system}, {"role": "user", "content": text}]
    else:
        body["input"] = text
    task = asyncio.ensure_future(answer(fleet, model, body, args))
    _interrupt_on_sigint(task)
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
        out.print()
        with contextlib.suppress(FleetError):
            await fleet.cancel(model, body["req_id"])
        return 130
    finally:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
    return 0


async def run(args: argparse.Namespace) -> int:
    text = " ".join(args.prompt) if args.prompt else args.input
    tty = sys.stdin.isatty()
    if text is None and not tty and not args.interactive and not args.list:
        text = sys.stdin.read()
        if not text.strip():
            raise FleetError("nothing to send: give a message, pipe text in, or use -i for a conversation")
    async with client_for(args) as fleet:
        if args.list:
            return await list_models(fleet)
        model = model_from_subject(args.subject, "inference", args.model)
        if text is not None and not args.interactive:
            return await one_shot(fleet, model, text, args)
        if tty and sys.stdout.isatty():
            return await Session(fleet, model, args, TerminalLines()).run()
        lines = PipeLines()
        try:
            return await Session(fleet, model, args, lines).run()
        finally:
            lines.close()


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    return run_cli("nats-chat", run(ap.parse_intermixed_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

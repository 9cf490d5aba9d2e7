"""nats-embed: embeddings from a model on the fleet.

    nats-embed -input "first text" -input "second"       cat lines.txt | nats-embed -m minilm-l6-v2
    nats-embed -input "hello" --json                       nats-embed -input a -input b --output vecs.npy
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from rich.console import Console

from .client import FleetError, Parser, add_connection_flags, client_for, duration, model_from_subject, run_cli

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="nats-embed", description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("-input", "--input", action="append", help="a text (repeatable); default: one per stdin line")
    ap.add_argument("-subject", "--subject", help="request subject (default embedding.request.<model>)")
    ap.add_argument("-m", "--model", default=os.environ.get("NATS_EMBED_MODEL", "gemma3-270m-embed"))
    ap.add_argument("-timeout", "--timeout", type=duration, default=120.0, metavar="DURATION",
                    help="how long to wait: seconds or a Go duration (500ms, 3s, 2m); the worker drops the request "
                    "after it")
    ap.add_argument("--json", action="store_true", help="print the full response")
    ap.add_argument("--output", type=Path, help="write the vectors to FILE.npy or FILE.jsonl")
    add_connection_flags(ap)
    return ap


def model_of(args: argparse.Namespace) -> str:
    return model_from_subject(args.subject, "embedding", args.model)


def save(path: Path, texts: list[str], vectors: list[list[float]]) -> None:
    if path.suffix == ".npy":
        import numpy as np

        np.save(path, np.asarray(vectors, dtype=np.float32))
    elif path.suffix == ".jsonl":
        with path.open("w") as f:
            for text, vec in zip(texts, vectors, strict=True):
                f.write(json.dumps({"input": text, "embedding": vec}) + "\n")
    else:
        raise FleetError(f"--output must end in .npy or .jsonl, not {path.suffix or 'nothing'}")


async def run(args: argparse.Namespace) -> int:
    texts = args.input or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise FleetError("nothing to embed: give -input TEXT (repeatable) or pipe one text per line")
    async with client_for(args) as fleet:
        reply = await fleet.embed(model_of(args), texts, timeout=args.timeout)
    vectors = [d["embedding"] for d in sorted(reply["data"], key=lambda d: d["index"])]
    if args.output:
        save(args.output, texts, vectors)
        err.print(f"wrote {len(vectors)} vector(s) of {len(vectors[0])} to {args.output}")
    if args.json:
        out.print_json(json.dumps(reply))
    elif not args.output:
        for text, vec in zip(texts, vectors, strict=True):
            norm = math.sqrt(sum(x * x for x in vec))
            head = ", ".join(f"{x:.4f}" for x in vec[:4])
            out.print(f"dim={len(vec)} norm={norm:.4f} [{head}, …] {text[:60]!r}", markup=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("nats-embed", run(parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

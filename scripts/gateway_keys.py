"""Make an API key for the gateway (gateway/clients.py): prints the key once, stores only its SHA-256.

    python scripts/gateway_keys.py add alice                       # into $GATEWAY_KEYS_FILE
    python scripts/gateway_keys.py add bob --rpm 60 --tpm 20000 --file envs/gateway-keys.toml

The entry is appended to the keys file (made if missing); the gateway reads the file at start, so restart it. To
revoke a key, delete its [[keys]] table and restart. A lost key cannot be shown again: remove it and add a new one.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
from pathlib import Path

from gateway.clients import ANONYMOUS, digest_of, load_keys
from workers.settings import ConfigError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$")  # readable as a metrics label and in logs


def add(path: Path, name: str, rpm: int, tpm: int, admin: bool = False) -> str:
    """A new key for `name`, its digest appended to `path`; ConfigError when the file or the name is wrong."""
    if not NAME.match(name) or name == ANONYMOUS:
        raise ConfigError(f"the name {name!r} should be letters, digits, _ . @ - (and not {ANONYMOUS!r})")
    if rpm < 0 or tpm < 0:
        raise ConfigError("--rpm and --tpm are whole numbers ≥ 0 (0: unlimited)")
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    if existing.strip() and any(k.name == name for k in load_keys(path)):
        raise ConfigError(f"{path} already has a key named {name!r}; delete its [[keys]] table first to replace it")
    key = f"fk-{secrets.token_urlsafe(32)}"
    entry = f'[[keys]]\nname = "{name}"\nsha256 = "{digest_of(key)}"\nrpm = {rpm}\ntpm = {tpm}\n'
    if admin:
        entry += "admin = true\n"
    separator = "" if not existing or existing.endswith("\n\n") else ("\n" if existing.endswith("\n") else "\n\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(separator + entry)
    load_keys(path)  # the file as the gateway will read it
    return key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Add an API key to the gateway's keys file.")
    sub = parser.add_subparsers(dest="command", required=True)
    adding = sub.add_parser("add", help="make a key for a client: printed once, only its hash is kept")
    adding.add_argument("name", help="the client's name (metrics label)")
    adding.add_argument("--rpm", type=int, default=0, help="requests per minute (0: unlimited)")
    adding.add_argument("--tpm", type=int, default=0, help="tokens per minute (0: unlimited)")
    adding.add_argument("--admin", action="store_true", help="may load and unload models (/v1/models/{id}/load)")
    adding.add_argument("--file", default=os.environ.get("GATEWAY_KEYS_FILE", ""),
                        help="the keys file (default: $GATEWAY_KEYS_FILE)")
    args = parser.parse_args(argv)
    if not args.file:
        print("error: name the keys file with --file or GATEWAY_KEYS_FILE", file=sys.stderr)
        return 2
    try:
        key = add(Path(args.file), args.name, args.rpm, args.tpm, args.admin)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(key)
    print(f"added {args.name} to {args.file}; this key is not stored and will not be shown again; restart the "
          "gateway to use it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The identities of the least-privilege NATS example (deploy/nats/, README "Least privilege").

    python scripts/nats_credentials.py                     # the default fleet: 4 workers, alice, bob, a monitor,
                                                           # a gateway
    python scripts/nats_credentials.py --worker qwen3-4b   # add a model's worker (kind from envs/worker.qwen3-4b.env)
    python scripts/nats_credentials.py --client carol      # add a caller
    python scripts/nats_credentials.py --rotate client.bob # a new key for bob (his old seed stops working)

Each identity gets an nkey (the `nkeys` package): its seed in `<out>/creds/<identity>.nk` (mode 0600, git-ignored),
its public key with its permissions in `<out>/accounts.conf`, the include every server config of the example
uses. The identities are the seed files already there plus the ones named; with neither, the default fleet.
Existing seeds are kept, so a rerun never logs anyone out; delete a `.nk` file and rerun to remove an identity.

The fleet's subjects come from workers/protocol.py (the wire contract); the JetStream API and `$SRV` subjects are
the ones nats-py and nats.micro use. tests/test_least_privilege.py proves each role can do its job and no more.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nkeys
from dotenv import dotenv_values

from workers import protocol as p
from workers.answered import BUCKET
from workers.config import ROOT, env_file_for

DEFAULT_OUT = ROOT / "deploy" / "nats"
DEFAULT_WORKERS = ["smollm2-135m", "gemma3-270m", "gemma3-270m-embed", "minilm-l6-v2"]  # `make up`'s
DEFAULT_CLIENTS = ["alice", "bob"]
DEFAULT_MONITORS = ["monitor"]
DEFAULT_GATEWAYS = ["gateway"]
GATEWAY_BUCKETS = ("FLEET_CACHE", "FLEET_JOBS")  # gateway/cache.py, gateway/jobs.py
KINDS: tuple[p.Kind, ...] = ("inference", "embedding")
NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # one subject token: it becomes the identity's inbox prefix
MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # the names a worker accepts as MODEL_NAME
JS = "$JS.API"


class CredentialsError(Exception):
    """A name or option the operator must fix; the message is the whole story."""


@dataclass(frozen=True)
class Permissions:
    publish: list[str]
    subscribe: list[str]
    publish_deny: tuple[str, ...] = ()


@dataclass(frozen=True)
class Identity:
    role: str  # worker | client | monitor | gateway
    name: str  # the user's token: its inbox prefix is _INBOX.<name>
    model: str = ""  # workers only
    kind: p.Kind = "inference"  # workers only

    @property
    def file(self) -> str:
        return f"worker.{self.kind}.{self.model}.nk" if self.role == "worker" else f"{self.role}.{self.name}.nk"

    @property
    def inbox(self) -> str:
        return f"_INBOX.{self.name}"

    def permissions(self) -> Permissions:
        return ROLES[self.role](self)


def dead_letter_subject(kind: p.Kind, model: str, priority: int = p.DEFAULT_PRIORITY) -> str:
    """An advisory `queue.DeadLetters` listens on: one of the model's consumers gave up on a message."""
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{p.STREAM_NAME}.{p.consumer_name(kind, model, priority)}"


# Health requests go to `models.<model>.health` with the model name as written (a dotted name spans several
# tokens), so discovery may publish under `models.>` but never a heartbeat (always `models.<token>.heartbeat`).
HEARTBEATS = "models.*.heartbeat"


def worker(i: Identity) -> Permissions:
    """Serve one model: its ingress, its consumer, its heartbeat and reports, answers to any caller's inbox."""
    k, m, stream = i.kind, i.model, p.STREAM_NAME
    durables = [p.consumer_name(k, m, pr) for pr in p.PRIORITIES]  # one consumer per priority
    svc = p.service_name(m)
    return Permissions(
        publish=[
            # the ingress copies requests into the stream, one subject per priority (its PubAck comes to the inbox)
            *(p.queue_subject(k, m, pr) for pr in p.PRIORITIES),
            p.heartbeat_subject(m), p.monitoring_subject(k, m),
            p.request_event_subject(m),  # one event per finished request (the monitor's Requests view)
            p.cancel_subject(k, m),  # DELETE /v1/requests/{id} on its HTTP API reaches the model's other instances
            "_INBOX.>",  # answers, stream chunks, and replies to health, $SRV and cancel requests
            f"{JS}.STREAM.INFO.{stream}", f"{JS}.STREAM.CREATE.{stream}", f"{JS}.STREAM.UPDATE.{stream}",
            *(api for d in durables for api in (
                f"{JS}.CONSUMER.INFO.{stream}.{d}", f"{JS}.CONSUMER.DURABLE.CREATE.{stream}.{d}",
                f"{JS}.CONSUMER.CREATE.{stream}.{d}", f"{JS}.CONSUMER.CREATE.{stream}.{d}.>",
                f"{JS}.CONSUMER.MSG.NEXT.{stream}.{d}", f"$JS.ACK.{stream}.{d}.>")),
            f"{JS}.STREAM.MSG.GET.{stream}", f"{JS}.STREAM.MSG.DELETE.{stream}",  # dead letters, by sequence
            # one answer per queued request (workers/answered.py): claims on its own model's keys
            f"$KV.{BUCKET}.{p.token(m)}.>", *(f"{JS}.STREAM.{op}.KV_{BUCKET}" for op in ("INFO", "CREATE", "UPDATE")),
            f"{JS}.STREAM.MSG.GET.KV_{BUCKET}", f"{JS}.DIRECT.GET.KV_{BUCKET}.>",
        ],
        subscribe=[
            p.request_subject(k, m), p.health_subject(m), p.heartbeat_subject(m),  # peers' beats: worker_count
            p.cancel_subject(k, m), p.owner_cancel_subject(k, "*", m),
            *(dead_letter_subject(k, m, pr) for pr in p.PRIORITIES),
            # requests queued above priority 1 (consumer.Above hears them, then pulls them from their consumer)
            *(p.queue_subject(k, m, pr) for pr in p.PRIORITIES if pr != p.DEFAULT_PRIORITY),
            # the queue heals (workers/healing.py): the stream or one of the model's consumers deleted or changed
            f"$JS.EVENT.ADVISORY.STREAM.DELETED.{stream}", f"$JS.EVENT.ADVISORY.STREAM.UPDATED.{stream}",
            *(f"$JS.EVENT.ADVISORY.CONSUMER.DELETED.{stream}.{d}" for d in durables),
            "$SRV.PING", "$SRV.INFO", "$SRV.STATS", f"$SRV.*.{svc}", f"$SRV.*.{svc}.*",  # the nats.micro service
            f"{i.inbox}.>",
        ],
    )


def client(i: Identity) -> Permissions:
    """Ask and cancel its own requests, discover models; read nothing but its own inbox."""
    return Permissions(
        publish=[*(f"{k}.request.>" for k in KINDS), *(p.owner_cancel_subject(k, i.name, ">") for k in KINDS),
                 "$SRV.PING", "$SRV.PING.>", "$SRV.INFO", "$SRV.INFO.>", "models.>"],
        publish_deny=(HEARTBEATS,),
        subscribe=[f"{i.inbox}.>"],
    )


def monitor(i: Identity) -> Permissions:
    """Watch: heartbeats, reports, request events, discovery and read-only JetStream information; no
    consumption."""
    return Permissions(
        publish=["$SRV.>", "models.>", f"{JS}.INFO", f"{JS}.STREAM.NAMES", f"{JS}.STREAM.LIST",
                 f"{JS}.STREAM.INFO.*", f"{JS}.CONSUMER.NAMES.*", f"{JS}.CONSUMER.LIST.*", f"{JS}.CONSUMER.INFO.*.*"],
        publish_deny=(HEARTBEATS,),
        subscribe=[HEARTBEATS, "monitoring.>", p.REQUEST_EVENTS, f"{i.inbox}.>"],
    )


def gateway(i: Identity) -> Permissions:
    """The OpenAI gateway: ask and cancel its own requests of any model, discover the fleet as the monitor does
    (heartbeats, reports, $SRV, health), keep its KV buckets (response cache, jobs) and ask the host agents."""
    return Permissions(
        publish=[*(f"{k}.request.>" for k in KINDS), *(p.owner_cancel_subject(k, i.name, ">") for k in KINDS),
                 "$SRV.PING", "$SRV.PING.>", "$SRV.INFO", "$SRV.INFO.>", "models.>",
                 "fleet.agents", "fleet.agent.*.load", "fleet.agent.*.unload",
                 *(f"$KV.{b}.>" for b in GATEWAY_BUCKETS),
                 *(f"{JS}.STREAM.{op}.KV_{b}" for b in GATEWAY_BUCKETS
                   for op in ("INFO", "CREATE", "UPDATE", "MSG.GET")),
                 *(f"{JS}.DIRECT.GET.KV_{b}.>" for b in GATEWAY_BUCKETS)],
        publish_deny=(HEARTBEATS,),
        subscribe=[HEARTBEATS, "monitoring.>", f"{i.inbox}.>"],
    )


ROLES = {"worker": worker, "client": client, "monitor": monitor, "gateway": gateway}


def worker_identity(spec: str) -> Identity:
    """`MODEL` (its kind from envs/worker.MODEL.env) or `MODEL:KIND`."""
    model, _, kind = spec.partition(":")
    if not MODEL.match(model):
        raise CredentialsError(f"--worker {spec!r}: a model name is letters, digits, '.', '_' and '-'")
    if not kind:
        env = env_file_for(model)
        if not env.exists():
            raise CredentialsError(f"--worker {model}: no {env.relative_to(ROOT)} to read MODEL_KIND from; "
                                   f"write --worker {model}:inference or {model}:embedding")
        values = dotenv_values(env)
        if values.get("MODEL_NAME", model) != model:
            raise CredentialsError(f"--worker {model}: {env.relative_to(ROOT)} serves MODEL_NAME="
                                   f"{values['MODEL_NAME']}; name that model instead")
        kind = values.get("MODEL_KIND") or "inference"
    if kind not in KINDS:
        raise CredentialsError(f"--worker {spec}: kind {kind!r} is not one of {', '.join(KINDS)}")
    return Identity("worker", f"worker-{p.token(model)}", model, kind)


def named(role: str, name: str) -> Identity:
    if not NAME.match(name):
        raise CredentialsError(f"--{role} {name!r}: a name is one subject token (letters, digits, '_', '-'); "
                               "it becomes the inbox prefix _INBOX.<name>")
    if name.startswith("worker-"):
        raise CredentialsError(f"--{role} {name}: names starting with worker- are the workers' (their inbox "
                               "prefix is _INBOX.worker-<model>); choose another name")
    return Identity(role, name)


def from_file(path: Path) -> Identity:
    """The identity a seed file is for, from its name (`worker.<kind>.<model>.nk`, `client.<name>.nk`, …)."""
    role, _, rest = path.name.removesuffix(".nk").partition(".")
    if role == "worker":
        kind, _, model = rest.partition(".")
        return worker_identity(f"{model}:{kind}")
    if role in ROLES:
        return named(role, rest)
    raise CredentialsError(f"{path}: not a seed file of this script (worker.*, client.*, monitor.*, gateway.*); "
                           "move it away")


def check(identities: list[Identity]) -> None:
    """Inbox prefixes must not overlap, and no caller may be named like the first token of a dotted model (its
    own cancel subject `<kind>.cancel.<name>.<rest>` would then be that model's cancel-anyone subject)."""
    seen: dict[str, Identity] = {}
    for i in identities:
        if i.name in seen and seen[i.name] != i:
            raise CredentialsError(f"{i.file} and {seen[i.name].file} would share the inbox {i.inbox}; "
                                   "rename one")
        seen[i.name] = i
    first_tokens = {i.model.split(".")[0]: i.model for i in identities if "." in i.model}
    for i in identities:
        if i.role == "client" and i.name in first_tokens:
            raise CredentialsError(f"client {i.name!r} is named like the start of model {first_tokens[i.name]!r}; "
                                   "choose another name")


def render(identities: list[Identity], out: Path) -> str:
    """accounts.conf: the FLEET account with JetStream and one nkey user per identity."""
    lines = ["# Generated by scripts/nats_credentials.py: do not edit, rerun it (README: \"Least privilege\").",
             "# One account with JetStream; one nkey user per identity, allowed only the subjects of its role.",
             "# No secrets here: the seeds are in creds/ (git-ignored).",
             "accounts {", "  FLEET {", "    jetstream: enabled", "    users: ["]
    for i in identities:
        perms = i.permissions()
        what = f"{i.role} {i.model} ({i.kind})" if i.role == "worker" else f"{i.role} {i.name}"
        lines += ["      {", f"        # {what}", f"        #   NATS_NKEY_SEED_FILE={shown(out / 'creds' / i.file)}",
                  f"        #   NATS_INBOX_PREFIX={i.inbox}",
                  f"        nkey: {public_key(out / 'creds' / i.file)}", "        permissions: {",
                  "          publish: {", *_list("allow", perms.publish)]
        if perms.publish_deny:
            lines += _list("deny", list(perms.publish_deny))
        lines += ["          }", "          subscribe: {", *_list("allow", perms.subscribe), "          }",
                  "        }", "      }"]
    lines += ["    ]", "  }", "}", ""]
    return "\n".join(lines)


def _list(key: str, subjects: list[str]) -> list[str]:
    # quoted: `$JS…` would be read as a variable otherwise
    return [f"            {key}: [", *(f'              "{s}"' for s in subjects), "            ]"]


def shown(path: Path) -> str:
    """A path as an operator types it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def public_key(seed_file: Path) -> str:
    kp = nkeys.from_seed(bytearray(seed_file.read_bytes().strip()))
    try:
        return str(kp.public_key.decode())
    finally:
        kp.wipe()


def write_seed(path: Path) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(seed + b"\n")


def generate(out: Path, workers: list[str], clients: list[str], monitors: list[str],
             rotate: list[str], gateways: list[str] | None = None) -> list[Identity]:
    """Create the missing seeds (and the rotated ones), then rewrite accounts.conf for every identity."""
    creds = out / "creds"
    existing = [from_file(f) for f in sorted(creds.glob("*.nk"))]
    named_now = ([worker_identity(w) for w in workers] + [named("client", c) for c in clients]
                 + [named("monitor", m) for m in monitors] + [named("gateway", g) for g in gateways or []])
    if not existing and not named_now:
        named_now = ([worker_identity(w) for w in DEFAULT_WORKERS] + [named("client", c) for c in DEFAULT_CLIENTS]
                     + [named("monitor", m) for m in DEFAULT_MONITORS]
                     + [named("gateway", g) for g in DEFAULT_GATEWAYS])
    identities = list(dict.fromkeys(existing + named_now))
    check(identities)
    unknown = set(rotate) - {i.file.removesuffix(".nk") for i in identities}
    if unknown:
        raise CredentialsError(f"--rotate {', '.join(sorted(unknown))}: no such identity; the identities are "
                               + ", ".join(i.file.removesuffix(".nk") for i in identities))
    creds.mkdir(parents=True, exist_ok=True)
    creds.chmod(0o700)
    for i in identities:
        seed = creds / i.file
        if not seed.exists() or i.file.removesuffix(".nk") in rotate:
            write_seed(seed)
    (out / "accounts.conf").write_text(render(identities, out))
    return identities


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where accounts.conf and creds/ go (deploy/nats)")
    ap.add_argument("--worker", action="append", default=[], metavar="MODEL[:KIND]", help="a model's worker identity")
    ap.add_argument("--client", action="append", default=[], metavar="NAME", help="a caller (inbox _INBOX.NAME)")
    ap.add_argument("--monitor", action="append", default=[], metavar="NAME", help="a monitor identity")
    ap.add_argument("--gateway", action="append", default=[], metavar="NAME", help="an OpenAI gateway identity")
    ap.add_argument("--rotate", action="append", default=[], metavar="IDENTITY",
                    help="a new key for an identity, named as its seed file without .nk (e.g. client.bob)")
    args = ap.parse_args(argv)
    try:
        identities = generate(args.out, args.worker, args.client, args.monitor, args.rotate, args.gateway)
    except (CredentialsError, nkeys.NkeysError, OSError) as e:
        print(f"nats_credentials: {e}", file=sys.stderr)
        return 2
    print(f"wrote {shown(args.out / 'accounts.conf')}; each process connects with these settings:")
    for i in identities:
        what = f"{i.role} {i.model}" if i.role == "worker" else f"{i.role} {i.name}"
        print(f"  {what:28} NATS_NKEY_SEED_FILE={shown(args.out / 'creds' / i.file)} NATS_INBOX_PREFIX={i.inbox}")
    print("a running nats-server applies it on reload: nats-server --signal reload=<pid> (each node of a cluster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

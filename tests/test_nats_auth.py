"""Logging in to NATS: user/password, token, nkey and .creds (JWT) against real nats-servers configured by the test;
a refused login is one line, at once; a denied publish is an event and the connection stays up; credentials never
show (URLs are redacted). The TLS side is tests/test_nats_tls.py."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nkeys
import pytest
from rich.console import Console

from workers.config import ConfigError
from workers.connection import NatsRefused, connect
from workers.ops import broker
from workers.settings import NatsSettings, config_error, redact

from .auth_support import Events, Serve, clean_env, cli, one_line, roundtrip, servers
from .conftest import NatsServer

USERS = """authorization { users = [
  {user: alice, password: s3cret-alice}
  {user: bob, password: s3cret-bob, permissions: {publish: {deny: ["inference.>", "embedding.>", "secret.>"]}}}
] }
"""


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    yield from servers(tmp_path)


def url(port: int, userinfo: str = "") -> str:
    return f"nats://{userinfo + '@' if userinfo else ''}127.0.0.1:{port}"


async def login(**settings: Any) -> Any:
    s = NatsSettings(**settings)
    return await connect(s.nats_url, name="auth-test", timeout=30, auth=s.nats_auth())


# --- user and password -------------------------------------------------------------------------------------


async def test_user_and_password_work_in_the_url_and_from_nats_user_and_nats_password(serve, monkeypatch):
    port = serve(USERS)
    nc = await login(nats_url=url(port, "alice:s3cret-alice"))
    assert await roundtrip(nc) == b"ping"
    await nc.close()
    monkeypatch.setenv("NATS_URL", url(port))
    monkeypatch.setenv("NATS_USER", "alice")
    monkeypatch.setenv("NATS_PASSWORD", "s3cret-alice")
    nc = await login()
    assert await roundtrip(nc) == b"ping"
    await nc.close()


async def test_a_wrong_password_is_one_line_at_once_naming_the_settings(serve):
    port = serve(USERS)
    t0 = time.monotonic()
    with pytest.raises(NatsRefused) as e:
        await login(nats_url=url(port), nats_user="alice", nats_password="wrong-pw")
    assert time.monotonic() - t0 < 5  # not the 30 s timeout: a refusal is not retried
    line = one_line(str(e.value))
    assert line == (f"NATS refused the login at nats://127.0.0.1:{port} (Authorization Violation); "
                    "check NATS_USER/NATS_PASSWORD")
    with pytest.raises(NatsRefused) as e:
        await login(nats_url=url(port, "alice:wrong-pw"))
    assert "wrong-pw" not in str(e.value) and "user:password@ in NATS_URL" in str(e.value)
    with pytest.raises(NatsRefused) as e:
        await login(nats_url=url(port))
    assert "the server wants credentials: set NATS_USER/NATS_PASSWORD, NATS_TOKEN" in str(e.value)


def test_nats_chat_with_a_wrong_password_exits_with_one_line_and_no_traceback(serve):
    port = serve(USERS)
    t0 = time.monotonic()
    r = cli("nats-chat", "-input", "hi", "--server", url(port), "--user", "alice", "--password", "wrong-pw")
    assert time.monotonic() - t0 < 10
    line = one_line(r.stderr)
    assert r.returncode == 6 and line.startswith("nats-chat: NATS refused the login")
    assert "--user/--password (NATS_USER/NATS_PASSWORD)" in line and "wrong-pw" not in line
    r = cli("nats-embed", "-input", "hi", "-url", url(port, "alice:wrong-pw"))
    assert r.returncode == 6 and "wrong-pw" not in one_line(r.stderr)
    # the right password from the environment: logged in, and only then told there is no worker
    r = cli("nats-chat", "--list", env=clean_env(NATS_URL=url(port), NATS_USER="alice", NATS_PASSWORD="s3cret-alice"))
    assert r.returncode == 3 and "no workers found" in r.stderr


def test_the_monitor_and_a_worker_stop_with_one_line_when_the_login_is_refused(serve, tmp_path):
    port = serve(USERS)
    env = clean_env(NATS_URL=url(port, "alice:wrong-pw"), NATS_CONNECT_TIMEOUT="30")
    r = cli("monitor", "tui", "--once", env=env)
    assert r.returncode == 1 and one_line(r.stderr).startswith("error: NATS refused the login at")
    t0 = time.monotonic()
    r = cli("workers", "gemma3-270m", env={**env, "DATA_DIR": str(tmp_path / "data")})
    assert r.returncode == 1 and time.monotonic() - t0 < 20  # start-up and imports, not the 30 s connect timeout
    line = one_line(r.stderr)
    assert line.startswith("error: NATS refused the login") and "wrong-pw" not in line


# --- token, nkey, creds ----------------------------------------------------------------------------------


async def test_a_token_logs_in_from_nats_token_or_the_url(serve):
    port = serve('authorization { token: "t0ken-s3cret" }\n')
    nc = await login(nats_url=url(port), nats_token="t0ken-s3cret")
    assert await roundtrip(nc) == b"ping"
    await nc.close()
    nc = await login(nats_url=url(port, "t0ken-s3cret"))
    await nc.close()
    with pytest.raises(NatsRefused) as e:
        await login(nats_url=url(port), nats_token="not-it")
    assert one_line(str(e.value)).endswith("check NATS_TOKEN")


def new_keypair(prefix: int) -> Any:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


async def test_an_nkey_seed_file_logs_in_and_an_unknown_one_is_refused(serve, tmp_path):
    user, stranger = new_keypair(nkeys.PREFIX_BYTE_USER), new_keypair(nkeys.PREFIX_BYTE_USER)
    port = serve(f"authorization {{ users = [ {{nkey: {user.public_key.decode()}}} ] }}\n")
    (tmp_path / "user.nk").write_bytes(user.seed + b"\n")
    (tmp_path / "stranger.nk").write_bytes(stranger.seed)
    nc = await login(nats_url=url(port), nats_nkey_seed_file=str(tmp_path / "user.nk"))
    assert await roundtrip(nc) == b"ping"
    await nc.close()
    with pytest.raises(NatsRefused) as e:
        await login(nats_url=url(port), nats_nkey_seed_file=str(tmp_path / "stranger.nk"))
    assert "check NATS_NKEY_SEED_FILE (is its public key in the server's config?)" in one_line(str(e.value))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(signer: Any, subject: str, kind: str, exp: int | None = None, **claims: Any) -> str:
    """A NATS JWT as nsc writes one: base64url(header).base64url(claims).base64url(ed25519 signature)."""
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body: dict[str, Any] = {"jti": _b64(os.urandom(16)), "iat": int(time.time()), "iss": signer.public_key.decode(),
                            "name": kind, "sub": subject, "nats": {"type": kind, "version": 2, **claims}}
    if exp:
        body["exp"] = exp
    payload = f"{header}.{_b64(json.dumps(body).encode())}"
    return f"{payload}.{_b64(signer.sign(payload.encode()))}"


def operator_setup(tmp_path: Path) -> tuple[str, Path, Path]:
    """An operator, a system account and an account (MEMORY resolver) and two .creds files of one of its users:
    valid and expired. Returns (server config, good creds, expired creds)."""
    op, sys_acct, acct = (new_keypair(nkeys.PREFIX_BYTE_OPERATOR), new_keypair(nkeys.PREFIX_BYTE_ACCOUNT),
                          new_keypair(nkeys.PREFIX_BYTE_ACCOUNT))
    user = new_keypair(nkeys.PREFIX_BYTE_USER)
    unlimited = {"subs": -1, "data": -1, "payload": -1}
    limits = {**unlimited, "imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1}
    accounts = {a.public_key.decode(): _jwt(op, a.public_key.decode(), "account", limits=limits)
                for a in (sys_acct, acct)}
    preload = ", ".join(f"{k}: {v}" for k, v in accounts.items())
    conf = (f"operator: {_jwt(op, op.public_key.decode(), 'operator')}\nsystem_account: "
            f"{sys_acct.public_key.decode()}\nresolver: MEMORY\nresolver_preload: {{ {preload} }}\n")
    files = []
    for name, exp in (("user.creds", None), ("expired.creds", int(time.time()) - 60)):
        token = _jwt(acct, user.public_key.decode(), "user", exp, pub={}, sub={}, **unlimited)
        path = tmp_path / name
        path.write_text(f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
                        f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n")
        files.append(path)
    return conf, files[0], files[1]


async def test_a_creds_file_logs_in_and_an_expired_one_is_refused_saying_so(serve, tmp_path):
    conf, good, expired = operator_setup(tmp_path)
    port = serve(conf)
    nc = await login(nats_url=url(port), nats_creds=str(good))
    assert await roundtrip(nc) == b"ping"
    await nc.close()
    with pytest.raises(NatsRefused) as e:
        await login(nats_url=url(port), nats_creds=str(expired))
    assert "the user JWT in NATS_CREDS expired at" in one_line(str(e.value))
    r = cli("nats-chat", "--list", "--server", url(port), "--creds", str(good))
    assert r.returncode == 3 and "no workers found" in r.stderr


# --- settings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings,words", [
    ({"nats_user": "alice"}, "NATS_USER and NATS_PASSWORD go together"),
    ({"nats_user": "a", "nats_password": "b", "nats_token": "c"}, "NATS_USER/NATS_PASSWORD and NATS_TOKEN"),
    ({"nats_url": "nats://u:pw-in-url@h:4222", "nats_token": "c"}, "NATS_TOKEN and credentials in NATS_URL"),
    ({"nats_creds": "/nonexistent/x.creds"}, "NATS_CREDS='/nonexistent/x.creds' is invalid (cannot be read"),
    ({"nats_nkey_seed_file": "SELF"}, "NATS_NKEY_SEED_FILE="),
    ({"nats_creds": "SELF"}, "(not a .creds file"),
    ({"nats_tls_cert": "SELF"}, "NATS_TLS_CERT and NATS_TLS_KEY go together"),
    ({"nats_url": "http://u:pw-in-url@h:4222"}, "NATS_URL must look like nats://host:4222"),
    ({"nats_inbox_prefix": "_INBOX.>"}, "NATS_INBOX_PREFIX"),
])
def test_bad_connection_settings_are_one_line_naming_the_key_without_secrets(tmp_path, settings, words):
    (tmp_path / "junk").write_text("not a key\n")
    values = {k: str(tmp_path / "junk") if v == "SELF" else v for k, v in settings.items()}
    with pytest.raises(Exception) as e:
        NatsSettings(**values)
    line = one_line(str(config_error(e.value)))
    assert words in line and "pw-in-url" not in line


def test_secrets_never_print_and_urls_are_shown_redacted(monkeypatch):
    from monitor.config import load_settings

    s = NatsSettings(nats_user="u", nats_password="pw2")
    assert "pw2" not in repr(s) and "pw2" not in str(s.model_dump()) and "pw2" not in repr(s.nats_auth())
    assert redact("nats://alice:pw1@a:4222,nats://t0k@b:4222,tls://c:4222") == (
        "nats://alice:***@a:4222,nats://***@b:4222,tls://c:4222")
    assert redact("nats://alice:p@ss@a:4222") == "nats://alice:***@a:4222"
    monkeypatch.setenv("NATS_URL", "nats://alice:pw1@")
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert "pw1" not in str(e.value) and "alice:***@" in str(e.value)


def test_the_tui_header_shows_the_url_without_its_password(monkeypatch):
    from monitor.config import load_settings
    from monitor.registry import Registry
    from monitor.tui import screen

    monkeypatch.setenv("NATS_URL", "nats://alice:s3cret-alice@10.0.0.5:4222")
    settings = load_settings()
    console = Console(record=True, width=160)
    console.print(screen(Registry(settings), settings, "m", False))
    text = console.export_text()
    assert "alice:***@10.0.0.5:4222" in text and "s3cret" not in text


# --- permissions -------------------------------------------------------------------------------------------


async def test_a_denied_publish_is_an_event_and_the_connection_stays_up(serve):
    port = serve(USERS)
    s = NatsSettings(nats_url=url(port), nats_user="bob", nats_password="s3cret-bob")
    events = Events()
    nc = await connect(s.nats_url, name="bob", timeout=10, events=events, auth=s.nats_auth())
    await nc.publish("secret.plans", b"x")
    await nc.flush()
    await asyncio.sleep(0.1)
    code, msg, meta = events.seen[-1]
    assert code == "nats.permission" and meta == {"subject": "secret.plans", "operation": "publish"}
    assert msg.startswith('NATS denied publish to "secret.plans" (Permissions Violation) for user bob')
    assert nc.is_connected and await roundtrip(nc) == b"ping"
    await nc.close()


async def test_a_refused_reconnect_is_reported_once_and_the_connection_recovers_when_fixed(tmp_path):
    conf, port = tmp_path / "users.conf", broker.free_port()

    def restart(password: str) -> Any:
        conf.write_text(f"authorization {{ user: alice, password: {password} }}\n")
        return broker.start(port, tmp_path / "js", extra_args=["-c", str(conf)])

    server = restart("one")
    events = Events()
    s = NatsSettings(nats_url=url(port), nats_user="alice", nats_password="one")
    nc = await connect(s.nats_url, name="alice", timeout=10, events=events, auth=s.nats_auth())
    try:
        for password, code in (("two", "nats.refused"), ("one", "nats.reconnected")):  # changed, changed back
            server.terminate()
            server.wait()
            server = restart(password)
            for _ in range(100):
                if code in events.codes():
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)  # three more attempts: still one refusal
        assert events.codes() == ["nats.connected", "nats.disconnected", "nats.refused", "nats.reconnected"]
        assert events.seen[2][1] == (f"NATS refused the login at {url(port)} (Authorization Violation); "
                                     "check NATS_USER/NATS_PASSWORD")
        assert await roundtrip(nc) == b"ping"
    finally:
        await nc.close()
        server.terminate()
        server.wait()


def test_nats_chat_reports_a_denied_request_at_once_instead_of_timing_out(serve):
    port = serve(USERS)
    t0 = time.monotonic()
    r = cli("nats-chat", "-input", "hi", "-timeout", "60", "--server", url(port), "--user", "bob", "--password",
            "s3cret-bob")
    assert time.monotonic() - t0 < 10
    line = one_line(r.stderr)
    assert r.returncode == 6 and 'NATS denied publish to "inference.request.smollm2-135m"' in line  # the default


# --- a real worker: credentials in NATS_URL stay out of everything it writes ------------------------------


class AuthServer(NatsServer):
    """The conftest's server, with users; its `url` carries alice's password, as an operator might set NATS_URL."""

    @property
    def url(self) -> str:
        return f"nats://alice:s3cret-alice@127.0.0.1:{self.port}"


@pytest.fixture
def nats_server(tmp_path: Path):
    conf = tmp_path / "users.conf"
    # alice may do anything but publish backpressure reports: the worker's loses that permission
    conf.write_text('authorization { users = [ {user: alice, password: s3cret-alice, '
                    'permissions: {publish: {deny: ["monitoring.>"]}}} ] }\n')
    server = AuthServer(broker.free_port(), tmp_path / "js", ["-c", str(conf)])
    server.start()
    yield server
    server.stop()


@pytest.mark.model
async def test_a_worker_keeps_the_password_out_of_events_heartbeats_and_srv_info(start_worker, nats_server):
    w = await start_worker(HEARTBEAT_INTERVAL="1", REPORT_INTERVAL_IDLE="0.5", REPORT_INTERVAL_BUSY="0.5")
    s = NatsSettings(nats_url=nats_server.url)
    nc = await connect(s.nats_url, name="auth-test", timeout=10, auth=s.nats_auth())
    sub = await nc.subscribe("models.*.heartbeat")
    heartbeat = (await sub.next_msg(timeout=5)).data
    info = (await nc.request("$SRV.INFO", b"", timeout=2)).data
    await asyncio.sleep(1.5)  # a few denied reports
    assert w.proc.poll() is None, w.output()  # a lost permission does not stop the worker
    await nc.close()
    w.terminate()
    con = sqlite3.connect(w.db)
    events = con.execute("SELECT code, msg, meta FROM events").fetchall()
    con.close()
    everything = b"".join([heartbeat, info, json.dumps(events).encode(), w.output().encode()])
    assert b"s3cret" not in everything
    assert ("nats.connected", f"connected to nats://127.0.0.1:{nats_server.port}") in [e[:2] for e in events]
    denied = [json.loads(meta) for code, _, meta in events if code == "nats.permission"]
    assert denied and denied[0]["subject"].startswith("monitoring.") and denied[0]["operation"] == "publish"


@pytest.mark.parametrize("prefix,subject", [
    ("_INBOX.alice", "inference.cancel.alice.gemma3-270m"),  # what a least-privilege client may publish
    ("", "inference.cancel.gemma3-270m"),  # an open bus: the model's cancel subject
])
async def test_nats_chat_cancels_on_its_own_owner_subject_when_its_inbox_has_an_owner(nats_server, prefix, subject):
    from cli.client import FleetClient
    from workers.connection import connect as plain_connect
    from workers.settings import NatsAuth

    watcher = await plain_connect(nats_server.url, name="watcher")
    seen = await watcher.subscribe("inference.cancel.>")
    await watcher.flush()
    async with FleetClient(nats_server.url, auth=NatsAuth(inbox_prefix=prefix or None)) as fleet:
        await fleet.cancel("gemma3-270m", "r1")
    msg = await seen.next_msg(timeout=2)
    assert msg.subject == subject and json.loads(msg.data) == {"req_id": "r1"}
    await watcher.close()

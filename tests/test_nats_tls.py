"""TLS to NATS: a CA and certificates made in the test with Debian's `openssl`, real nats-servers with a `tls {}`
block. tls:// with NATS_TLS_CA works; a wrong CA, a certificate for another name, a server without TLS and a missing
client certificate are each one line at once, naming the setting to check; mutual TLS works with
NATS_TLS_CERT / NATS_TLS_KEY."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from workers.connection import NatsRefused, connect
from workers.settings import NatsSettings, config_error

from .auth_support import Serve, cli, one_line, roundtrip, servers

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command (Debian: openssl)")


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl(d, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN=fleet test {name}")


def _cert(d: Path, name: str, ca: str, ext: str) -> None:
    _openssl(d, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    (d / f"{name}.ext").write_text(ext + "\n")
    _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca / wrongca, a server certificate for localhost and 127.0.0.1, one for another name only, a client one."""
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "wrongca")
    _cert(d, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1")
    _cert(d, "elsewhere", "ca", "subjectAltName=DNS:nats.elsewhere.example")
    _cert(d, "client", "ca", "extendedKeyUsage=clientAuth")
    return d


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    yield from servers(tmp_path)


def tls_conf(pki: Path, cert: str = "server", verify: bool = False) -> str:
    return (f'tls {{ cert_file: "{pki}/{cert}.pem", key_file: "{pki}/{cert}.key", ca_file: "{pki}/ca.pem", '
            f"verify: {str(verify).lower()}, timeout: 2 }}\n")


async def login(**settings: Any) -> Any:
    s = NatsSettings(**settings)
    return await connect(s.nats_url, name="tls-test", timeout=30, auth=s.nats_auth())


async def refused(**settings: Any) -> str:
    """The one line a refused connect gives, checked to come at once (not after the 30 s timeout)."""
    t0 = time.monotonic()
    with pytest.raises(NatsRefused) as e:
        await login(**settings)
    assert time.monotonic() - t0 < 5
    return one_line(str(e.value))


async def test_tls_url_with_the_ca_works_and_so_does_nats_url_to_a_tls_server(serve, pki):
    port = serve(tls_conf(pki))
    nc = await login(nats_url=f"tls://127.0.0.1:{port}", nats_tls_ca=str(pki / "ca.pem"))
    assert await roundtrip(nc) == b"ping"
    await nc.close()
    nc = await login(nats_url=f"nats://localhost:{port}", nats_tls_ca=str(pki / "ca.pem"))  # upgraded, verified
    assert await roundtrip(nc) == b"ping"
    await nc.close()


async def test_a_wrong_ca_or_none_is_refused_with_a_line_naming_nats_tls_ca(serve, pki):
    port = serve(tls_conf(pki))
    line = await refused(nats_url=f"tls://127.0.0.1:{port}", nats_tls_ca=str(pki / "wrongca.pem"))
    assert line == (f"the certificate of the NATS server at tls://127.0.0.1:{port} was not accepted (unable to get "
                    "local issuer certificate); check NATS_TLS_CA (the CA that signed the server's certificate)")
    assert "check NATS_TLS_CA" in await refused(nats_url=f"tls://127.0.0.1:{port}")  # the system's CAs


async def test_a_certificate_for_another_name_is_refused_saying_so(serve, pki):
    port = serve(tls_conf(pki, cert="elsewhere"))
    line = await refused(nats_url=f"tls://127.0.0.1:{port}", nats_tls_ca=str(pki / "ca.pem"))
    assert "is not for that name (IP address mismatch" in line and "connect by a host name" in line


async def test_tls_url_to_a_server_without_tls_is_refused_before_credentials_go_out(serve, pki, tmp_path):
    port = serve("authorization { user: alice, password: s3cret }\ndebug: true\ntrace: true\n")
    line = await refused(nats_url=f"tls://alice:s3cret@127.0.0.1:{port}", nats_tls_ca=str(pki / "ca.pem"))
    assert line.startswith(f"the NATS server at tls://127.0.0.1:{port} does not offer TLS") and "s3cret" not in line
    log = tmp_path / f"nats-{port}.log"
    for _ in range(40):  # the server traces every protocol op; wait until it has seen us go (after the start probe)
        if log.read_text().count("Client connection closed") >= 2:
            break
        await asyncio.sleep(0.05)
    assert log.read_text().count("Client connection closed") >= 2 and "CONNECT" not in log.read_text()


async def test_mutual_tls_works_with_a_client_certificate_and_is_refused_without(serve, pki):
    port = serve(tls_conf(pki, verify=True))
    nc = await login(nats_url=f"tls://127.0.0.1:{port}", nats_tls_ca=str(pki / "ca.pem"),
                     nats_tls_cert=str(pki / "client.pem"), nats_tls_key=str(pki / "client.key"))
    assert await roundtrip(nc) == b"ping"
    await nc.close()
    line = await refused(nats_url=f"tls://127.0.0.1:{port}", nats_tls_ca=str(pki / "ca.pem"))
    assert line == (f"the NATS server at tls://127.0.0.1:{port} requires a client certificate (mutual TLS); "
                    "set NATS_TLS_CERT/NATS_TLS_KEY")


def test_nats_chat_takes_the_tls_flags_and_names_them_when_refused(serve, pki):
    port = serve(tls_conf(pki, verify=True))
    server = ["--server", f"tls://127.0.0.1:{port}", "--tlsca", str(pki / "ca.pem")]
    r = cli("nats-chat", "--list", *server, "--tlscert", str(pki / "client.pem"), "--tlskey", str(pki / "client.key"))
    assert r.returncode == 3 and "no workers found" in r.stderr  # connected; nobody serves
    r = cli("nats-chat", "-input", "hi", *server)
    line = one_line(r.stderr)
    assert r.returncode == 6 and line.endswith("set --tlscert/--tlskey (NATS_TLS_CERT/NATS_TLS_KEY)")
    r = cli("nats-embed", "-input", "hi", "--server", f"tls://127.0.0.1:{port}", "--tlsca", str(pki / "wrongca.pem"))
    assert r.returncode == 6 and "check --tlsca (NATS_TLS_CA)" in one_line(r.stderr)


@pytest.mark.parametrize("settings,words", [
    ({"nats_tls_cert": "client.pem"}, "NATS_TLS_CERT and NATS_TLS_KEY go together"),
    ({"nats_tls_ca": "missing.pem"}, "NATS_TLS_CA="),
    ({"nats_tls_ca": "client.key"}, "is not a PEM CA certificate"),
    ({"nats_tls_cert": "client.pem", "nats_tls_key": "server.key"}, "do not load as a PEM certificate and its key"),
])
def test_tls_files_are_checked_at_start_with_one_line(pki, settings, words):
    with pytest.raises(Exception) as e:
        NatsSettings(**{k: str(pki / v) for k, v in settings.items()})
    assert words in one_line(str(config_error(e.value)))

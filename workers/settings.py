"""What every process's settings share: the NATS connection, the backpressure thresholds, the one-line error.

The worker's `Settings` (workers/config.py) and the monitor's `MonitorSettings` (monitor/config.py) both build on
`NatsSettings` and `BackpressureSettings`, and both turn a pydantic `ValidationError` into one `ConfigError` line
that names the key and the fix with `config_error`. The CLIs build a `NatsSettings` from their flags and the same
environment. `NatsSettings.nats_auth()` is the one translation of the credential and TLS settings into nats-py's
connect options (`NatsAuth`); `redact()` is how a NATS URL is shown anywhere.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlparse

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings

__all__ = ["BackpressureSettings", "ConfigError", "NatsAuth", "NatsSettings", "config_error", "parse_addr", "redact"]

# Settings whose values never appear in an error message; NATS_URL is shown through `redact`.
SECRET_KEYS = frozenset({"NATS_PASSWORD", "NATS_TOKEN", "API_KEY"})
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/,]*)@")


class ConfigError(Exception):
    """A setting a user must fix; the message is the whole story."""


def parse_addr(value: str, key: str = "address") -> tuple[str, int]:
    """`:5770`, `5770`, `127.0.0.1:5770` or `[::1]:5770` → (host, port); an empty host means all interfaces."""
    v = value.strip()
    host, sep, port = v.rpartition(":")
    if not sep:
        host, port = "", v
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{key} must look like ':5770' or '127.0.0.1:5770', got {value!r}")
    return host, int(port)


def secret_from_file(value: SecretStr, path: str, key: str) -> SecretStr:
    """`<key>`, or the contents of `<key>_FILE` (a Docker or Kubernetes secret), never both: for a settings
    validator (ValueError names the setting)."""
    if not path:
        return value
    if value.get_secret_value():
        raise ValueError(f"set {key} or {key}_FILE, not both")
    try:
        secret = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"{key}_FILE={path} cannot be read ({e.strerror})") from None
    if not secret:
        raise ValueError(f"{key}_FILE={path} is empty")
    return SecretStr(secret)


def redact(url: str) -> str:
    """A NATS URL (or a comma-separated list) as it may be shown: `user:***@` for a password, `***@` for a token."""

    def hide(m: re.Match[str]) -> str:
        user, sep, _ = m["info"].partition(":")
        return f"{m['scheme']}{user}:***@" if sep else f"{m['scheme']}***@"

    return _USERINFO.sub(hide, url)


@dataclass(frozen=True)
class NatsAuth:
    """How a process logs in to NATS and whether it speaks TLS: nats-py `connect()` keywords plus the setting
    names a refusal should point at. Built by `NatsSettings.nats_auth()`; secrets stay out of its repr."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    nkeys_seed: str | None = None  # a file with the user's nkey seed
    user_credentials: str | None = None  # a .creds file (user JWT + nkey seed)
    tls: ssl.SSLContext | None = None
    inbox_prefix: str | None = None  # replies come to <prefix>.<id> instead of _INBOX.<id>
    wants_tls: bool = False  # a tls:// URL or a TLS setting: a server that does not offer TLS is refused
    client_cert: bool = False
    login_hint: str = "set NATS_USER/NATS_PASSWORD, NATS_TOKEN, NATS_NKEY_SEED_FILE or NATS_CREDS"
    identity: str = "a connection without credentials"  # who the server's permissions apply to, without secrets
    creds_hint: str = "NATS_CREDS"
    ca_hint: str = "NATS_TLS_CA"
    cert_hint: str = "NATS_TLS_CERT/NATS_TLS_KEY"

    def options(self) -> dict[str, Any]:
        """The keywords for nats-py's `Client.connect`, only those that are set."""
        keys = ("user", "password", "token", "nkeys_seed", "user_credentials", "tls", "inbox_prefix")
        return {k: v for k in keys if (v := getattr(self, k)) is not None}


def _path(path: str) -> str:
    return str(Path(path).expanduser()) if path else path


def _read(path: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise ValueError(f"cannot be read: {e.strerror}") from None


def creds_expiry(path: str) -> float | None:
    """When the user JWT in a .creds file expires (epoch seconds), or None; unreadable files give None."""
    try:
        token = Path(path).expanduser().read_text().split("-----BEGIN NATS USER JWT-----")[1].split()[0]
        claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
        return float(claims["exp"]) if claims.get("exp") else None
    except (OSError, IndexError, ValueError, KeyError, TypeError):
        return None


class NatsSettings(BaseSettings):
    """Where the NATS server is, how this process logs in, and how long the first connect may take."""

    nats_url: str = Field(default="nats://127.0.0.1:4222",
                          description="one URL or a comma-separated list: nats://host:4222,tls://other:4222; "
                                      "user:password@ or token@ allowed (shown as user:***@)")
    nats_connect_timeout: float = Field(default=30.0, gt=0,
                                        description="seconds the first connect may take before the process gives up")
    nats_user: str = Field(default="", description="user name; with NATS_PASSWORD")
    nats_password: SecretStr = Field(default=SecretStr(""), description="password for NATS_USER")
    nats_token: SecretStr = Field(default=SecretStr(""), description="a token (server `authorization { token }`)")
    nats_nkey_seed_file: str = Field(default="", description="a file holding the user's nkey seed (SU…)")
    nats_creds: str = Field(default="", description="a .creds file: user JWT and nkey seed (decentralised auth)")
    nats_tls_ca: str = Field(default="", description="PEM CA bundle the server's certificate must chain to")
    nats_tls_cert: str = Field(default="", description="PEM client certificate (mutual TLS); with NATS_TLS_KEY")
    nats_tls_key: str = Field(default="", description="PEM private key of NATS_TLS_CERT")
    # workers answer only `_INBOX.…` subjects (queue.reply_targets), so a prefix is `_INBOX.<something>`, no wildcards
    nats_inbox_prefix: str = Field(default="", pattern=r"^(_INBOX(\.[A-Za-z0-9_$-]+)+)?$",
                                   description="reply subjects start with this instead of _INBOX (per-user inboxes "
                                               "the server's permissions can tell apart, e.g. _INBOX.alice)")

    @field_validator("nats_url")
    @classmethod
    def _nats_url(cls, v: str) -> str:
        for part in v.split(","):
            u = urlparse(part.strip())
            if "://" not in part or u.scheme not in ("nats", "tls", "ws", "wss") or not u.hostname:
                raise ValueError(f"NATS_URL must look like nats://host:4222 or tls://host:4222, got {redact(v)!r}")
        return ",".join(part.strip() for part in v.split(","))

    @field_validator("nats_nkey_seed_file")
    @classmethod
    def _seed(cls, v: str) -> str:
        if v:
            import nkeys  # only here: it loads libsodium

            seed = bytearray(_read(v).strip())
            try:
                nkeys.from_seed(seed).wipe()
            except (nkeys.NkeysError, ValueError):
                raise ValueError("not an nkey seed file (one line starting with SU)") from None
        return _path(v)

    @field_validator("nats_creds")
    @classmethod
    def _creds(cls, v: str) -> str:
        # nats-py would loop forever reading a file without these blocks
        if v and not {b"BEGIN NATS USER JWT", b"BEGIN USER NKEY SEED"} <= set(
                re.findall(rb"BEGIN NATS USER JWT|BEGIN USER NKEY SEED", _read(v))):
            raise ValueError("not a .creds file: it needs a NATS USER JWT and a USER NKEY SEED block, as "
                             "`nsc generate creds` writes")
        return _path(v)

    @field_validator("nats_tls_ca", "nats_tls_cert", "nats_tls_key")
    @classmethod
    def _pem(cls, v: str) -> str:
        if v:
            _read(v)
        return _path(v)

    @model_validator(mode="after")
    def _one_login(self) -> Self:
        in_url = any(urlparse(p).username for p in self.nats_url.split(","))
        user, password = self.nats_user, self.nats_password.get_secret_value()
        if bool(user) != bool(password):
            raise ValueError("NATS_USER and NATS_PASSWORD go together; set both or neither")
        ways = [name for name, on in (("NATS_USER/NATS_PASSWORD", user),
                                      ("NATS_TOKEN", self.nats_token.get_secret_value()),
                                      ("NATS_NKEY_SEED_FILE", self.nats_nkey_seed_file),
                                      ("NATS_CREDS", self.nats_creds), ("credentials in NATS_URL", in_url)) if on]
        if len(ways) > 1:
            raise ValueError(f"{' and '.join(ways)} are both set; a process logs in one way, keep one")
        if bool(self.nats_tls_cert) != bool(self.nats_tls_key):
            raise ValueError("NATS_TLS_CERT and NATS_TLS_KEY go together; set both or neither")
        self.tls_context()  # a certificate that does not load is a setting to fix, not a connect error
        return self

    def tls_context(self) -> ssl.SSLContext | None:
        """The client TLS context from NATS_TLS_CA / NATS_TLS_CERT / NATS_TLS_KEY; None when none is set (nats-py
        then uses the system's CAs for a server that requires TLS)."""
        if not (self.nats_tls_ca or self.nats_tls_cert):
            return None
        try:
            ctx = ssl.create_default_context(cafile=self.nats_tls_ca or None)
        except ssl.SSLError as e:
            raise ValueError(f"NATS_TLS_CA={self.nats_tls_ca} is not a PEM CA certificate ({e.reason or e})") from None
        if self.nats_tls_cert:
            try:
                ctx.load_cert_chain(self.nats_tls_cert, self.nats_tls_key)
            except ssl.SSLError as e:
                raise ValueError(f"NATS_TLS_CERT={self.nats_tls_cert} and NATS_TLS_KEY={self.nats_tls_key} do not "
                                 f"load as a PEM certificate and its key ({e.reason or e})") from None
        return ctx

    def nats_auth(self, names: Mapping[str, str] | None = None) -> NatsAuth:
        """These settings as nats-py connect options. `names` renames settings in the hints (the CLIs: flags)."""

        def label(*keys: str) -> str:
            shown = "/".join((names or {}).get(k, k) for k in keys)
            return f"{shown} ({'/'.join(keys)})" if names else shown

        password, token = self.nats_password.get_secret_value(), self.nats_token.get_secret_value()
        url_user = next((u.username for p in self.nats_url.split(",") if (u := urlparse(p)).username), None)
        if self.nats_user:
            hint = f"check {label('NATS_USER', 'NATS_PASSWORD')}"
            who = f"user {self.nats_user}, from {label('NATS_USER')}"
        elif token:
            hint, who = f"check {label('NATS_TOKEN')}", f"the token in {label('NATS_TOKEN')}"
        elif self.nats_nkey_seed_file:
            hint = f"check {label('NATS_NKEY_SEED_FILE')} (is its public key in the server's config?)"
            who = f"the nkey in {label('NATS_NKEY_SEED_FILE')}"
        elif self.nats_creds:
            hint = f"check {label('NATS_CREDS')} (signed by an account the server trusts, not expired or revoked?)"
            who = f"the user in {label('NATS_CREDS')}"
        elif url_user:
            hint = f"check the user:password@ in {label('NATS_URL')}"
            who = f"the credentials in {label('NATS_URL')}"
        else:
            hint = (f"the server wants credentials: set {label('NATS_USER', 'NATS_PASSWORD')}, {label('NATS_TOKEN')}, "
                    f"{label('NATS_NKEY_SEED_FILE')} or {label('NATS_CREDS')}")
            who = "a connection without credentials"
        tls = self.tls_context()
        wants_tls = tls is not None or any(urlparse(p).scheme == "tls" for p in self.nats_url.split(","))
        return NatsAuth(user=self.nats_user or None, password=password or None, token=token or None,
                        nkeys_seed=self.nats_nkey_seed_file or None, user_credentials=self.nats_creds or None,
                        tls=tls, inbox_prefix=self.nats_inbox_prefix or None, wants_tls=wants_tls,
                        client_cert=bool(self.nats_tls_cert), login_hint=hint, identity=who,
                        ca_hint=label("NATS_TLS_CA"), cert_hint=label("NATS_TLS_CERT", "NATS_TLS_KEY"),
                        creds_hint=label("NATS_CREDS"))


class BackpressureSettings(BaseSettings):
    """The thresholds that turn a queue's state into a level (`protocol.backpressure_level`)."""

    backpressure_warning: float = Field(default=0.5, gt=0, description="from here the level is `warning`")
    backpressure_critical: float = Field(default=0.8, gt=0, description="from here the level is `critical`")
    # The level is the expected wait of a new request (protocol.wait_level); the capacity fractions above decide
    # only while nothing was served recently (no service time to estimate a wait from).
    backpressure_wait_warning_s: float = Field(default=10.0, gt=0, description="expected wait from which `warning`")
    backpressure_wait_critical_s: float = Field(default=60.0, gt=0, description="expected wait from which `critical`")

    @model_validator(mode="after")
    def _thresholds(self) -> Self:
        if self.backpressure_warning >= self.backpressure_critical:
            raise ValueError("BACKPRESSURE_WARNING must be below BACKPRESSURE_CRITICAL")
        if self.backpressure_wait_warning_s >= self.backpressure_wait_critical_s:
            raise ValueError("BACKPRESSURE_WAIT_WARNING_S must be below BACKPRESSURE_WAIT_CRITICAL_S")
        return self


def config_error(e: ValidationError, where: str = "in the environment") -> ConfigError:
    """The first problem of `e` as one line naming the key, the value and where to fix it (secrets not shown)."""
    err = e.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a check across fields: its message names the keys
        return ConfigError(f"config: {msg}; fix it {where}")
    key = str(err["loc"][0]).upper()
    if err["type"] == "missing":
        return ConfigError(f"config: {key} is required; set it {where}")
    value = err.get("input")
    shown = "'***'" if key in SECRET_KEYS else repr(redact(value)) if isinstance(value, str) else repr(value)
    return ConfigError(f"config: {key}={shown} is invalid ({msg}); fix it {where}")

"""Worker settings: `envs/worker.<name>.env`, overridden by the process environment.

One object, validated at start. A bad value becomes one line naming the key and the fix
(`ConfigError`), never a traceback. The NATS and backpressure settings, `ConfigError` and `parse_addr` are
shared with the monitor (workers/settings.py).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from .formats import FORMATS
from .protocol import REPLY_PREFIXES, Kind, Limits
from .settings import BackpressureSettings, ConfigError, NatsSettings, config_error, parse_addr, secret_from_file

__all__ = ["ENVS_DIR", "ROOT", "ConfigError", "Settings", "available_workers", "env_file_for", "load_settings",
           "parse_addr"]


def _root() -> Path:
    """The checkout (envs/ and data/ beside the packages); for an installed copy, the working directory."""
    checkout = Path(__file__).resolve().parent.parent
    return checkout if (checkout / "envs").is_dir() else Path.cwd()


ROOT = _root()
ENVS_DIR = ROOT / "envs"


class Settings(NatsSettings, BackpressureSettings):
    model_config = SettingsConfigDict(extra="ignore", env_file_encoding="utf-8", validate_default=True)

    # what to serve
    model_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model_kind: Kind = "inference"
    model_path: str = ""
    model_package: str = ""
    model_repo: str = ""
    model_file: str = ""
    model_sha256: str = ""
    model_source_dir: str = ""  # a Hugging Face BERT folder, converted to MODEL_PATH when that file is missing
    model_format: str = "template"  # a registered prompt format (workers/formats/)
    harmony_identity: str = "You are ChatGPT, a large language model trained by OpenAI."
    harmony_knowledge_cutoff: str = "2024-06"
    harmony_reasoning: Literal["low", "medium", "high"] = "medium"
    prompt_template: str = ""  # default: data/models/<name>/prompt_template.json in the repo
    pooling: Literal["mean", "cls", "last", "none"] = "mean"
    embed_normalize: bool = False  # L2-normalise embedding vectors
    ctx_size: int = Field(default=2048, ge=64)
    model_threads: int = Field(default=0, ge=0)  # 0: cores / concurrency
    worker_concurrency: int = Field(default=1, ge=1, le=64)
    # contexts: WORKER_CONCURRENCY llama.cpp contexts, one request each; batched: one context decoding up to
    # WORKER_CONCURRENCY requests together (continuous batching, workers/batching.py)
    engine: Literal["contexts", "batched"] = "batched"
    # batched: tokens the one KV cache holds for all sequences together; 0: CTX_SIZE × WORKER_CONCURRENCY (every
    # sequence can always use its whole context). Smaller saves memory: a request waits for room instead.
    kv_cache_tokens: int = Field(default=0, ge=0)
    # embedding workers: up to this many queued requests are embedded together in one llama.cpp call (one
    # sequence per text); the worker takes that many from the queue at once. 1: one request at a time.
    embed_batch_max: int = Field(default=16, ge=1, le=256)
    default_max_tokens: int = Field(default=128, ge=1)
    # sampling for requests that leave it out (a model's recommended values); unset: llama.cpp's (workers/sampling.py)
    default_temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    default_top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    default_top_k: int | None = Field(default=None, ge=0)
    default_min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    default_repeat_penalty: float | None = Field(default=None, gt=0.0)

    # GPU offload: needs a CUDA or Metal build of llama-cpp-python (README); the defaults are the CPU as before
    n_gpu_layers: int = Field(default=0, ge=-1)  # layers on the GPU; 0: none, -1: all
    flash_attn: bool = False  # on/off: llama-cpp-python 0.3's Llama takes no "auto"
    main_gpu: int = Field(default=0, ge=0)  # llama.cpp's main GPU (its default split by layers uses every GPU)
    tensor_split: str = ""  # comma-separated share of the model per GPU, e.g. 3,1; empty: llama.cpp decides

    # HTTP API
    http_queue_limit: int = Field(default=8, ge=0)  # HTTP requests that may wait for a slot; more get 429
    log_prompts_http: bool = False  # show prompts and answers in GET /logs
    log_prompts: bool = False  # put prompts and answers (first 2000 characters) in the published request events
    stats_window_s: float = Field(default=60.0, gt=0, le=3600)  # the heartbeat's sliding window (WindowStats)
    api_key: SecretStr = SecretStr("")  # when set, every route but /healthz and /readyz needs it (workers/access.py)
    api_key_file: str = ""  # a file whose contents are the key (a Docker or Kubernetes secret)

    # where (NATS_URL and NATS_CONNECT_TIMEOUT: NatsSettings)
    http_addr: str = ""
    data_dir: Path = ROOT / "data"
    worker_id: str = ""

    # queue
    queue_max_per_model: int = Field(default=1000, ge=1)
    stream_replicas: int = Field(default=1, ge=1, le=5)  # copies of the queue in a NATS cluster (JetStream: 1-5)
    queue_max_age_s: float = Field(default=3600.0, gt=0)
    queue_ack_wait_s: float = Field(default=30.0, ge=1)
    queue_max_deliver: int = Field(default=4, ge=1)
    queue_max_ack_pending: int = Field(default=64, ge=1)
    default_timeout_ms: int = Field(default=300_000, gt=0)
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)
    drain_timeout: float = Field(default=30.0, ge=0)
    poison_max_crashes: int = Field(default=2, ge=1)  # attempts that ended with the worker gone, then dead_letter
    reply_prefixes: str = ",".join(REPLY_PREFIXES)  # where answers may go (comma-separated subject prefixes)
    # how long an answer nobody listens for is sent again (a caller re-subscribing after a broker restart)
    reply_listen_s: float = Field(default=10.0, ge=0)

    # what one request may ask (protocol.Limits)
    max_tokens_limit: int = Field(default=0, ge=0)  # 0: CTX_SIZE
    embed_max_inputs: int = Field(default=2048, ge=1)
    embed_max_tokens: int = Field(default=0, ge=0)  # tokens over all inputs of one request; 0: 64 × CTX_SIZE
    grammar_max_bytes: int = Field(default=64 * 1024, ge=64)
    grammar_max_depth: int = Field(default=64, ge=1)
    grammar_max_rules: int = Field(default=1000, ge=1)
    grammar_max_optional: int = Field(default=128, ge=1)

    # telemetry and log
    heartbeat_interval: float = Field(default=10.0, gt=0)
    report_interval_busy: float = Field(default=1.0, gt=0)
    report_interval_idle: float = Field(default=10.0, gt=0)
    # BACKPRESSURE_WARNING / BACKPRESSURE_CRITICAL: BackpressureSettings
    log_retention_days: float = Field(default=14.0, gt=0)
    log_max_rows: int = Field(default=200_000, ge=100)

    @field_validator("http_addr")
    @classmethod
    def _addr(cls, v: str) -> str:
        if v:
            parse_addr(v, "HTTP_ADDR")
        return v

    @field_validator("reply_prefixes")
    @classmethod
    def _prefixes(cls, v: str) -> str:
        for prefix in (x.strip() for x in v.split(",")):
            if not prefix.endswith(".") or any(c in prefix for c in " *>") or prefix.startswith(("$", ".")):
                raise ValueError(f"{prefix!r} is not a subject prefix such as _INBOX. (end it with a dot; no "
                                 "wildcards, no $ subjects)")
        return v

    @field_validator("flash_attn", mode="before")
    @classmethod
    def _flash_attn(cls, v: object) -> object:
        if isinstance(v, str) and v.strip().lower() == "auto":
            raise ValueError("llama-cpp-python 0.3 takes on or off, not auto; use on or off")
        return v

    @field_validator("tensor_split")
    @classmethod
    def _tensor_split(cls, v: str) -> str:
        if v.strip():
            _split(v)
        return v

    @field_validator("model_format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v not in FORMATS:
            raise ValueError(f"not a prompt format; use one of {', '.join(sorted(FORMATS))}")
        return v

    @model_validator(mode="after")
    def _derived(self) -> Settings:
        if not self.worker_id:
            self.worker_id = f"{self.model_name}-{socket.gethostname()}-{os.getpid()}"
        if self.model_threads == 0:  # the cores, shared by the contexts (one batched context uses them all)
            one_context = self.engine == "batched" or self.model_kind == "embedding"  # embed_batch: one context
            share = 1 if one_context else self.worker_concurrency
            self.model_threads = max(1, (os.cpu_count() or 1) // share)
        return self

    @model_validator(mode="after")
    def _api_key_file(self) -> Settings:
        self.api_key = secret_from_file(self.api_key, self.api_key_file, "API_KEY")
        return self

    @property
    def limits(self) -> Limits:
        return Limits(
            max_tokens=min(self.max_tokens_limit or self.ctx_size, self.ctx_size),
            embed_max_inputs=self.embed_max_inputs, grammar_max_bytes=self.grammar_max_bytes,
            grammar_max_depth=self.grammar_max_depth, grammar_max_rules=self.grammar_max_rules,
            grammar_max_optional=self.grammar_max_optional,
            reply_prefixes=tuple(x.strip() for x in self.reply_prefixes.split(",") if x.strip()),
        )

    @property
    def embed_token_cap(self) -> int:
        return self.embed_max_tokens or 64 * self.ctx_size

    @property
    def gpu_split(self) -> tuple[float, ...]:
        """TENSOR_SPLIT as numbers; () when unset."""
        return _split(self.tensor_split) if self.tensor_split.strip() else ()

    @property
    def sampling_defaults(self) -> dict[str, float]:
        """DEFAULT_TEMPERATURE, DEFAULT_TOP_P, … that are set, by request parameter name (`temperature`, …)."""
        names = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")
        return {n: v for n in names if (v := getattr(self, f"default_{n}")) is not None}

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models" / self.model_name

    @property
    def template_path(self) -> Path:
        path = Path(self.prompt_template) if self.prompt_template else ROOT / "data" / "models" / self.model_name / (
            "prompt_template.json")
        return path if path.is_absolute() else ROOT / path

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs" / f"{self.model_name}.sqlite"

    @property
    def http_host_port(self) -> tuple[str, int] | None:
        return parse_addr(self.http_addr, "HTTP_ADDR") if self.http_addr else None


def _split(text: str) -> tuple[float, ...]:
    """`3,1` → (3.0, 1.0): one non-negative share per GPU, at least one above zero."""
    try:
        shares = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError("use comma-separated numbers, one share per GPU, e.g. 3,1") from None
    if not all(0 <= x < float("inf") for x in shares) or not any(shares):
        raise ValueError("shares must be finite, not negative, and one above zero, e.g. 3,1")
    return shares


def env_file_for(name: str) -> Path:
    return ENVS_DIR / f"worker.{name}.env"


def available_workers() -> list[str]:
    return sorted(p.name[len("worker.") : -len(".env")] for p in ENVS_DIR.glob("worker.*.env"))


def load_settings(name: str | None = None, env_file: str | Path | None = None) -> Settings:
    """Settings for worker `name` (its env file) or an explicit env file; the environment wins over the file."""
    if env_file is None and name:
        env_file = env_file_for(name)
        if not Path(env_file).exists():
            known = ", ".join(available_workers()) or "none"
            raise ConfigError(f"no env file {env_file}; known workers: {known}")
    if env_file is not None and not Path(env_file).exists():
        raise ConfigError(f"env file {env_file} does not exist")
    try:
        return Settings(_env_file=env_file)
    except ValidationError as e:
        raise config_error(e, f"in {env_file} or the environment" if env_file else "in the environment") from None

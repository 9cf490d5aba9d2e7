"""Which models answer a request, and in what order: `model` as a name, a role alias from the roles file, or `auto`
with a `task_type`; a role's models ordered by strategy; a circuit breaker per model.

The roles file (GATEWAY_ROLES_FILE, envs/roles.toml) maps roles to ordered model lists and task types to roles; a
missing file means no roles, a malformed one is a ConfigError naming the file. A role's models are ordered by the
body's `routing` (or `routing_strategy`), else GATEWAY_ROUTING, from what discovery knows right now:

- `least_busy`: the lowest expected wait among a model's online instances (the workers' backpressure reports);
- `round_robin`: the role's list, its start rotated by one on each request for that role;
- `capability_match`: the models that advertise what the body needs (`grammar` → grammar-constrained, …) first,
  then least busy.

Whatever the strategy, a model with no online instance goes last (its turn comes only if the others refuse), and
the role's own order breaks ties. The routes try the models in that order (routes.py `first`), skip one whose
breaker is open, and tell the breaker how each attempt went: GATEWAY_BREAKER_FAILURES failures in a row open it
for GATEWAY_BREAKER_COOLDOWN_S; then one trial request goes through (half-open): a success closes it, a failure
opens it for another cool-down. Breakers live in this process: each gateway behind a load balancer keeps its own.
"""

from __future__ import annotations

import logging
import math
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from monitor.registry import Instance, Registry
from workers import discovery
from workers import protocol as p
from workers.settings import ConfigError

from .config import GatewaySettings

log = logging.getLogger(__name__)

AUTO = "auto"  # `model` that picks the role from the body's `task_type`
DEFAULT_ROLE = "primary"  # what `auto` without a task_type means
STRATEGIES = ("least_busy", "round_robin", "capability_match")
MAX_BREAKERS = 4096  # models with a failure on record; the oldest record goes first beyond that
BreakerState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True)
class Roles:
    """The roles file: role → its models in order of preference, and task type → role."""

    roles: dict[str, list[str]] = field(default_factory=dict)
    task_types: dict[str, str] = field(default_factory=dict)


def load_roles(path: Path) -> Roles:
    """The roles at `path` (no file: no roles); ConfigError names the file and what to fix."""
    where = f"GATEWAY_ROLES_FILE={path}"
    try:
        data = tomllib.loads(path.read_bytes().decode())
    except FileNotFoundError:
        log.info("no roles file at %s: `model` names a model only (see envs/roles.toml)", path)
        return Roles()
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it ({e.strerror}); fix the path or permissions") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    if unknown := sorted(set(data) - {"roles", "task_types"}):
        raise ConfigError(f"{where}: unknown table [{unknown[0]}]; the file has [roles] and [task_types]")
    roles = _table(data, "roles", where)
    task_types = _table(data, "task_types", where)
    listed = {m for models in roles.values() if isinstance(models, list) for m in models}
    for role, models in roles.items():
        if role == AUTO or not discovery.MODEL_NAME.match(role) or role in listed:
            raise ConfigError(f"{where}: {role!r} cannot be a role name (letters, digits, '.', '_', '-'; not "
                              f"{AUTO!r}, not the name of a model)")
        if (not isinstance(models, list) or not models
                or not all(isinstance(m, str) and discovery.MODEL_NAME.match(m) for m in models)):
            raise ConfigError(f"{where}: role {role} must be a non-empty list of model names, like "
                              f"{role} = [\"smollm2-135m\", \"gemma3-270m\"]")
    for task, role in task_types.items():
        if not isinstance(role, str) or role not in roles:
            raise ConfigError(f"{where}: task type {task} maps to {role!r}, which is not a role in [roles] "
                              f"({', '.join(roles) or 'none'})")
    return Roles({r: list(dict.fromkeys(ms)) for r, ms in roles.items()}, dict(task_types))


def _table(data: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: {name} must be a table: [{name}]")
    return table


def needs(body: dict[str, Any]) -> set[str]:
    """The capabilities (workers/modelinfo.py `capabilities`) a request body asks for beyond its kind's."""
    wanted: set[str] = set()
    if body.get("messages") is not None:
        wanted.add("chat")
    fmt = body.get("response_format")
    if body.get("grammar") or (isinstance(fmt, dict) and fmt.get("type") not in (None, "text")):
        wanted.add("grammar-constrained")
    if body.get("tools") or body.get("functions"):
        wanted.add("tool-calling")
    if body.get("reasoning_effort") is not None:
        wanted.add("reasoning")
    return wanted


@dataclass
class Circuit:
    """One model's breaker: closed (counting failures in a row), open until `open_until`, half-open after it."""

    failures: int = 0
    open_until: float | None = None
    trial_until: float | None = None  # half-open: a trial request is out until then (or until it is recorded)


class Breakers:
    """A circuit breaker per model, on a monotonic clock (injectable for tests)."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self._circuits: dict[str, Circuit] = {}

    def state(self, model: str) -> BreakerState:
        c = self._circuits.get(model)
        if c is None or c.open_until is None:
            return "closed"
        return "open" if self.clock() < c.open_until else "half_open"

    def allow(self, model: str) -> bool:
        """Closed: yes. Open: no. Half-open: yes to one trial at a time (a trial never recorded, such as one the
        client abandoned, frees the way after another cool-down)."""
        state = self.state(model)
        if state != "half_open":
            return state == "closed"
        c, now = self._circuits[model], self.clock()
        if c.trial_until is not None and now < c.trial_until:
            return False
        c.trial_until = now + self.cooldown_s
        return True

    def record(self, model: str, ok: bool) -> None:
        if ok:
            self._circuits.pop(model, None)
            return
        state = self.state(model)
        c = self._circuits.get(model)
        if c is None:
            if len(self._circuits) >= MAX_BREAKERS:
                del self._circuits[next(iter(self._circuits))]
            c = self._circuits[model] = Circuit()
        if state == "open":
            return  # a request sent before it opened
        c.failures += 1
        if state == "half_open" or c.failures >= self.failures:
            c.open_until, c.trial_until = self.clock() + self.cooldown_s, None
            log.warning("%s failed %d times in a row: routed around for %g s", model, c.failures, self.cooldown_s)


class Router:
    """The routes' policy object: `candidates` per request, `allow`/`record` around each attempt, `roles_of` and
    `breaker_state` for /v1/models."""

    def __init__(self, registry: Registry, settings: GatewaySettings, roles: Roles | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry, self.settings = registry, settings
        self.roles = roles if roles is not None else load_roles(settings.gateway_roles_file)
        self.breakers = Breakers(settings.gateway_breaker_failures, settings.gateway_breaker_cooldown_s, clock)
        self._turns: dict[str, int] = {}

    def candidates(self, kind: p.Kind, body: dict[str, Any]) -> list[str]:
        """The models to try for this body, in order (at least one); BadRequest when `model` names nothing, the
        task type or the strategy is unknown, or a role has no model of this kind."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise p.BadRequest("invalid_model", "model is required: a model's name, as GET /v1/models lists them")
        if not discovery.MODEL_NAME.match(model) or len(model) > 200:
            raise p.BadRequest("invalid_model", f"model {model[:80]!r} is not a model name (letters, digits, '.', "
                               "'_', '-'); GET /v1/models lists them")
        strategy = self._strategy(body)
        role = self._role_of(model, body)
        if role is None:
            known = self._kind(model)
            if known is not None and known != kind:  # nobody would answer the subject: say why at once
                raise p.BadRequest("wrong_model_kind", f"{model} is an {known} model; use "
                                   f"{p.KINDS[known].http_route}", status=404)
            return [model]
        models = self._of_kind(kind, role)
        if strategy == "round_robin":
            turn = self._turns[role] = self._turns.get(role, -1) + 1
            models = models[turn % len(models):] + models[:turn % len(models)]
            return sorted(models, key=lambda m: not self._online(m))
        if strategy == "capability_match":
            wanted = needs(body)
            return sorted(models, key=lambda m: (not self._online(m), len(wanted - self._capabilities(m)),
                                                 self._load(m)))
        return sorted(models, key=lambda m: (not self._online(m), self._load(m)))

    def allow(self, model: str) -> bool:
        """False while the model's breaker is open (route around it), and in half-open for all but one trial."""
        return self.breakers.allow(model)

    def record(self, model: str, ok: bool) -> None:
        """The outcome of one request to `model`: a failure (5xx, timeout) or a success."""
        self.breakers.record(model, ok)

    def breaker_state(self, model: str) -> BreakerState:
        return self.breakers.state(model)

    def roles_of(self, model: str) -> list[str]:
        """The roles that list `model` (for /v1/models)."""
        return [role for role, models in self.roles.roles.items() if model in models]

    # --- inside ---------------------------------------------------------------------------------

    def _strategy(self, body: dict[str, Any]) -> str:
        given = body.get("routing", body.get("routing_strategy"))
        if given is None:
            return self.settings.gateway_routing
        if given not in STRATEGIES:
            raise p.BadRequest("invalid_routing", f"routing {str(given)[:40]!r} is not one of "
                               f"{', '.join(STRATEGIES)}; leave it out for GATEWAY_ROUTING")
        return str(given)

    def _role_of(self, model: str, body: dict[str, Any]) -> str | None:
        """The role `model` names (`auto`: by task type), None for a model name."""
        if model != AUTO:
            return model if model in self.roles.roles else None
        task = body.get("task_type")
        if task is None:
            if DEFAULT_ROLE not in self.roles.roles:
                raise p.BadRequest("invalid_model", f"model auto needs a task_type ({self._known_tasks()}) or a "
                                   f"{DEFAULT_ROLE} role in GATEWAY_ROLES_FILE")
            return DEFAULT_ROLE
        if not isinstance(task, str) or task not in self.roles.task_types:
            raise p.BadRequest("invalid_task_type", f"task_type {str(task)[:40]!r} is unknown; use one of "
                               f"{self._known_tasks()} (GATEWAY_ROLES_FILE [task_types])")
        return self.roles.task_types[task]

    def _known_tasks(self) -> str:
        return ", ".join(sorted(self.roles.task_types)) or "none: the roles file has no [task_types]"

    def _of_kind(self, kind: p.Kind, role: str) -> list[str]:
        """The role's models, less those discovery knows to be of another kind."""
        listed = self.roles.roles[role]
        models = [m for m in listed if self._kind(m) in (None, kind)]
        if not models:
            raise p.BadRequest("wrong_model_kind", f"role {role} lists no {kind} model ({', '.join(listed)}); use "
                               f"another role or {p.KINDS[self._kind(listed[0]) or kind].http_route}", status=404)
        return models

    def _instances(self, model: str) -> list[Instance]:
        m = self.registry.models.get(model)
        return [self.registry.instances[w] for w in m.workers if w in self.registry.instances] if m else []

    def _online(self, model: str) -> bool:
        return any(i.status == "online" for i in self._instances(model))

    def _kind(self, model: str) -> p.Kind | None:
        insts = self._instances(model)
        return max(insts, key=lambda i: i.seen_at).health.kind if insts else None

    def _capabilities(self, model: str) -> set[str]:
        return {c for i in self._instances(model) for c in i.health.capabilities}

    def _load(self, model: str) -> tuple[float, int]:
        """The least loaded online instance's (expected wait, requests queued or running); a wait the worker
        cannot estimate (no slot free, nothing served lately: protocol.expected_wait) counts as the longest."""
        return min(((i.wait_s if i.wait_s is not None else math.inf, i.pending + i.active)
                    for i in self._instances(model) if i.status == "online"), default=(math.inf, 0))

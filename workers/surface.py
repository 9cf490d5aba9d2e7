"""What the worker's HTTP app sees of the worker: a small typed interface, not the process object.

The HTTP routes run requests on the runner, record them in the ledger, and ask for the status,
the grammars, the model card and cancels; they never reach into the worker's lifecycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from . import protocol as p
from .config import Settings
from .grammars import GrammarStore
from .metrics import Metrics
from .outcome import Ledger
from .runner import Runner
from .store import Store


class Gate:
    """Counts HTTP requests in progress; the routes refuse the ones past capacity."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.active = 0

    @property
    def full(self) -> bool:
        return self.active >= self.capacity


@dataclass(frozen=True)
class ModelCard:
    """What the worker says about its model (heartbeats, /v1/models): read from the GGUF once it has loaded."""

    capabilities: list[str] = field(default_factory=list)
    model_info: dict[str, Any] = field(default_factory=dict)


class Serving(Protocol):
    """The worker as the HTTP app uses it."""

    settings: Settings
    metrics: Metrics
    ledger: Ledger
    store: Store  # the worker's log: the app records its start-up notes as events
    gate: Gate
    started_at: float

    @property
    def status(self) -> p.WorkerStatus: ...

    @property
    def runner(self) -> Runner | None:
        """None until the model has loaded."""

    @property
    def grammars(self) -> GrammarStore | None:
        """None for kinds that take no grammars (and while the model loads)."""

    @property
    def card(self) -> ModelCard: ...

    async def cancel(self, req_id: str) -> str:
        """Cancel here and on every other instance of the model: "running", "queued" (removed from the queue),
        "not_found" or "pending" (Worker.cancel)."""

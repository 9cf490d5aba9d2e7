"""Orchestration modes over the fleet: several models answer one chat together (issue 16 item 4).

`orchestration_mode` in a chat body picks how; A is `models[0]`, B is `models[1]` (or A again when only one model
is given):

| mode       | steps                                                                  | reply             |
|------------|------------------------------------------------------------------------|-------------------|
| `single`   | A answers                                                              | A's answer        |
| `critique` | A drafts, B critiques the draft, A revises (critique + revise a round) | the last revision |
| `debate`   | A and B answer side by side, A reconciles the two answers              | A's reconciling   |
| `ensemble` | every model answers side by side, A synthesises the answers            | A's synthesis     |
| `pipeline` | `models[0]` drafts, `models[1 % n]` refines, `models[2 % n]` validates | see below         |

The pipeline's validator answers `PASS` when the refined answer stands, or a corrected answer; `PASS` (or nothing)
leaves the refined answer as the reply, so the reply is always an answer, never a verdict.

Every step is its own fleet request through `step` (routes.py): its own req_id in the worker's log, cancellable.
The first step sees the caller's conversation as sent; later steps see the conversation up to the last user message
(system messages and earlier turns kept) followed by one short instruction that quotes the question and the
earlier steps' answers, because the models answering may be as small as 135M parameters. The caller's sampling
params go to every step. A failed step fails the whole call, naming the step; side-by-side steps are cancelled
when one of them fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from workers import protocol as p

MODES = ("single", "critique", "debate", "ensemble", "pipeline")
MAX_MODELS = 8  # an ensemble fans out to all of them at once
MAX_ROUNDS = 3  # critique: each round is two more requests
PASS = "PASS"

Messages = list[dict[str, str]]


@dataclass
class StepResult:
    """One step as it ran: its own fleet request (req_id in the worker's log)."""

    name: str  # e.g. "draft", "critique", "revise"
    model: str
    req_id: str
    text: str
    latency_ms: float
    tokens_in: int
    tokens_out: int


# step(name, model, messages, params) -> the step's answer; raises p.BadRequest when the fleet refuses it
Step = Callable[[str, str, list[dict[str, str]], dict[str, Any]], Awaitable[StepResult]]


@dataclass
class Orchestrated:
    text: str
    final: StepResult  # the step whose text is the answer
    steps: list[StepResult] = field(default_factory=list)
    rounds: int = 1

    def block(self, mode: str) -> dict[str, Any]:
        """The response's `orchestration` block: `final` names the step whose text is the reply."""
        return {"mode": mode, "models": list(dict.fromkeys(s.model for s in self.steps)), "rounds": self.rounds,
                "final": self.final.name,
                "steps": [{"name": s.name, "model": s.model, "req_id": s.req_id, "latency_ms": round(s.latency_ms, 1),
                           "tokens_in": s.tokens_in, "tokens_out": s.tokens_out} for s in self.steps]}


async def run(mode: str, messages: Messages, params: dict[str, Any], models: list[str], step: Step,
              rounds: int = 1) -> Orchestrated:
    """Run `mode` over `models` (A = models[0], B = models[1] or A again; ensemble: all); `rounds` repeats the
    critique's critique and revise. Raises p.BadRequest: 400 for a bad mode, model list or rounds, and
    `orchestration_failed` with the failed step's status."""
    if mode not in MODES:
        raise p.BadRequest("invalid_orchestration_mode", f"orchestration_mode {mode!r} is not one of "
                           f"{', '.join(MODES)}; pick one of them")
    if not models:
        raise p.BadRequest("invalid_model", "orchestration needs at least one model: send model or a models list")
    if len(models) > MAX_MODELS:
        raise p.BadRequest("invalid_model", f"orchestration takes at most {MAX_MODELS} models; send fewer in models")
    if not 1 <= rounds <= MAX_ROUNDS or (rounds != 1 and mode != "critique"):
        raise p.BadRequest("invalid_request", f"rounds is 1 to {MAX_ROUNDS} for critique and 1 for every other "
                           "mode")
    history, question = _split(messages)
    steps = Steps(step, params, history)
    a, b = models[0], models[1 % len(models)]
    if mode == "single":
        final = await steps.one("answer", a, messages)
    elif mode == "critique":
        final = await steps.one("draft", a, messages)
        for n in range(1, rounds + 1):
            suffix = "" if n == 1 else f"-{n}"
            review = await steps.ask(f"critique{suffix}", b, critique_prompt(question, final.text))
            final = await steps.ask(f"revise{suffix}", a, revise_prompt(question, final.text, review.text))
    elif mode == "debate":
        answers = await steps.together([("answer-a", a, messages), ("answer-b", b, messages)])
        final = await steps.ask("reconcile", a, combine_prompt(question, [s.text for s in answers]))
    elif mode == "ensemble":
        answers = await steps.together([(f"answer-{i}", m, messages) for i, m in enumerate(models, 1)])
        final = await steps.ask("synthesise", a, combine_prompt(question, [s.text for s in answers]))
    else:  # pipeline
        draft = await steps.one("draft", models[0], messages)
        final = await steps.ask("refine", models[1 % len(models)], refine_prompt(question, draft.text))
        verdict = await steps.ask("validate", models[2 % len(models)], validate_prompt(question, final.text))
        if not _passes(verdict.text):
            final = verdict
    return Orchestrated(final.text, final, steps.done, rounds)


class Steps:
    """The steps of one orchestrated call, in the order they started; a failure is named after its step."""

    def __init__(self, step: Step, params: dict[str, Any], history: Messages) -> None:
        self.step, self.params, self.history = step, params, history
        self.done: list[StepResult] = []

    async def one(self, name: str, model: str, messages: Messages) -> StepResult:
        result = await self._run(name, model, messages)
        self.done.append(result)
        return result

    async def ask(self, name: str, model: str, instruction: str) -> StepResult:
        """A step that sees the conversation before the question, then `instruction` as the user's turn."""
        return await self.one(name, model, [*self.history, {"role": "user", "content": instruction}])

    async def together(self, asks: list[tuple[str, str, Messages]]) -> list[StepResult]:
        """Steps (name, model, messages) side by side; the first to fail cancels the others and is raised as it
        is. The results keep the order of `asks`."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._run(*ask)) for ask in asks]
        except* p.BadRequest as failed:
            raise failed.exceptions[0] from None
        results = [t.result() for t in tasks]
        self.done.extend(results)
        return results

    async def _run(self, name: str, model: str, messages: Messages) -> StepResult:
        try:
            return await self.step(name, model, messages, dict(self.params))
        except p.BadRequest as e:
            raise p.BadRequest("orchestration_failed", f"the {name} step ({model}) failed: {e.message}",
                               status=e.status) from None


def _split(messages: Messages) -> tuple[Messages, str]:
    """(the conversation before the last user message, that message's text: the question)."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last is None:
        raise p.BadRequest("invalid_request", "orchestration needs a question: end messages with a user message")
    return messages[:last], messages[last].get("content", "")


def _passes(verdict: str) -> bool:
    """The validator let the answer stand: it said PASS first, or said nothing."""
    return not verdict.strip() or verdict.strip().lstrip("*#\"'` ").upper().startswith(PASS)


def critique_prompt(question: str, answer: str) -> str:
    return (f"Question: {question}\n\nAnswer: {answer}\n\n"
            "List the mistakes or missing points in this answer, briefly.")


def revise_prompt(question: str, answer: str, critique: str) -> str:
    return (f"Question: {question}\n\nYour answer: {answer}\n\nReview: {critique}\n\n"
            "Write a better answer using the review. Reply with the answer only.")


def combine_prompt(question: str, answers: list[str]) -> str:
    quoted = "\n\n".join(f"Answer {i}: {text}" for i, text in enumerate(answers, 1))
    return (f"Question: {question}\n\n{quoted}\n\n"
            "Combine these into one correct answer. Reply with the answer only.")


def refine_prompt(question: str, draft: str) -> str:
    return (f"Question: {question}\n\nDraft answer: {draft}\n\n"
            "Improve the draft: fix errors, make it clear and complete. Reply with the improved answer only.")


def validate_prompt(question: str, answer: str) -> str:
    return (f"Question: {question}\n\nAnswer: {answer}\n\n"
            f"If this answer is correct and complete, reply {PASS}. Otherwise reply with the corrected answer only.")

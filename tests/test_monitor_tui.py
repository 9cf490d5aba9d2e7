"""The terminal view: rows in a recording Rich console, and `python -m monitor tui --once`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from rich.console import Console

from monitor import tui
from monitor.config import load_settings
from monitor.registry import Registry, decode_health
from workers.config import ROOT
from workers.ops import broker

from .monitor_support import heartbeat_body


@pytest.mark.model
async def test_tui_table_shows_a_row_per_model(start_worker, nats_server):
    await start_worker(WORKER_CONCURRENCY=1, QUEUE_MAX_PER_MODEL=50)
    await start_worker(MODEL_NAME="gemma3-embed-v1.5", MODEL_KIND="embedding")
    settings = load_settings(nats_url=nats_server.url)
    registry = await tui.snapshot(settings)
    console = Console(record=True, width=200, color_system=None)
    console.print(tui.screen(registry, settings, sort="m", reverse=False))
    text = console.export_text()
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("gemma3")}
    assert set(rows) == {"gemma3-270m", "gemma3-embed-v1.5"}, text
    assert "inference" in rows["gemma3-270m"] and "online" in rows["gemma3-270m"] and "0/50" in rows["gemma3-270m"]
    assert "embedding" in rows["gemma3-embed-v1.5"] and "1/1" in rows["gemma3-embed-v1.5"]
    assert "2 models · 2/2 instances live" in text and "q quit" in text


@pytest.mark.model
async def test_status_once_prints_the_table_and_exits_0(start_worker, nats_server):
    await start_worker(WORKER_CONCURRENCY=1)
    env = {**os.environ, "NATS_URL": nats_server.url}
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "monitor", "tui", "--once"], env=env,
                                  cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "model" in out.stdout and "gemma3-270m" in out.stdout and "online" in out.stdout


def test_status_once_without_nats_fails_in_one_line():
    env = {**os.environ, "NATS_URL": f"nats://127.0.0.1:{broker.free_port()}", "NATS_CONNECT_TIMEOUT": "1"}
    out = subprocess.run([sys.executable, "-m", "monitor", "tui", "--once"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().startswith("error: no NATS server answered") and "\n" not in out.stderr.strip()


def test_slots_column_shows_busy_slots_and_kv_use_or_a_dash():
    registry = Registry(load_settings())
    usage = {"batched": {"slots": 8, "busy": 2, "waiting": 0, "kv_tokens": 4000, "kv_reserved": 1200,
                         "kv_kept": 280},
             "contexts": {"slots": 2, "busy": 2, "waiting": 3}, "older": None}
    for model, slots in usage.items():
        body = heartbeat_body(model, f"{model}-w")
        if slots:
            body["queue_metrics"]["slots"] = slots
        registry.observe_health(decode_health(json.dumps(body).encode()))
    console = Console(record=True, width=200, color_system=None)
    console.print(tui.table(registry.services()))
    text = console.export_text()
    rows = {line.split()[0]: line for line in text.splitlines() if line.split() and line.split()[0] in usage}
    assert "slots" in text.splitlines()[0]
    assert "2/8 · KV 37%" in rows["batched"], text
    assert "2/2 +3 waiting" in rows["contexts"] and "KV" not in rows["contexts"], text
    words = rows["older"].split()
    assert words[words.index("healthy") + 1] == "–", text  # the slots column, before req/s

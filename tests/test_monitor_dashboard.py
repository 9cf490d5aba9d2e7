"""The dashboard in headless Chromium: live cards, a moving queue bar, and wire strings shown as text."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from .conftest import send_many
from .monitor_support import (
    heartbeat_body,
    page_fixture,  # noqa: F401 - the page fixture
    start_monitor_fixture,  # noqa: F401 - the start_monitor fixture
)

pytestmark = pytest.mark.browser  # headless Chromium

CARD = 'section.card[data-model="gemma3-270m"]'


@pytest.mark.model
async def test_dashboard_shows_the_worker_and_its_queue_bar_moves(start_worker, start_monitor, nc, page,
                                                                   tmp_path: Path):
    await start_worker(WORKER_CONCURRENCY=1, QUEUE_MAX_PER_MODEL=16)
    m = await start_monitor()
    await page.goto(m.url + "/")
    card = page.locator(CARD)
    await card.wait_for(timeout=5000)
    assert await card.locator(".pill").inner_text() == "online"
    text = await card.inner_text()
    assert "gemma3" in text and "Q4_K_M" in text and "inference.request.gemma3-270m" in text
    assert await card.locator(".cap.on").filter(has_text="text-generation").count() == 1
    assert await page.locator("#conn").inner_text() == "live"
    await page.screenshot(path=str(tmp_path / "dashboard-idle.png"), full_page=True)

    bar = card.locator(".queue .bar")
    assert await bar.get_attribute("data-pending") == "0"
    subs = await send_many(nc, 10, 16, "dash")
    await page.wait_for_function(
        f"document.querySelector('{CARD} .queue .bar').dataset.pending >= 5", timeout=8000)
    busy = int(await bar.get_attribute("data-pending"))
    # the fill animates its width (CSS transition), so wait for it rather than reading it at once
    await page.wait_for_function(
        f"document.querySelector('{CARD} .queue .fill').getBoundingClientRect().width > 0", timeout=5000)
    assert busy >= 5
    assert f"{busy} / 16" in await card.locator(".queue-count").inner_text()
    await page.screenshot(path=str(tmp_path / "dashboard-busy.png"), full_page=True)
    for s in subs:
        await s.next_msg(timeout=120)
    await page.wait_for_function(
        f"document.querySelector('{CARD} .queue .bar').dataset.pending === '0'", timeout=8000)
    assert (tmp_path / "dashboard-busy.png").stat().st_size > 10_000
    assert page.errors == []


async def test_forged_heartbeat_with_html_renders_as_text(start_monitor, nc, page, tmp_path: Path):
    evil = "<script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\">"
    body = {
        "model_name": evil, "worker_id": "<b onmouseover=alert(1)>w</b>", "kind": "inference", "status": "online",
        "capabilities": ["<i>tool-calling</i>"], "endpoint": "<a href='javascript:alert(1)'>x</a>",
        "nats_topic": "inference.request.</code><script>window.__xss=3</script>", "version": "0",
        "model_info": {"architecture": "<svg onload=alert(1)>", "quantization": "<u>Q</u>"},
        "queue_metrics": {"pending_messages": 1, "active_processing": 0, "queue_capacity": 4, "total_processed": 0,
                          "total_failed": 0, "last_processed_at": None},
        "backpressure_status": {"level": "healthy", "utilization": 0.25},
        "started_at": time.time(), "uptime_s": 1.0, "heartbeat_interval_s": 30.0, "seq": 1,
    }
    m = await start_monitor()
    await page.goto(m.url + "/")
    await page.wait_for_function("document.getElementById('conn').textContent === 'live'", timeout=5000)
    await nc.publish("models.forged.heartbeat", json.dumps(body).encode())
    card = page.locator("section.card").first
    await card.wait_for(timeout=5000)
    await asyncio.sleep(0.3)
    text = await card.inner_text()
    assert evil in text and "<svg onload=alert(1)>" in text and "<i>tool-calling</i>" in text
    assert "<b onmouseover=alert(1)>w</b>" in text
    injected = await page.evaluate(
        "document.querySelectorAll('#grid script, #grid img, #grid svg[onload], #grid i, #grid u, #grid a,"
        " [onerror], [onmouseover]').length")
    assert injected == 0
    assert await page.evaluate("window.__xss") is None
    await page.screenshot(path=str(tmp_path / "dashboard-forged.png"), full_page=True)


@pytest.mark.model
async def test_each_instance_shows_its_slots_and_kv_cache_and_an_older_worker_a_dash(start_worker, start_monitor, nc,
                                                                                    page, tmp_path: Path):
    await start_worker(ENGINE="batched", WORKER_CONCURRENCY=2, QUEUE_MAX_PER_MODEL=16)
    m = await start_monitor()
    await page.goto(m.url + "/")
    slots = page.locator(f"{CARD} .inst .slots")
    await slots.wait_for(timeout=5000)
    assert await slots.get_attribute("data-slots") == "2"
    assert await slots.inner_text() == "0/2 slots · KV 0%"
    title = await slots.get_attribute("title") or ""
    assert "0 of 2 slots busy" in title and "tokens reserved" in title and "kept of" in title, title

    subs = await send_many(nc, 4, 32, "slots")  # two run, two wait for a slot
    # read in one go: the card is redrawn on every push, and a request may finish between two separate reads
    seen = await (await page.wait_for_function(f"""() => {{
        const el = document.querySelector('{CARD} .inst .slots');
        if (!el || !(el.dataset.busy >= 1)) return null;
        const bar = el.querySelector('.kv-reserved');
        return {{ text: el.innerText, kv: el.dataset.kv, width: bar ? bar.getBoundingClientRect().width : -1 }};
    }}""", timeout=8000)).json_value()
    text, kv = seen["text"], float(seen["kv"] or "nan")
    assert text.startswith(("1/2 slots", "2/2 slots")) and 0 < kv <= 1 and f"KV {round(kv * 100)}%" in text, text
    assert seen["width"] > 0, seen
    await page.screenshot(path=str(tmp_path / "dashboard-slots.png"), full_page=True)
    for s in subs:
        await s.next_msg(timeout=120)

    await nc.publish("models.older.heartbeat", json.dumps(heartbeat_body("older", "older-w")).encode())
    old = page.locator('section.card[data-model="older"] .inst .slots')
    await old.wait_for(timeout=5000)
    assert await old.inner_text() == "slots –" and await old.get_attribute("data-slots") is None
    await page.screenshot(path=str(tmp_path / "dashboard-slots-older.png"), full_page=True)
    assert "null" not in await page.locator("main").inner_text()  # a card without alerts once showed "null"
    assert page.errors == []

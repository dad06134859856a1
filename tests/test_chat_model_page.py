"""A chat model's page in real Chromium (issue 12): it opens in Chat mode and holds a three-turn
conversation, sending the whole history each turn to a real model server running a real (tiny) network."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from chat_fixtures import LiveServer, add_model, cached_tiny_checkpoint, make_chat_app  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.process]  # real Chromium and a real model server
os.environ.setdefault("OMP_NUM_THREADS", "1")

TURNS = ["Hello there!", "Tell me about Mia.", "What did she find?"]


@pytest.fixture
def site(tmp_path):
    from nanochat_studio import accounts

    app = make_chat_app(tmp_path / "home", mode="solo")
    server = LiveServer(app)
    owner = accounts.solo_owner()
    ckpt = cached_tiny_checkpoint(tmp_path / "tiny")
    chat_model = add_model(owner, ckpt, name="tiny chat", kind="chat")
    base_model = add_model(owner, ckpt, name="tiny base")
    yield {"url": server.url, "chat": chat_model, "base": base_model}
    server.close()
    app.extensions["model_pool"].close()


def test_a_chat_model_opens_in_chat_mode_and_holds_a_three_turn_conversation(site, browser):
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/api/chat") else None)
    try:
        page.goto(f"{site['url']}/chat/{site['chat'].id}")
        assert page.is_checked('input[name="mode"][value="chat"]')
        banner = page.text_content("#mode-banner")
        assert banner.startswith("Chat mode") and "not chat-tuned" not in banner
        page.fill("#max_tokens", "12")
        for n, text in enumerate(TURNS, start=1):
            page.fill("#prompt", text)
            page.click("#send")
            page.wait_for_function(f"() => document.querySelectorAll('.msg-assistant .msg-stats:not(:empty)').length === {n}",
                                   timeout=60_000)
        # the page shows the three turns, in order
        assert page.locator(".msg-user .msg-body").all_text_contents() == TURNS
        assert page.locator(".msg-assistant").count() == 3
        answers = page.locator(".msg-assistant .msg-body").all_text_contents()
        # each turn sent the whole conversation so far, the model's own answers included
        assert [len(body["messages"]) for body in sent] == [1, 3, 5]
        assert all(body["mode"] == "chat" for body in sent)
        assert sent[2]["messages"] == [
            {"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": answers[0]},
            {"role": "user", "content": TURNS[1]}, {"role": "assistant", "content": answers[1]},
            {"role": "user", "content": TURNS[2]}]
        # the conversation is saved: a reload brings all six messages back, still in Chat mode
        page.wait_for_function("() => location.search.includes('session=')")
        page.reload()
        page.wait_for_selector(".msg-assistant")
        assert page.locator(".msg").count() == 6 and page.is_checked('input[name="mode"][value="chat"]')
        # the same weights published as a base model open in complete-text mode
        page.goto(f"{site['url']}/chat/{site['base'].id}")
        assert page.is_checked('input[name="mode"][value="complete"]')
        assert errors == []
    finally:
        context.close()

"""The chat page in real Chromium (Playwright) against a live server and real model-server processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from chat_fixtures import LiveServer, add_model, make_chat_app, scripted_checkpoint  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.process]  # real Chromium and real model servers
os.environ.setdefault("OMP_NUM_THREADS", "1")
HOSTILE = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script> & done'


@pytest.fixture
def site(tmp_path):
    from nanochat_studio import accounts

    app = make_chat_app(tmp_path / "home", mode="solo")  # loopback is the owner: no sign-in
    server = LiveServer(app)
    owner = accounts.solo_owner()
    hostile = add_model(owner, scripted_checkpoint(tmp_path / "hostile", HOSTILE, delay_s=0.002), name="hostile")
    slow = add_model(owner, scripted_checkpoint(tmp_path / "slow", "tick " * 400, delay_s=0.01), name="slow")
    yield {"url": server.url, "hostile": hostile, "slow": slow, "app": app}
    server.close()
    app.extensions["model_pool"].close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    pg = context.new_page()
    pg.csp_errors = []
    pg.on("console", lambda m: pg.csp_errors.append(m.text) if "Content Security Policy" in m.text else None)
    yield pg
    context.close()


def send(page, text):
    page.fill("#prompt", text)
    page.click("#send")


def test_model_output_is_shown_as_text_never_as_html(site, page):
    page.goto(f"{site['url']}/chat/{site['hostile'].id}")
    send(page, "<b>bold?</b>")
    page.wait_for_selector(".msg-assistant .msg-stats:not(:empty)", timeout=30_000)
    assert page.text_content(".msg-assistant .msg-body") == HOSTILE
    assert page.text_content(".msg-user .msg-body") == "<b>bold?</b>"
    assert page.locator("#messages img, #messages script, #messages b").count() == 0
    assert page.evaluate("window.__xss") is None
    page.reload()  # and again when the saved conversation is rendered from the server
    page.wait_for_selector(".msg-assistant")
    assert page.text_content(".msg-assistant .msg-body") == HOSTILE
    assert page.locator("#messages img, #messages script").count() == 0
    assert page.evaluate("window.__xss") is None
    assert page.csp_errors == []


def test_tokens_stream_and_stop_regenerate_edit_and_sessions_work(site, page):
    page.goto(f"{site['url']}/chat/{site['slow'].id}")
    # a model trained on raw text: the page says it is in complete-text mode
    assert "Complete-text mode" in page.text_content("#mode-banner")
    page.check('input[name="mode"][value="chat"]')
    assert "Chat mode" in page.text_content("#mode-banner")
    send(page, "Hello there")
    page.wait_for_function("() => document.querySelector('.msg-assistant .msg-body')?.textContent.length > 20")
    partial = page.text_content(".msg-assistant .msg-body")
    assert 20 < len(partial) < len("tick " * 400)  # tokens appear while it is still generating
    page.click("#stop")
    page.wait_for_selector(".msg-assistant .msg-stats:not(:empty)")
    assert "stopped" in page.text_content(".msg-assistant .msg-stats")
    assert page.locator("#session-list li").count() == 1
    # regenerate: a fresh, complete answer with its figures under it
    page.fill("#max_tokens", "30")
    page.click("#regenerate")
    page.wait_for_function("() => document.querySelector('.msg-assistant .msg-stats')?.textContent.includes('hit max tokens')",
                           timeout=30_000)
    stats = page.text_content(".msg-assistant .msg-stats")
    assert "first token" in stats and "tokens/s" in stats and "30 tokens" in stats
    assert page.text_content(".msg-assistant .msg-body") == ("tick " * 400)[:30]
    # edit the first message and continue from it
    page.click(".msg-user .link-btn:has-text('Edit')")
    page.fill(".edit-area", "Edited question")
    page.click("text=Save and continue")
    page.wait_for_function("() => document.querySelector('.msg-assistant .msg-stats')?.textContent.includes('tokens')",
                           timeout=30_000)
    assert page.locator(".msg").count() == 2 and page.text_content(".msg-user .msg-body") == "Edited question"
    # the conversation is saved and listed; reloading brings it back
    assert "session=" in page.url
    page.reload()
    page.wait_for_selector(".msg-assistant")
    assert page.text_content(".msg-user .msg-body") == "Edited question"
    assert page.locator("#session-list li").count() == 1
    # copy a message
    page.click(".msg-assistant .link-btn:has-text('Copy')")
    assert page.evaluate("navigator.clipboard.readText()") == ("tick " * 400)[:30]
    # a new chat starts empty
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and "session=" not in page.url
    assert page.csp_errors == []


def test_the_compare_page_sends_the_same_prompt_to_both(site, page):
    page.goto(f"{site['url']}/chat/compare?a={site['hostile'].id}&b={site['slow'].id}")
    page.fill("#compare-prompt", "Once")
    page.fill("#compare-max", "10")
    page.click("#compare-form button[type=submit]")
    page.wait_for_function("() => document.getElementById('stats-a').textContent && document.getElementById('stats-b').textContent",
                           timeout=30_000)
    assert page.text_content("#out-a") == HOSTILE[:10]
    assert page.text_content("#out-b") == ("tick " * 2)
    assert page.locator("#out-a img").count() == 0 and page.evaluate("window.__xss") is None
    assert "first token" in page.text_content("#stats-b")
    assert page.csp_errors == []


def test_complete_text_mode_continues_the_text(site, page, tmp_path):
    from nanochat_studio import accounts

    echo = add_model(accounts.solo_owner(), scripted_checkpoint(tmp_path / "echo", "[{prompt}]"), name="echo")
    page.goto(f"{site['url']}/chat/{echo.id}")
    assert page.is_checked('input[name="mode"][value="complete"]')
    assert "continues the text" in page.text_content("#mode-banner")
    send(page, "Once")
    page.wait_for_selector(".msg-assistant .msg-stats:not(:empty)")
    assert page.text_content(".msg-user .msg-role") == "Prompt"
    assert page.text_content(".msg-assistant .msg-body") == "[Once]"
    page.click("#continue")  # the prompt becomes the text so far, and the model goes on from there
    page.wait_for_function("() => document.querySelector('.msg-assistant .msg-body')?.textContent.length > 6"
                           " && document.querySelector('.msg-assistant .msg-stats')?.textContent")
    assert page.text_content(".msg-user .msg-body") == "Once[Once]"
    assert page.text_content(".msg-assistant .msg-body") == "[Once[Once]]"
    assert page.csp_errors == []

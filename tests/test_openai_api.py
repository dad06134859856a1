"""/v1 driven by the real ``openai`` package against a live waitress server on loopback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import openai
import pytest
import requests

sys.path.insert(0, str(Path(__file__).parent))
from chat_fixtures import (  # noqa: E402
    LiveServer, add_model, add_user, cached_tiny_checkpoint, make_chat_app, scripted_checkpoint,
)

os.environ.setdefault("OMP_NUM_THREADS", "1")
HI = [{"role": "user", "content": "Once upon a time"}]
TEXT = "Hello there. General Kenobi! 你好"


def _world(tmp_path, mode):
    from nanochat_studio import auth

    app = make_chat_app(tmp_path / "home", mode=mode)
    server = LiveServer(app)
    alice, bob = add_user("alice@example.com"), add_user("bob@example.com")
    _, alice_key = auth.create_api_key(alice, "test")
    _, bob_key = auth.create_api_key(bob, "test")
    tiny = add_model(alice, cached_tiny_checkpoint(tmp_path / "tiny")) if mode == "hosted" else None
    words = add_model(alice, scripted_checkpoint(tmp_path / "words", TEXT), name="words")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=alice_key, max_retries=0, timeout=60)
    return {"url": server.url, "client": client, "tiny": tiny, "words": words, "bob_key": bob_key, "app": app,
           "alice_key": alice_key, "mode": mode, "server": server}


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    """One live server for the module (model servers stay warm between tests, as in use)."""
    world = _world(tmp_path_factory.mktemp("v1"), "hosted")
    yield world
    world["server"].close()
    world["app"].extensions["model_pool"].close()


def test_models_are_listed_for_their_owner_only(v1):
    ids = [m.id for m in v1["client"].models.list()]
    assert set(ids) >= {str(v1["words"].id), str(v1["tiny"].id)}
    bob = openai.OpenAI(base_url=f"{v1['url']}/v1", api_key=v1["bob_key"], max_retries=0)
    assert list(bob.models.list()) == []


@pytest.mark.process
def test_non_streaming_completion_with_usage(v1):
    r = v1["client"].chat.completions.create(model=str(v1["tiny"].id), messages=HI, max_tokens=7, temperature=0,
                                             seed=3)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7 and r.choices[0].message.content


def test_streaming_with_include_usage(v1):
    chunks = list(v1["client"].chat.completions.create(
        model=str(v1["words"].id), messages=HI, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TEXT
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(TEXT)
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_without_usage_has_none(v1):
    chunks = list(v1["client"].chat.completions.create(model=str(v1["words"].id), messages=HI, stream=True,
                                                       max_completion_tokens=5))
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == TEXT[:5]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_sequences_cut_the_answer(v1):
    r = v1["client"].chat.completions.create(model=str(v1["words"].id), messages=HI, stop=["!", "zzz"])
    assert r.choices[0].message.content == "Hello there. General Kenobi" and r.choices[0].finish_reason == "stop"
    chunks = v1["client"].chat.completions.create(model=str(v1["words"].id), messages=HI, stop=". G", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello there"


def test_seed_and_temperature_and_top_p_reach_the_model(v1):
    def ask(**kw):
        return v1["client"].chat.completions.create(model=str(v1["tiny"].id), messages=HI, max_tokens=12,
                                                    **kw).choices[0].message.content

    assert ask(seed=7, temperature=1.0, top_p=0.9) == ask(seed=7, temperature=1.0, top_p=0.9)
    assert ask(temperature=0) == ask(temperature=0)


def test_n_other_than_1_is_a_clear_400(v1):
    with pytest.raises(openai.BadRequestError) as e:
        v1["client"].chat.completions.create(model=str(v1["words"].id), messages=HI, n=2)
    assert "Only n=1" in e.value.message and e.value.body["param"] == "n"
    assert e.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("kw, param", [
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": []}, "messages"),
])
def test_bad_values_are_400_in_openais_error_shape(v1, kw, param):
    args = {"model": str(v1["words"].id), "messages": HI, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        v1["client"].chat.completions.create(**args)
    assert e.value.body["param"] == param


def test_an_unknown_or_foreign_model_is_404(v1):
    with pytest.raises(openai.NotFoundError) as e:
        v1["client"].chat.completions.create(model="99999", messages=HI)
    assert e.value.code == "model_not_found"
    bob = openai.OpenAI(base_url=f"{v1['url']}/v1", api_key=v1["bob_key"], max_retries=0)
    with pytest.raises(openai.NotFoundError):
        bob.chat.completions.create(model=str(v1["words"].id), messages=HI)
    with pytest.raises(openai.NotFoundError):
        bob.models.retrieve(str(v1["words"].id))


@pytest.mark.process
def test_a_model_error_mid_stream_reaches_the_client_as_an_error(v1, tmp_path):
    (tmp_path / "broken").mkdir()
    from nanochat_studio.models import User

    broken = add_model(User.get(User.email == "alice@example.com"), tmp_path / "broken", name="broken")
    with pytest.raises(openai.APIError) as e:
        list(v1["client"].chat.completions.create(model=str(broken.id), messages=HI, stream=True))
    assert "could not be loaded" in str(e.value.message)
    with pytest.raises(openai.APIStatusError) as e:  # not streaming: an HTTP error status
        v1["client"].chat.completions.create(model=str(broken.id), messages=HI)
    assert e.value.status_code == 503 and "could not be loaded" in e.value.message


@pytest.mark.parametrize("mode", ["solo", "lab", "hosted"])
def test_an_api_key_is_required_in_every_mode_even_from_loopback(mode, tmp_path):
    # last in the module: a new app re-points the database, so the shared world above is done with
    w = _world(tmp_path, mode)
    try:
        bad = openai.OpenAI(base_url=f"{w['url']}/v1", api_key="ncs_not-a-real-key", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models/1")):
            # from loopback, where solo mode needs no sign-in for pages, and with no key at all
            r = requests.request(method, f"{w['url']}{path}", json={"model": str(w["words"].id), "messages": HI})
            assert r.status_code == 401, (mode, path)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert r.json()["error"]["type"] == "authentication_error"
        assert str(w["words"].id) in [m.id for m in w["client"].models.list()]  # and the key itself works
    finally:
        w["server"].close()
        w["app"].extensions["model_pool"].close()

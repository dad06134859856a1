"""POST /v1/completions and chat log-probabilities, driven by the real ``openai`` package (and plain
requests for what it would refuse to send) against a live waitress server on loopback. Log-probabilities
are checked against the model's own forward pass."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import openai
import pytest
import requests

sys.path.insert(0, str(Path(__file__).parent))
from chat_fixtures import (  # noqa: E402
    LiveServer, add_model, add_user, cached_tiny_checkpoint, make_chat_app, scripted_checkpoint, sse_events,
)

os.environ.setdefault("OMP_NUM_THREADS", "1")
TEXT = "Hello there. General Kenobi! 你好"
PROMPT = "Once upon a time, a little fox"


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    from nanochat_studio import auth

    tmp = tmp_path_factory.mktemp("v1c")
    app = make_chat_app(tmp / "home", mode="hosted")
    server = LiveServer(app)
    alice = add_user("alice@example.com")
    _, key = auth.create_api_key(alice, "test")
    tiny_dir = cached_tiny_checkpoint(tmp / "tiny")
    tiny = add_model(alice, tiny_dir)
    words = add_model(alice, scripted_checkpoint(tmp / "words", TEXT), name="words")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)
    yield {"url": server.url, "client": client, "tiny": str(tiny.id), "words": str(words.id), "key": key,
           "ckpt": tiny_dir}
    server.close()
    app.extensions["model_pool"].close()


@pytest.fixture(scope="module")
def model(v1):
    """The tiny model and tokenizer, loaded here as the model server loads them."""
    from trainer.checkpoint import load_model

    m, tok, _ = load_model(v1["ckpt"])
    return m, tok


def logprobs_of(m, ids: list[int]):
    import torch

    with torch.no_grad():
        return torch.log_softmax(m(torch.tensor([ids]))[0].float(), dim=-1)  # row i scores token i + 1


def post(v1, body: dict, path: str = "completions") -> requests.Response:
    return requests.post(f"{v1['url']}/v1/{path}", json=body, headers={"Authorization": f"Bearer {v1['key']}"},
                         timeout=60)


# --- shapes, with the scripted model (no torch) ------------------------------------------------------


def test_a_string_prompt_completes_with_usage(v1):
    r = v1["client"].completions.create(model=v1["words"], prompt="Say it", max_tokens=5)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == TEXT[:5] and r.choices[0].finish_reason == "length"
    assert r.choices[0].index == 0 and r.choices[0].logprobs is None
    assert r.usage.completion_tokens == 5 and r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_the_default_max_tokens_is_openais_sixteen(v1):
    r = v1["client"].completions.create(model=v1["words"], prompt="Say it")
    assert r.choices[0].text == TEXT[:16] and r.usage.completion_tokens == 16


def test_a_batch_of_prompts_gets_one_choice_each_in_order(v1):
    prompts = [f"prompt {i}" for i in range(11)]  # more than run_batch's window
    r = v1["client"].completions.create(model=v1["words"], prompt=prompts, max_tokens=3 + 0, stop=["!"])
    assert [c.index for c in r.choices] == list(range(11))
    assert all(c.text == TEXT[:3] for c in r.choices)
    assert r.usage.completion_tokens == 33


def test_streaming_sends_legacy_chunks_then_usage(v1):
    chunks = list(v1["client"].completions.create(model=v1["words"], prompt="x", max_tokens=64, stream=True,
                                                  stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == TEXT
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(TEXT)


def test_streaming_a_batch_interleaves_choices_by_index(v1):
    chunks = list(v1["client"].completions.create(model=v1["words"], prompt=["a", "b", "c"], max_tokens=4,
                                                  stream=True))
    by = {i: "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(3)}
    assert by == {0: TEXT[:4], 1: TEXT[:4], 2: TEXT[:4]}
    ends = sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason == "length")
    assert ends == [0, 1, 2]


@pytest.mark.parametrize("body, param, words", [
    ({}, "prompt", "prompt must be"),
    ({"prompt": []}, "prompt", "prompt must be"),
    ({"prompt": [[]]}, "prompt", "empty list"),
    ({"prompt": [1, -2]}, "prompt", "non-negative"),
    ({"prompt": [True, 2]}, "prompt", "prompt[0]"),
    ({"prompt": ["a", 3]}, "prompt", "prompt[1]"),
    ({"prompt": [[1, 2], [3, "x"]]}, "prompt", "prompt[1]"),
    ({"prompt": ["a"] * 65}, "prompt", "at most 64"),
    ({"prompt": "x" * 200_001}, "prompt", "characters"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "at most 20"),
    ({"prompt": "x", "logprobs": "2"}, "logprobs", "integer"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "echo"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens", "at least 0"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens", "integer"),
    ({"prompt": "x", "temperature": 2.5}, "temperature", "at most 2"),
    ({"prompt": "x", "top_p": 0}, "top_p", "above 0"),
    ({"prompt": "x", "seed": "7"}, "seed", "integer"),
    ({"prompt": "x", "n": 2}, "n", "Only n=1"),
    ({"prompt": "x", "best_of": 3}, "best_of", "Only best_of=1"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty", "penalties"),
    ({"prompt": "x", "suffix": "end"}, "suffix", "not supported"),
    ({"prompt": "x", "logit_bias": {"5": 10}}, "logit_bias", "not supported"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
    ({"prompt": "x", "stop": [""]}, "stop", "non-empty"),
    ({"prompt": "x", "echo": "yes"}, "echo", "true or false"),
    ({"prompt": "x", "stream": 1}, "stream", "true or false"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
    ({"prompt": "x", "stream": True, "stream_options": []}, "stream_options", "object"),
])
def test_every_field_is_checked_with_a_clear_400(v1, body, param, words):
    r = post(v1, {"model": v1["words"], **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and err["type"] == "invalid_request_error"


def test_errors_come_in_openais_shape(v1):
    r = post(v1, {"model": "999999", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = requests.post(f"{v1['url']}/v1/completions", data="nope", headers={"Authorization": f"Bearer {v1['key']}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = requests.post(f"{v1['url']}/v1/completions", json={"model": v1["words"], "prompt": "x"})
    assert r.status_code == 401 and "error" in r.json()


def test_chat_top_logprobs_needs_logprobs(v1):
    r = post(v1, {"model": v1["words"], "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
             "chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = post(v1, {"model": v1["words"], "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                  "top_logprobs": 21}, "chat/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


# --- log-probabilities, with the real tiny model ------------------------------------------------------


@pytest.mark.process
def test_echo_scores_the_prompt_as_the_model_does(v1, model):
    m, tok = model
    r = v1["client"].completions.create(model=v1["tiny"], prompt=PROMPT, max_tokens=0, echo=True, logprobs=3)
    c = r.choices[0]
    ids = tok.encode(PROMPT)
    assert c.text == PROMPT and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids) + 1
    lp = c.logprobs
    assert "".join(lp.tokens) == PROMPT and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # OpenAI's shape: no prediction
    ref = logprobs_of(m, [tok.bos_id, *ids])
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - ref[i, ids[i]].item()) < 1e-4
        top = ref[i].topk(3)
        want = {tok.decode([t]): v for t, v in zip(top.indices.tolist(), top.values.tolist())}
        assert set(lp.top_logprobs[i]) == set(want)
        assert all(abs(lp.top_logprobs[i][k] - want[k]) < 1e-4 for k in want)
    assert lp.text_offset == [len(tok.decode(ids[:i])) for i in range(len(ids))]


@pytest.mark.process
def test_generated_tokens_offset_from_the_prompts_end_and_match_the_model(v1, model):
    m, tok = model
    r = v1["client"].completions.create(model=v1["tiny"], prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1)
    c = r.choices[0]
    lp = c.logprobs
    assert "".join(lp.tokens) == c.text and len(lp.tokens) == 6 == r.usage.completion_tokens
    assert lp.text_offset[0] == len(PROMPT)
    assert lp.text_offset == [len(PROMPT) + len("".join(lp.tokens[:i])) for i in range(6)]
    ids = [tok.bos_id, *tok.encode(PROMPT)]
    gen = tok.encode(c.text)
    ref = logprobs_of(m, ids + gen)
    for i, t in enumerate(gen):
        assert abs(lp.token_logprobs[i] - ref[len(ids) - 1 + i, t].item()) < 1e-4
        assert lp.token_logprobs[i] == max(lp.top_logprobs[i].values())  # greedy


@pytest.mark.process
def test_token_id_prompts_and_batches_answer_as_their_text(v1, model):
    _, tok = model
    ids = tok.encode(PROMPT)
    one = v1["client"].completions.create(model=v1["tiny"], prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0)
    by_ids = v1["client"].completions.create(model=v1["tiny"], prompt=ids, max_tokens=8, temperature=0, logprobs=0)
    assert by_ids.choices[0].text == one.choices[0].text  # no echo asked: none in the answer
    assert by_ids.choices[0].logprobs.text_offset == one.choices[0].logprobs.text_offset  # from the prompt's end
    other = tok.encode("The cat")
    batch = v1["client"].completions.create(model=v1["tiny"], prompt=[ids, other, ids], max_tokens=8,
                                            temperature=0)
    alone = v1["client"].completions.create(model=v1["tiny"], prompt="The cat", max_tokens=8, temperature=0)
    assert [c.text for c in batch.choices] == [one.choices[0].text, alone.choices[0].text, one.choices[0].text]
    assert batch.usage.prompt_tokens == 2 * (len(ids) + 1) + len(other) + 1


@pytest.mark.process
def test_streamed_echo_and_logprobs_equal_the_whole_answer(v1):
    kw = dict(model=v1["tiny"], prompt=PROMPT, max_tokens=7, temperature=0, echo=True, logprobs=2)
    whole = v1["client"].completions.create(**kw).choices[0]
    chunks = [c for c in v1["client"].completions.create(stream=True, **kw) if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == whole.text and whole.text.startswith(PROMPT)
    parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert sum((p.tokens for p in parts), []) == whole.logprobs.tokens
    assert sum((p.token_logprobs for p in parts), []) == whole.logprobs.token_logprobs
    assert sum((p.text_offset for p in parts), []) == whole.logprobs.text_offset


@pytest.mark.process
def test_out_of_vocabulary_token_ids_are_a_400(v1):
    r = post(v1, {"model": v1["tiny"], "prompt": [1, 10**6], "max_tokens": 2})
    assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]


@pytest.mark.process
def test_chat_logprobs_in_the_chat_shape(v1, model):
    m, tok = model
    msgs = [{"role": "user", "content": "Once upon a time"}]
    r = v1["client"].chat.completions.create(model=v1["tiny"], messages=msgs, max_tokens=6, temperature=0,
                                             logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content and len(content) == 6
    ids = list(tok.render_for_completion(msgs))
    gen = [tok.encode(t.token) for t in content]
    assert all(len(g) == 1 for g in gen)
    ref = logprobs_of(m, ids + [g[0] for g in gen])
    for i, t in enumerate(content):
        assert bytes(t.bytes).decode() == t.token and len(t.top_logprobs) == 2
        assert abs(t.logprob - ref[len(ids) - 1 + i, gen[i][0]].item()) < 1e-4
        assert t.top_logprobs[0].logprob == t.logprob  # greedy
    stream = list(v1["client"].chat.completions.create(model=v1["tiny"], messages=msgs, max_tokens=6,
                                                       temperature=0, logprobs=True, stream=True))
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert all(t.top_logprobs == [] for t in streamed)  # top_logprobs defaults to 0
    plain = v1["client"].chat.completions.create(model=v1["tiny"], messages=msgs, max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_sse_frames_are_data_lines_only(v1):
    r = requests.post(f"{v1['url']}/v1/completions", json={"model": v1["words"], "prompt": "x", "stream": True,
                                                          "max_tokens": 3},
                      headers={"Authorization": f"Bearer {v1['key']}"}, stream=True, timeout=30)
    events = sse_events(r.iter_lines(decode_unicode=True))
    assert events[-1] == ("message", "[DONE]") and all(e == "message" for e, _ in events)
    assert json.dumps(events[0][1])  # JSON objects until [DONE]

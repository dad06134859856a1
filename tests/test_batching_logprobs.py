"""trainer/batching.py's log-probability entries in process: a stop token keeps its entry (a client that
asks for one token's log-probability gets one entry, whatever the token), and alternatives carry bytes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from chat_fixtures import cached_tiny_checkpoint  # noqa: E402

from trainer import sample  # noqa: E402
from trainer.batching import TorchBackend  # noqa: E402

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return TorchBackend(str(cached_tiny_checkpoint(tmp_path_factory.mktemp("b") / "ck")), "cpu", max_active=4)


def run(backend: TorchBackend, seq) -> tuple[str, list[dict]]:
    text, entries = "", []
    while not seq.done:
        backend.step([seq])
        for t, e, echo in seq.take_output():
            assert not echo
            text += t
            entries += e or []
    backend.release(seq)
    return text, entries


def test_a_sampled_stop_token_comes_with_its_entry(backend, monkeypatch):
    bos = backend.tokenizer.bos_id
    picks = iter([5, bos])  # one ordinary token, then <|bos|>, which ends a completion
    monkeypatch.setattr(sample, "_pick", lambda *a, **k: next(picks))
    seq = backend.open("complete", "Once upon", {"max_tokens": 8, "temperature": 0}, logprobs=2)
    text, entries = run(backend, seq)
    assert seq.finish_reason == "stop" and seq.completion_tokens == 2
    assert [e["token"] for e in entries] == [5, bos]
    stop = entries[1]
    assert stop["special"] is True and "special" not in entries[0]
    assert stop["offset"] == len(text) and text == entries[0]["text"]  # it adds no text
    # its log-probability is the model's, after the prompt and the first token
    ids = [bos, *backend.tokenizer.encode("Once upon"), 5]
    with torch.no_grad():
        ref = torch.log_softmax(backend.model(torch.tensor([ids]))[0, -1].float(), -1)
    assert abs(stop["logprob"] - ref[bos].item()) < 1e-4


def test_alternatives_carry_their_bytes(backend):
    seq = backend.open("complete", "Once upon a time", {"max_tokens": 4, "temperature": 0}, logprobs=3)
    _, entries = run(backend, seq)
    assert len(entries) == 4
    for e in entries:
        assert len(e["top"]) == 3
        for token, text, logprob, raw in e["top"]:
            assert bytes(raw) == backend.tokenizer.decode_bytes([token])
            assert text == bytes(raw).decode("utf-8", errors="replace") and logprob <= 0


def test_newcomers_arriving_together_are_prefilled_in_one_step_and_answer_as_alone(tmp_path):
    # 16 arrivals: one batched forward gives every one its first token (TTFT is one step, not 16), and
    # greedy text (picked in one argmax for all rows) is what each request decodes alone
    backend = TorchBackend(str(cached_tiny_checkpoint(tmp_path / "ck")), "cpu", max_active=16,
                           prefill_tokens=1024)
    prompts = [f"Once upon a time {'there was ' * (i % 3)}a fox {i}" for i in range(16)]
    greedy = {"max_tokens": 12, "temperature": 0}
    alone = [run(backend, backend.open("complete", p, greedy))[0] for p in prompts]
    seqs = [backend.open("complete", p, greedy) for p in prompts]
    texts = [""] * len(seqs)
    assert sum(s.prompt_tokens for s in seqs) <= backend.prefill_tokens  # all fit one step's prefill budget
    backend.step(seqs)
    assert all(s.completion_tokens == 1 for s in seqs)
    steps = 1
    while not all(s.done for s in seqs):
        backend.step([s for s in seqs if not s.done])
        steps += 1
        assert steps <= 13
    for i, s in enumerate(seqs):
        texts[i] = "".join(t for t, _, _ in s.take_output())
        backend.release(s)
    assert texts == alone


def test_the_model_server_says_which_kernels_its_engine_runs(backend):
    info = backend.info
    assert info["products"] == backend.engine.products and info["attention"] == backend.engine.attention
    # one stream decoding alone: the C step where this machine builds it (trainer/native.py), else why not
    assert info["decode_one"] in ("native", "torch") and info["decode_one"] == backend.engine.decode_one
    assert (info["decode_one"] == "native") == (backend.engine._native is not None)
    assert info["decode_one_reason"] and json.dumps(info)

"""trainer/batching.py's log-probability entries in process: a stop token keeps its entry (a client that
asks for one token's log-probability gets one entry, whatever the token), and alternatives carry bytes."""

from __future__ import annotations

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

"""Checkpoints: round trip, crash safety, verification, and inference loading without pickle."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from trainer import checkpoint, optim

pytestmark = pytest.mark.trainer  # the trainer alone: never opens the store

REPO = Path(__file__).resolve().parents[1]


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.hidden = torch.nn.Linear(8, 8, bias=False)
        self.head = torch.nn.Linear(8, 16, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(self.emb(x))))

    def param_groups(self):
        return {"matrix": [self.hidden.weight], "embedding": [self.emb.weight], "lm_head": [self.head.weight]}


def _trained(seed=0, steps=3):
    torch.manual_seed(seed)
    model = Toy()
    opts = optim.build_optimizers(model.param_groups(), n_embd=8)
    x = torch.randint(0, 16, (32,))
    for _ in range(steps):
        for o in opts:
            o.zero_grad()
        torch.nn.functional.cross_entropy(model(x), (x + 1) % 16).backward()
        for o in opts:
            o.step()
    return model, opts


def _tokenizer_dir(tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_text('{"fake": true}')
    return d


def test_it_round_trips_weights_optimizer_state_and_train_state(tmp_path):
    model, opts = _trained()
    torch.manual_seed(1234)
    path = checkpoint.save_checkpoint(tmp_path, 3, model, opts, {"tokens_seen": 96, "loader": {"pos": 7}},
                                      _tokenizer_dir(tmp_path), {"model": {"n_embd": 8}})
    assert path.name == "step_0000003"
    assert {p.name for p in path.iterdir()} == {"model.safetensors", "optim.pt", "state.json",
                                                "config.json", "tokenizer", "manifest.json"}
    expected_rand = torch.rand(3)

    fresh, fresh_opts = _trained(seed=99, steps=1)
    torch.manual_seed(0)
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path), fresh, fresh_opts, "cpu")
    assert state["step"] == 3 and state["tokens_seen"] == 96 and state["loader"] == {"pos": 7}
    assert torch.equal(torch.rand(3), expected_rand)  # RNG restored
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    for o, f in zip(opts, fresh_opts):
        sa, sb = o.state_dict(), f.state_dict()
        for k in sa["state"]:
            for name, v in sa["state"][k].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][k][name]))
    # optim.pt holds no code: the safe loader reads it.
    torch.load(path / "optim.pt", weights_only=True)


def test_it_keeps_only_the_newest_checkpoints(tmp_path):
    model, opts = _trained()
    for step in (1, 2, 3, 4):
        checkpoint.save_checkpoint(tmp_path, step, model, opts, {}, None, {}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_0000003", "step_0000004"]


def test_a_corrupted_weight_file_fails_verification(tmp_path):
    model, opts = _trained()
    good = checkpoint.save_checkpoint(tmp_path, 1, model, opts, {}, None, {})
    bad = checkpoint.save_checkpoint(tmp_path, 2, model, opts, {}, None, {})
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF  # same size, different bytes
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="checksum"):
        checkpoint.verify(bad)
    assert checkpoint.latest_checkpoint(tmp_path) == good
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load_checkpoint(bad, model, opts, "cpu")


def test_a_torn_directory_without_manifest_is_skipped(tmp_path):
    model, opts = _trained()
    good = checkpoint.save_checkpoint(tmp_path, 5, model, opts, {}, None, {})
    torn = tmp_path / "checkpoints" / "step_0000009"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"half")
    assert checkpoint.latest_checkpoint(tmp_path) == good


_KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {repo!r})
    from trainer import checkpoint
    from tests.test_checkpoint import _trained
    model, opts = _trained()
    checkpoint.save_checkpoint({out!r}, 1, model, opts, {{"tokens_seen": 1}}, None, {{}})
    real = checkpoint._fsync_file
    calls = []
    def slow(path):
        real(path)
        calls.append(path)
        if len(calls) == 2:  # some files of step 2 are written, its manifest is not
            print("mid-save", flush=True)
            time.sleep(60)
    checkpoint._fsync_file = slow
    checkpoint.save_checkpoint({out!r}, 2, model, opts, {{"tokens_seen": 2}}, None, {{}})
""")


def test_a_kill_during_the_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    script = _KILLED_WRITER.format(repo=str(REPO), out=str(tmp_path))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "mid-save"
        proc.kill()
    finally:
        proc.wait(timeout=30)
    root = tmp_path / "checkpoints"
    assert [p.name for p in root.glob(".tmp-*")]  # the half-built step 2 is there, hidden
    latest = checkpoint.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step_0000001"
    model, opts = _trained(seed=5)
    assert checkpoint.load_checkpoint(latest, model, opts, "cpu")["tokens_seen"] == 1
    # The next save clears the debris.
    checkpoint.save_checkpoint(tmp_path, 3, model, opts, {}, None, {})
    assert not list(root.glob(".tmp-*"))


def test_load_model_reads_a_real_gpt_without_pickle(tmp_path):
    model_mod = pytest.importorskip("trainer.model")
    tok_mod = pytest.importorskip("trainer.tokenizer")
    import dataclasses
    cfg = model_mod.GPTConfig(sequence_len=32, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2,
                              n_embd=32)
    torch.manual_seed(0)
    model = model_mod.GPT(cfg)
    model.init_weights()
    opts = optim.build_optimizers(model.param_groups(), n_embd=32)
    tok = tok_mod.Tokenizer.train_from_iterator(["hello world, once upon a time"] * 20, vocab_size=300) \
        if hasattr(tok_mod.Tokenizer, "train_from_iterator") else None
    if tok is None:
        pytest.skip("no tokenizer trainer to build a fixture with")
    tok.save(tmp_path / "tok")
    path = checkpoint.save_checkpoint(tmp_path, 7, model, opts, {}, tmp_path / "tok",
                                      {"model": dataclasses.asdict(cfg), "train": {}})
    loaded, tokenizer, meta = checkpoint.load_model(path, "cpu")
    assert meta["step"] == 7 and tokenizer.vocab_size == tok.vocab_size
    idx = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model.eval()(idx))

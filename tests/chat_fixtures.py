"""Tiny real checkpoints for the chat tests, built with the trainer's own code.

``tiny_checkpoint(dir)`` trains a depth-1 GPT for a few dozen steps on demo stories (a second or two on
one CPU thread) and saves it with ``trainer.checkpoint.save_checkpoint``, so the model server loads it
exactly as it loads a real run. Built once per test session and copied (``cached_tiny_checkpoint``).

``scripted_checkpoint(dir, text, delay_s)`` makes a directory the model server replays instead of
running a network (see trainer/serve.py): for crash, queue and hostile-output tests.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

_CACHE: dict[str, Path] = {}


def tiny_checkpoint(out_dir: str | os.PathLike, steps: int = 40, seed: int = 0) -> Path:
    """Train and save; returns the step directory (``out_dir/checkpoints/step_*``)."""
    import torch

    from trainer import demo
    from trainer.checkpoint import save_checkpoint
    from trainer.model import GPT, GPTConfig
    from trainer.tokenizer import Tokenizer

    torch.manual_seed(seed)
    stories = list(demo.generate_stories(seed=seed, n=200))
    out = Path(out_dir)
    tok_dir = out / "tokenizer"
    tok = Tokenizer.train_from_iterator(stories, vocab_size=300)
    tok.save(tok_dir)
    cfg = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    model = GPT(cfg)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.tensor([t for s in stories for t in [tok.bos_id, *tok.encode(s)]], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - cfg.sequence_len - 1, (8,), generator=g)
        x = torch.stack([ids[i : i + cfg.sequence_len] for i in starts])
        y = torch.stack([ids[i + 1 : i + cfg.sequence_len + 1] for i in starts])
        loss = model(x, targets=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    config = {"model": cfg.to_dict(), "train": {"max_steps": steps, "note": "tests/chat_fixtures.py"}}
    return save_checkpoint(out, steps, model, [opt], {"tokens_seen": steps * 8 * cfg.sequence_len},
                           tok_dir, config)


def cached_tiny_checkpoint(dest: str | os.PathLike) -> Path:
    """A copy of a tiny checkpoint built once per process, at ``dest`` (a new directory)."""
    if "tiny" not in _CACHE:
        _CACHE["tiny"] = tiny_checkpoint(tempfile.mkdtemp(prefix="ncs-tiny-"))
    shutil.copytree(_CACHE["tiny"], dest)
    return Path(dest)


def scripted_checkpoint(dest: str | os.PathLike, text: str, delay_s: float = 0.0, tokens_per_delta: int = 1) -> Path:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "fake_model.json").write_text(
        json.dumps({"text": text, "delay_s": delay_s, "tokens_per_delta": tokens_per_delta}), encoding="utf-8")
    return dest

"""karpathy/nanochat's own model and optimizer, for tests/bench/train_throughput.py to time beside ours.

Nothing of nanochat is in this repository: the person running the bench gives the directory of a
checkout (``--nanochat DIR``), and its modules are imported from there at run time. Its model is
built the way its ``scripts/base_train.py`` builds one for a depth: width ``depth * 64`` rounded up
to whole heads of 128, sliding-window pattern "SSSL", its own initialisation and its own
``setup_optimizer()`` (AdamW + Muon, torch.compile'd steps). Its dtype is its own rule (float32 on a
CPU, bf16 on Ampere+ GPUs) unless ``dtype`` sets ``NANOCHAT_DTYPE`` before the import.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

# nanochat's base_train.py defaults: the depth-to-shape rule
ASPECT_RATIO = 64
HEAD_DIM = 128
WINDOW_PATTERN = "SSSL"

_modules: dict = {}


def load(directory: str, dtype: str | None = None) -> dict:
    """Import nanochat's gpt module from a checkout; raises SystemExit with what is missing."""
    if _modules:
        return _modules
    root = Path(directory).resolve()
    if not (root / "nanochat" / "gpt.py").is_file():
        raise SystemExit(f"--nanochat {directory}: no nanochat/gpt.py there (give a karpathy/nanochat checkout)")
    if dtype:
        os.environ["NANOCHAT_DTYPE"] = dtype  # read once, when nanochat.common is imported
    sys.path.insert(0, str(root))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its prints must not mix with our JSON line
            from nanochat import common, gpt
    except ImportError as e:
        raise SystemExit(f"--nanochat {directory}: importing its model failed ({e}); install what it needs") from None
    _modules.update(gpt=gpt, common=common)
    return _modules


def shape_for(depth: int) -> dict:
    base = depth * ASPECT_RATIO
    n_embd = (base + HEAD_DIM - 1) // HEAD_DIM * HEAD_DIM
    return {"n_layer": depth, "n_embd": n_embd, "n_head": n_embd // HEAD_DIM, "n_kv_head": n_embd // HEAD_DIM}


class Side:
    """One nanochat model and its optimizer, with the three phases of a step as methods."""

    def __init__(self, directory: str, depth: int, vocab: int, seq: int, device, dtype: str | None = None):
        import torch
        mods = load(directory, dtype)
        gpt = mods["gpt"]
        shape = shape_for(depth)
        config = gpt.GPTConfig(sequence_len=seq, vocab_size=vocab, window_pattern=WINDOW_PATTERN, **shape)
        with contextlib.redirect_stdout(sys.stderr):
            with torch.device("meta"):
                model = gpt.GPT(config)
            model.to_empty(device=device)
            torch.manual_seed(0)
            model.init_weights()
            self.optimizer = model.setup_optimizer()
        self.model = model
        self.shape = shape
        self.dtype = str(mods["common"].COMPUTE_DTYPE).replace("torch.", "")
        self.flops_per_token = int(model.estimate_flops())
        self.params = sum(p.numel() for p in model.parameters())

    def forward(self, x, y):
        return self.model(x, y)

    def optimizer_step(self):
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)

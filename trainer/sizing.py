"""Model shapes, parameter counts, FLOPs and memory per depth — pure Python, no torch.

The web app imports this module to show estimates before a job is queued, so it must stay free of
torch and of anything heavy. ``trainer/model.py`` builds its network from a :class:`ModelShape` and
its tests check that :func:`param_counts` equals the real module's parameter count.

One knob sets the size (nanochat's convention): ``depth``. Width is ``depth * 64`` rounded up to a
whole number of attention heads, so a depth-20 model is 1280 wide with 10 heads of 128.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# The special tokens every tokenizer of ours carries on top of its 256 byte tokens, reserved from the
# first tokenizer on so pretraining and chat tuning share one vocabulary (a system turn has its own
# pair, so a model can tell instructions from the user's words). trainer/tokenizer.py uses this list;
# it lives here so the web app's estimates need neither torch nor tiktoken.
SPECIAL_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|system_start|>", "<|system_end|>")
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
MAX_DEPTH = 64
ASPECT_RATIO = 64  # width per layer
GPU_HEAD_DIM = 128  # wide models: fewer, larger heads keep the attention kernels efficient
TINY_HEAD_DIM = 64  # narrow models: still at least two heads at depth 2


@dataclass(frozen=True)
class ModelShape:
    depth: int
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim: int
    vocab_size: int
    seq_len: int
    mlp_ratio: int = 4

    def to_dict(self) -> dict:
        return asdict(self)


def shape_for(depth: int, vocab_size: int, seq_len: int, head_dim: int | None = None,
              n_kv_head: int | None = None) -> ModelShape:
    """The model shape for ``depth`` layers.

    Raises ValueError for a depth outside 1..64, a vocabulary too small for bytes plus specials,
    a non-positive sequence length or head size, or a ``n_kv_head`` that does not divide ``n_head``.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must be an integer from 1 to {MAX_DEPTH}, got {depth!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + "
                         f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    target = depth * ASPECT_RATIO
    if head_dim is None:
        head_dim = GPU_HEAD_DIM if target >= 768 else TINY_HEAD_DIM
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        # rotary embeddings rotate pairs of channels, so a head needs an even size
        raise ValueError(f"head_dim must be an even integer >= 2, got {head_dim!r}")
    width = math.ceil(target / head_dim) * head_dim
    n_head = width // head_dim
    if n_kv_head is None:
        n_kv_head = n_head
    if isinstance(n_kv_head, bool) or not isinstance(n_kv_head, int) or n_kv_head < 1 or n_head % n_kv_head:
        raise ValueError(f"n_kv_head must be a positive divisor of n_head={n_head}, got {n_kv_head!r}")
    return ModelShape(depth=depth, n_layer=depth, n_embd=width, n_head=n_head, n_kv_head=n_kv_head,
                      head_dim=head_dim, vocab_size=vocab_size, seq_len=seq_len)


def _block_params(s: ModelShape) -> int:
    """Parameters of one block, all in 2-D matrices: no biases, and RMSNorm has no weights."""
    qkv = s.n_embd * (s.n_head + 2 * s.n_kv_head) * s.head_dim
    attn_out = s.n_head * s.head_dim * s.n_embd
    mlp = 2 * s.n_embd * s.mlp_ratio * s.n_embd
    return qkv + attn_out + mlp


def param_counts(shape: ModelShape) -> dict:
    """Parameters by part: embedding, blocks, lm_head (untied) and total."""
    per_block = _block_params(shape)
    embedding = shape.vocab_size * shape.n_embd
    blocks = shape.n_layer * per_block
    lm_head = shape.n_embd * shape.vocab_size
    return {"embedding": embedding, "blocks": blocks, "lm_head": lm_head,
            "total": embedding + blocks + lm_head}


def flops_per_token(shape: ModelShape) -> int:
    """Training FLOPs per token (forward + backward), the PaLM / nanochat convention.

    6 FLOPs per parameter per token for every matmul weight (2 forward, 4 backward); the embedding
    is a lookup, not a matmul, so it is left out, while the lm_head is counted. Attention scores
    and their weighted sum add 12 * n_layer * n_head * head_dim * seq_len: the causal mask would
    halve that, but like PaLM we count the full square, which is what dense kernels mostly do.
    """
    counts = param_counts(shape)
    matmul_params = counts["blocks"] + counts["lm_head"]
    attention = 12 * shape.n_layer * shape.n_head * shape.head_dim * shape.seq_len
    return 6 * matmul_params + attention


# Activations kept for the backward pass, in elements per token per layer, as multiples of n_embd.
# Eager: attention keeps its normed input, q/k/v before and after QK-norm + rotary, the attention
# output (SDPA's fused kernels keep no T x T matrix) and the projection input (~10 C); the MLP keeps
# its normed input, the 4C hidden before and after ReLU and after squaring (~13 C); plus the
# residual stream (1 C). torch.compile fuses the element-wise chains and keeps about 2/3 of that.
_ACT_PER_LAYER_EAGER = 24
_ACT_PER_LAYER_COMPILED = 16
# Logits: float32 logits, their soft-capped copy and the cross-entropy gradient, B*T*V each in eager
# mode; a compiled graph fuses the cap and the loss, leaving about one and a half copies.
_LOGIT_COPIES_EAGER = 3.0
_LOGIT_COPIES_COMPILED = 1.5


# Bumped whenever a trainer change moves its speed noticeably (kernels, optimizer work): the web
# app keys its cached timing runs by it, so an upgrade re-times the plan page's estimates instead of
# quoting the old trainer's speed. 2: trainer/cpu_ops.py and the eigenbasis Muon (CPU ~1.4x faster).
SPEED_REVISION = 2


def memory_estimate(shape: ModelShape, batch_size: int, device_kind: str = "cpu",
                    compiled: bool = False) -> dict:
    """Approximate training memory in bytes: weights, grads, optimizer, activations, total.

    Weights and grads are float32 on every device (CUDA trains under bf16 autocast, which keeps
    float32 master weights and grads). Optimizer state: one float32 momentum buffer for every
    Muon matrix, two AdamW moments for the embedding and lm_head. Activations are bf16 on CUDA
    (autocast outputs) and float32 on CPU and MPS (MPS counted as float32 to be safe), except the
    logits, which are float32 everywhere because the soft-cap and loss run in float32. An estimate
    for picking a batch size, not a promise: allocator fragmentation and workspaces come on top.
    """
    if device_kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device_kind must be 'cpu', 'cuda' or 'mps', got {device_kind!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    counts = param_counts(shape)
    weights = 4 * counts["total"]
    grads = 4 * counts["total"]
    muon = 4 * counts["blocks"]
    adamw = 2 * 4 * (counts["embedding"] + counts["lm_head"])
    tokens = batch_size * shape.seq_len
    act_bytes = 2 if device_kind == "cuda" else 4
    per_layer = _ACT_PER_LAYER_COMPILED if compiled else _ACT_PER_LAYER_EAGER
    hidden = tokens * shape.n_embd * (shape.n_layer * per_layer + 2) * act_bytes  # +2: embedding, final norm
    logit_copies = _LOGIT_COPIES_COMPILED if compiled else _LOGIT_COPIES_EAGER
    logits = int(logit_copies * tokens * shape.vocab_size * 4)
    activations = hidden + logits
    total = weights + grads + muon + adamw + activations
    return {"weights": weights, "grads": grads, "optimizer": muon + adamw, "activations": activations,
            "logits": logits, "total": total}


def default_training_tokens(params: int, tokens_per_param: int = 20) -> int:
    """Chinchilla's rule of thumb: about 20 training tokens per parameter."""
    if params < 0 or tokens_per_param <= 0:
        raise ValueError("params must be >= 0 and tokens_per_param > 0")
    return int(params * tokens_per_param)


DEFAULT_MAX_EPOCHS = 4.0
VAL_FRACTION = 0.05  # share of the tokenized data data.py holds out for validation


def planned_tokens(params: int, tokens_per_param: int = 20, data_tokens: int | None = None,
                   max_epochs: float | None = DEFAULT_MAX_EPOCHS) -> tuple[int, str]:
    """(training tokens, budget) when no step or token count was asked for.

    Twenty tokens per parameter, unless that would read the data more than ``max_epochs`` times:
    past a few passes a small model memorises a small corpus instead of learning more from it, so
    the demo corpus (~430K tokens) at depth 2-4 would spend hours of CPU for nothing. ``budget`` is
    "tokens_per_param" or "data", whichever set the length. ``data_tokens`` None (unknown yet) or
    ``max_epochs`` 0/None turns the cap off. Raises ValueError for negative sizes.
    """
    tokens = default_training_tokens(params, tokens_per_param)
    if data_tokens is not None and data_tokens < 0:
        raise ValueError("data_tokens must be >= 0")
    if max_epochs is not None and max_epochs < 0:
        raise ValueError("max_epochs must be >= 0")
    if data_tokens is None or not max_epochs:
        return tokens, "tokens_per_param"
    cap = int(max_epochs * data_tokens)
    if cap < tokens:
        return cap, "data"
    return tokens, "tokens_per_param"


# Per-device batch and sequence defaults, shared by the trainer and the web app's estimates.
# CPU: measured here, a depth-2 run of 600 steps finishes in a few minutes on 2 cores. CUDA: the
# sequence is long and the batch (rows per GPU) is picked from the memory estimate at run time;
# ``batch_size`` here is only the starting point the plan page shows.
DEVICE_DEFAULTS = {
    "cpu": {"batch_size": 8, "seq_len": 256},
    "mps": {"batch_size": 8, "seq_len": 512},
    "cuda": {"batch_size": 32, "seq_len": 2048},
}

# The built-in demo corpus's size in bytes (trainer/demo.py writes it; trainer/sources.py reads it).
DEMO_CORPUS_BYTES = 2_000_000


def device_defaults(device_kind: str) -> dict:
    """{"batch_size", "seq_len"} for a device kind ("cpu", "mps", "cuda"); unknown kinds get CPU's."""
    return dict(DEVICE_DEFAULTS.get(device_kind, DEVICE_DEFAULTS["cpu"]))


def choose_vocab_size(num_bytes: int) -> int:
    """A vocabulary size for a corpus of ``num_bytes`` bytes of text.

    Rule: 512 below 256 KiB, then one doubling for every 4x more data (2048 at ~1-4 MiB, 8192 at
    16-64 MiB, 32768 at 256 MiB-1 GiB), capped at 65536 (>= 1 GiB) so token files stay uint16. Small
    corpora cannot fill a big vocabulary (rare merges would be seen a handful of times) and the embedding
    table would dominate a tiny model; big corpora gain from shorter sequences. A corpus with fewer
    distinct merges than this (the demo grammar) ends up with a smaller vocabulary.
    """
    if num_bytes < 0:
        raise ValueError("num_bytes must be >= 0")
    size, threshold = 512, 256 << 10
    while num_bytes >= threshold and size < 65536:
        size *= 2
        threshold *= 4
    return size

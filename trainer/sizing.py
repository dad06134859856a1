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
TINY_HEAD_DIM = 64  # narrow models (256-767 wide)
# Below 256 wide (depths 1-3): heads of 32, so depth 2 has four heads a layer, not two. Answering a
# question about a story means finding the asked-about words in it and copying what follows; with two
# layers that is done by a few attention heads side by side, and two were too few (the demo chat bench
# at depth 2, tests/bench/demo_chat.py: with two heads it stayed near 70% of story questions right).
SMALL_HEAD_DIM = 32


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
        head_dim = GPU_HEAD_DIM if target >= 768 else TINY_HEAD_DIM if target >= 256 else SMALL_HEAD_DIM
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


def scaling_params(shape: ModelShape) -> int:
    """The parameters the length rule counts (:func:`planned_tokens`): all but the input embedding table.

    A token's row of that table is looked up, not multiplied: it adds no compute per token (see
    :func:`flops_per_token`), and a row learns only when its token appears. Chinchilla's twenty
    tokens per parameter counted every parameter, but of models where the table is a fraction of a
    percent; Kaplan et al. left embeddings out altogether. We keep the untied output head, a product
    every token pays for, and leave out the table, which at our sizes is a large share that buys no
    compute: 19% of a depth-2 model on the demo's 977-token vocabulary, 19% of a depth-12 one on a
    32,768-token vocabulary, so runs are that much shorter than with every parameter counted.
    """
    counts = param_counts(shape)
    return counts["total"] - counts["embedding"]


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


# Bumped whenever a trainer change moves its speed noticeably (kernels, optimizer work) or the
# calibration measures something new: the web app keys its cached timing runs by it, so an upgrade
# re-times the plan page's estimates instead of quoting the old trainer's speed. 2: trainer/cpu_ops.py
# and the eigenbasis Muon (CPU ~1.4x faster). 3: calibrations also time a run's fixed costs
# (start-up, evaluation, samples, checkpoints) and report the process's peak memory. 4: heads of 32
# below 256 wide (depths 1-3 have twice the heads). 5: a bf16 run on a CPU times attention in both
# dtypes and may run it in float32 (trainer/precision.py; ~10% of a depth-2 step here), and the chat
# stage's Muon runs in the run's dtype.
SPEED_REVISION = 5


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
    """Chinchilla's rule of thumb: about 20 training tokens per parameter (the trainer and the web app
    pass :func:`scaling_params`)."""
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
# Big enough that the default CPU plan (depth 2, batch 8 x 256) trains on twenty tokens per parameter
# within DEFAULT_MAX_EPOCHS passes (4 x 3.42M training tokens >= 20 x 518K scaling parameters: the run
# reads it ~3 times), so a newcomer's first run is not cut short by the data and its plan shows no warning.
DEMO_CORPUS_BYTES = 16_000_000
# What trainer/data.py makes of the demo with the default vocabulary. The corpus is fixed by its seed
# and the tokenizer's training is deterministic, so the web app's first estimate needs no preparation;
# tests/test_sizing.py prepares the demo and compares every number.
DEMO_FACTS = {"raw_bytes": 15_916_346, "vocab_size": 977, "n_train_tokens": 3_415_714, "n_val_tokens": 179_410,
              "data_sha256": "cc0291c7cf98887c439ee52a4bf897cec8c7dc760ed963808c2dddfc5eedd1af"}


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


# ---- what a run does: its length and the work between steps ------------------------------------
# trainer/train.py decides a run's length with run_length and evaluates, samples and checkpoints on
# the schedule run_events counts; the web app's estimates call the same two functions, so a plan made
# from the same facts (the tokenizer's vocabulary, the training split's tokens) is the run.

# TrainConfig's defaults for the schedule (trainer/config.py; tests/test_sizing.py keeps them equal).
EVAL_EVERY = 250
EVAL_BATCHES = 8  # validation batches per evaluation when eval_tokens is not set
SAMPLE_EVERY = 500
SAMPLE_TOKENS = 64  # tokens generated per sample prompt (train.make_samples)
CHECKPOINT_EVERY = 500


def run_length(params: int, tokens_per_step: int, n_train_tokens: int | None, *, max_steps: int | None = None,
               target_tokens: int | None = None, tokens_per_param: int = 20,
               max_epochs: float | None = DEFAULT_MAX_EPOCHS) -> tuple[int, str]:
    """(total steps, budget): ``max_steps`` if set, else ``target_tokens``, else :func:`planned_tokens`
    (20 tokens per parameter capped at ``max_epochs`` passes over ``n_train_tokens``; ``params`` is what
    the rule counts, :func:`scaling_params` for the trainer and the web app), in whole steps
    of ``tokens_per_step``. ``budget`` names which of "max_steps", "target_tokens", "data" and
    "tokens_per_param" set it. Raises ValueError for a non-positive step size."""
    if tokens_per_step < 1:
        raise ValueError("tokens_per_step must be positive")
    if max_steps:
        return int(max_steps), "max_steps"
    if target_tokens:
        target, budget = int(target_tokens), "target_tokens"
    else:
        target, budget = planned_tokens(params, tokens_per_param, n_train_tokens, max_epochs)
    return max(1, math.ceil(target / tokens_per_step)), budget


def _occurrences(total_steps: int, every: int) -> int:
    # the trainer acts at every multiple of ``every`` and at the last step (once, if it is a multiple)
    return total_steps // every + (1 if total_steps % every else 0)


def run_events(total_steps: int, *, eval_every: int = EVAL_EVERY, sample_every: int = SAMPLE_EVERY,
               checkpoint_every: int = CHECKPOINT_EVERY, sample_prompts: int = 2) -> dict:
    """How many evaluations, sample rounds (of ``sample_prompts`` generations each) and checkpoints a
    fresh run of ``total_steps`` steps makes on the trainer's schedule."""
    if total_steps < 1 or min(eval_every, sample_every, checkpoint_every) < 1:
        raise ValueError("steps and intervals must be positive")
    return {"evals": _occurrences(total_steps, eval_every),
            "sample_rounds": _occurrences(total_steps, sample_every) if sample_prompts else 0,
            "samples": _occurrences(total_steps, sample_every) * sample_prompts,
            "checkpoints": _occurrences(total_steps, checkpoint_every)}


def eval_rows(n_val_tokens: int, batch_size: int, seq_len: int, max_batches: int = EVAL_BATCHES) -> int:
    """Rows of ``seq_len`` one evaluation reads: ``max_batches`` batches, or fewer when the validation
    split runs out (data.iter_val_batches, one process)."""
    if n_val_tokens < 1:
        return 0
    return max(0, min(max_batches * batch_size, (n_val_tokens - 1) // seq_len))

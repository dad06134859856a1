"""The GPT: a small decoder-only transformer in the spirit of nanochat.

Choices, and why:
- Rotary position embeddings, no learned positions: nothing to train, and a model can be run a bit
  past its training length (the cos/sin tables are precomputed for 8x and grow on demand).
- Parameter-free RMSNorm (``F.rms_norm``) after the token embedding, before attention and MLP in
  every block (pre-norm) and before the head; QK-norm on queries and keys, which keeps attention
  logits bounded without a learned temperature.
- ReLU^2 MLP of 4x width, no biases anywhere, untied embedding and lm_head (they want different
  learning rates and optimizers; see ``trainer/optim.py``).
- Logits are soft-capped, ``softcap * tanh(logits / softcap)``, in float32: this stops a few logits
  running away early in training, and float32 keeps the loss exact under bf16 autocast.
- Grouped-query attention: ``n_kv_head`` may be a divisor of ``n_head``; SDPA's ``enable_gqa`` shares
  each key/value head between ``n_head / n_kv_head`` query heads without copying them.
- Q, K and V come out of one fused linear (one GEMM instead of three).
- Eager CPU training (float32, or bf16 under autocast) runs the same math through ``trainer/cpu_ops.py``: oneDNN products,
  norm/rotary/ReLU^2 with lean hand-written backward passes, and head, soft-cap and loss computed
  together over chunks of rows, so the (B*T, vocab) logits are never held in memory.
- Full-sequence attention uses ``is_causal=True`` and never builds a mask. With a KV cache, a chunk
  of several tokens after a cached prefix needs an explicit mask: SDPA's causal flag aligns the
  triangle to the top-left corner, which would hide cached keys from the first queries (the bug of
  nanochat issue #756). Single-token steps need no mask at all.

The code keeps no dtypes of its own: the weights are float32; the trainer runs it under bf16 autocast
on CUDA and, where a probe finds bf16 products fast (trainer/precision.py), on CPU, so activations
are bf16 while the weights and the logits stay float32 (cpu_ops casts its own operands there).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer import cpu_ops, sizing

ROTARY_BASE = 10000.0
ROTARY_HEADROOM = 8  # rotary tables cover 8x the training length before they need to grow


@dataclass
class GPTConfig:
    sequence_len: int = 256
    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 256
    softcap: float = 15.0

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_shape(cls, shape: sizing.ModelShape, softcap: float = 15.0) -> "GPTConfig":
        return cls(sequence_len=shape.seq_len, vocab_size=shape.vocab_size, n_layer=shape.n_layer,
                   n_head=shape.n_head, n_kv_head=shape.n_kv_head, n_embd=shape.n_embd, softcap=softcap)

    def to_shape(self) -> sizing.ModelShape:
        return sizing.ModelShape(depth=self.n_layer, n_layer=self.n_layer, n_embd=self.n_embd,
                                 n_head=self.n_head, n_kv_head=self.n_kv_head, head_dim=self.head_dim,
                                 vocab_size=self.vocab_size, seq_len=self.sequence_len)

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Preallocated keys and values for every layer, laid out (layer, B, n_kv_head, max_len, head_dim)
    so SDPA reads a prefix of the buffer as a view, without copying. ``pos`` counts cached tokens;
    the model advances it after each forward."""

    def __init__(self, batch_size: int, n_layer: int, n_kv_head: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    @classmethod
    def for_model(cls, model: "GPT", batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> "KVCache":
        c = model.config
        w = model.lm_head.weight
        return cls(batch_size, c.n_layer, c.n_kv_head, c.head_dim, max_len, w.device, dtype or w.dtype)

    def reset(self) -> None:
        self.pos = 0  # stale entries past pos are never read, so no need to zero them

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_head, T, head_dim) at ``pos`` and return all keys/values so far."""
        t = k.size(2)
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {self.pos} cached + {t} new > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def norm(x: torch.Tensor) -> torch.Tensor:
    return cpu_ops.rms_norm(x)  # F.rms_norm over the last dimension, with a leaner CPU backward


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x (B, T, H, d) by position-dependent angles."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def _norm_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    fused = cpu_ops.norm_rotary(x, cos, sin)  # the same, in one autograd node, on eager CPU
    return fused if fused is not None else apply_rotary(norm(x), cos, sin)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.splits = (q_dim, kv_dim, kv_dim)
        self.c_qkv = cpu_ops.Linear(config.n_embd, q_dim + 2 * kv_dim)
        self.c_proj = cpu_ops.Linear(q_dim, config.n_embd)
        # training under bf16 autocast: attention in float32 instead (GPT.set_attention_dtype)
        self.float32_attention = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_qkv(x).split(self.splits, dim=-1)
        q = _norm_rotary(q.view(B, T, self.n_head, self.head_dim), cos, sin)
        k = _norm_rotary(k.view(B, T, self.n_kv_head, self.head_dim), cos, sin)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        gqa = self.n_kv_head != self.n_head
        # a bf16 run whose CPU computes attention faster in float32 (trainer/precision.py) does so here
        f32 = kv_cache is None and self.float32_attention and torch.is_autocast_enabled(x.device.type)
        # (B, H, T, d) views for SDPA; under autocast rms_norm may run in float32, so match v's dtype
        dt = torch.float32 if f32 else v.dtype
        q, k, v = q.transpose(1, 2).to(dt), k.transpose(1, 2).to(dt), v.transpose(1, 2).to(dt)
        if kv_cache is None:
            with torch.autocast(x.device.type, enabled=False) if f32 else contextlib.nullcontext():
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            prefix = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)
            q = q.to(k.dtype)
            if T == 1:  # one new token sees everything cached: no mask
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            elif prefix == 0:  # a prefill from empty is plain causal attention
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            else:  # query i (at position prefix + i) sees keys 0 .. prefix + i
                mask = torch.ones(T, prefix + T, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = cpu_ops.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = cpu_ops.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(cpu_ops.linear_relu_squared(x, self.c_fc.weight))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.lm_head = cpu_ops.Linear(config.n_embd, config.vocab_size)
        cos, sin = self._rotary_tables(ROTARY_HEADROOM * config.sequence_len, device=None)
        # not persistent: derived from the config, so checkpoints hold weights only
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._head_t: torch.Tensor | None = None  # see _head: a decoding-only copy, never saved
        self._head_t_key: tuple | None = None
        self.init_weights()

    def set_attention_dtype(self, dtype: str) -> None:
        """Training's attention dtype (trainer/precision.py attention_dtype): "float32" computes it in
        float32 under bf16 autocast; anything else leaves it to autocast. Decoding with a KV cache and
        runs without autocast are unaffected."""
        for block in self.blocks:
            block.attn.float32_attention = dtype == "float32"

    def _rotary_tables(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.config.head_dim
        inv_freq = 1.0 / (ROTARY_BASE ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        t = torch.arange(length, dtype=torch.float32, device=device)
        angles = torch.outer(t, inv_freq)[None, :, None, :]  # (1, T, 1, d/2) broadcasts over B and heads
        return angles.cos(), angles.sin()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Deterministic given torch.manual_seed. nanochat's scheme: embedding N(0, 1) (it is
        RMS-normed right away); input-side matrices uniform with std 1/sqrt(fan_in); the attention
        and MLP output projections zero, so every block starts as the identity and the residual
        stream is clean at step 0; lm_head N(0, 0.001) so the first predictions are near uniform."""
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_qkv, block.mlp.c_fc):
                bound = math.sqrt(3.0) / math.sqrt(lin.in_features)
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, loss_reduction: str = "mean", *,
                last_only: bool = False) -> torch.Tensor:
        """Loss (cross-entropy, targets of -1 ignored) when ``targets`` is given, else float32
        logits (B, T, vocab_size). With ``kv_cache``, ``idx`` continues the cached tokens.
        ``last_only`` returns the logits of the last position only, (B, 1, vocab_size): decoding
        needs no others, and for a prompt the head is a large share of the prefill."""
        B, T = idx.shape
        pos = kv_cache.pos if kv_cache is not None else 0
        if pos + T > self.cos.size(1):
            # grow past the precomputed length (a graph break under torch.compile; it is rare). Made
            # as normal tensors even under inference_mode, so later training can still use them.
            with torch.inference_mode(False):
                self.cos, self.sin = self._rotary_tables(max(2 * self.cos.size(1), pos + T), self.cos.device)
        cos, sin = self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]
        x = norm(self.wte(idx))
        for block in self.blocks:
            x = block(x, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        cap = self.config.softcap
        h = norm(x[:, -1:] if last_only and targets is None else x)
        if targets is not None and cpu_ops.fused_loss_applies(h, loss_reduction, cap):
            return cpu_ops.SoftcappedCrossEntropy.apply(h.reshape(-1, h.size(-1)), self.lm_head.weight,
                                                targets.reshape(-1), cap, loss_reduction, torch.is_grad_enabled())
        logits = self._head(h).float()
        logits = torch.tanh(logits / cap) * cap
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        w = self.lm_head.weight
        if h.size(0) * h.size(1) > 8 or torch.is_grad_enabled() or w.device.type != "cpu":
            return self.lm_head(h)
        # Decoding on CPU: the head is a matrix-vector product, and with the (vocab, n_embd) layout
        # torch's CPU kernels run it ~4x slower than with the transposed one (1.4-1.8 ms vs 0.4 ms at
        # vocab 8192, width 256, measured here) - the largest single cost of a decoding step. So
        # inference keeps one transposed copy (one more head's worth of memory), rebuilt whenever
        # the weight changes: optimizer steps and state-dict loads bump its version counter.
        key = (w.data_ptr(), w._version)
        if self._head_t_key != key:
            with torch.inference_mode(False):
                self._head_t = w.detach().t().contiguous()
            self._head_t_key = key
        return h @ self._head_t

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimizer: block matrices for Muon, embedding and lm_head for AdamW."""
        return {"matrix": list(self.blocks.parameters()), "embedding": [self.wte.weight],
                "lm_head": [self.lm_head.weight]}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> int:
        return sizing.flops_per_token(self.config.to_shape())

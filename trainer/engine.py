"""Batched decoding: many sequences of different lengths advanced together through one forward pass.

    engine = Engine(model)                    # a trained GPT (trainer/model.py), any device
    slot = engine.alloc()                     # a place in the static KV cache
    logits = engine.step([Chunk(slot, 0, prompt_ids)])  # prefill: float32 logits of the last token
    logits = engine.step([Chunk(slot, len(prompt_ids), [next_id]), Chunk(other, 17, [tok])])

The model server (``trainer/serve.py``, through ``trainer/batching.py``) and ``trainer/sample.py``
decode with this. It computes exactly what ``GPT.forward`` computes (tests hold every sequence's
logits to the single-sequence forward within 1e-4 in float32) but is built for inference:

- No autograd at all: plain tensor ops under ``torch.inference_mode``, on weights copied out of the
  model once (the model's own modules and ``trainer/cpu_ops.py``'s autograd functions never run).
- Tokens, not sequences, are the rows of every product: one step takes any mix of one-token decode
  chunks and multi-token prefill chunks, flattens their tokens into one (N, width) matrix for all the
  linear layers, and splits them only for attention. So a newcomer's prompt is prefilled in the same
  pass that advances everybody else by one token (continuous batching, chunked prefill). New
  prompts of one length (a burst of requests) share one causal attention call (``_attend_prompts``).
- A static KV cache, ``(layer, max_len, slot, kv_head, head_dim)``, allocated once (grown by doubling
  the slots when more sequences run at once), with a position per sequence: each chunk says which slot
  and position it continues. The one-token chunks of all decoding sequences share one attention call
  over the slots ``0..S-1`` (slots are handed out lowest first, so that range is dense) with a mask
  that hides each sequence's keys past its own position. Position-major, so that call reads the
  cache in its own order (see ``_attend_elementwise``).
- Fewer, fused ops per token: residual adds ride on the output products (``addmm``); the 1/softcap
  factor is folded into the head's weights; on CPU a norm feeding a product is a unit vector (3 ops,
  not 6) whose sqrt(width) is folded into that product's weights (and the query/key norms' into the
  attention scale); one stream decoding alone skips the many-chunk bookkeeping (``_decode_one``),
  and on CPU in float32 runs its whole token in one C call (``trainer/decode_one.c``, ``_NativeStep``),
  as does a step of up to 32 rows (streams decoding together, prompts joining them) where the C
  kernels won their probes (``_decode_rows``);
  queries and keys are normalised together and rotated with one complex multiply, which needs the
  channel pairs (i, i + d/2) of the model's rotary convention to sit side by side: the query and key
  rows of the fused QKV weight are permuted once (a permutation applied to both queries and keys
  changes neither RMSNorm nor their dot products).
- Products of several rows, and the decode attention of several rows, run on the kernels that are
  faster on this machine, timed when the engine is made (oneDNN on prepacked weights, torch.mm, or
  the C kernels on strip-major weights: ``_choose_products``; C, elementwise passes or batched
  products: ``_choose_attention``). The two CPUs this was tuned on disagree about both.

On CUDA the weights and the cache are bfloat16 (as the trainer's autocast runs them) and the logits
float32; on CPU everything is float32.
"""

from __future__ import annotations

import array
import ctypes
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from trainer import cpu_ops, native
from trainer.model import ROTARY_BASE, GPT

log = logging.getLogger(__name__)
_EPS = torch.finfo(torch.float32).eps  # what the model's RMSNorm uses


@dataclass
class Chunk:
    """Tokens of one sequence to run: ``tokens`` continue ``slot``'s cache at position ``start``.
    ``logits``: "last" (the next-token logits after the chunk), "all" (after every token of it, for
    scoring a prompt), or "none" (a prefill chunk that is not the prompt's last)."""

    slot: int
    start: int
    tokens: list[int]
    logits: str = "last"


class CacheFull(Exception):
    """No free slot in the KV cache (its size is bounded by ``max_slots``)."""


class Engine:
    """Inference for one GPT: its weights, a static KV cache and :meth:`step`. Not thread-safe: one
    thread (the model server's scheduler) drives it."""

    def __init__(self, model: GPT, *, max_slots: int = 16, max_len: int | None = None,
                 initial_slots: int = 4, max_cache_bytes: int | None = None, products: str = "auto",
                 attention: str = "auto", native: str = "auto"):
        model = getattr(model, "_orig_mod", model)
        c = model.config
        self.config = c
        self.device = model.lm_head.weight.device
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.max_len = int(max_len or c.sequence_len)
        self.max_slots = max(1, int(max_slots))
        self.H, self.Hkv, self.d = c.n_head, c.n_kv_head, c.head_dim
        self.q_dim, self.kv_dim = self.H * self.d, self.Hkv * self.d
        self._norm = _Norm(self.device, self.dtype)
        # On CPU in float32 a norm that feeds a product is a unit vector (:func:`_unit`), its sqrt(n) is
        # folded into the product's weights (and the query/key norms' into the attention scale): 3 ops
        # a norm instead of 6, 13 norms a token at depth 4. Elsewhere the norms are the model's.
        self.fold = self._norm.fast
        self._in = _unit if self.fold else self._norm
        # scores = rms(q) . rms(k) / sqrt(d) = sqrt(d) * unit(q) . unit(k): the cache holds unit keys
        self.scale = self.d ** 0.5 if self.fold else self.d ** -0.5
        if max_cache_bytes is not None:  # a big model's cache: fewer sequences at once, never an OOM
            self.max_slots = max(1, min(self.max_slots, int(max_cache_bytes) // self.cache_bytes_per_slot()))
        if products not in ("auto", "packed", "plain", "strips"):
            raise ValueError(f"products must be auto, packed, plain or strips, not {products!r}")
        if attention not in ("auto", "native", "elementwise", "batched"):
            raise ValueError(f"attention must be auto, native, elementwise or batched, not {attention!r}")
        if native not in ("auto", "off"):
            raise ValueError(f"native must be auto or off, not {native!r}")
        self._load_weights(model, pack=products in ("auto", "packed") and self.max_slots > 1)
        self._rotary(self.max_len)
        n = min(self.max_slots, max(1, initial_slots))
        shape = (c.n_layer, self.max_len, n, self.Hkv, self.d)
        self.k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self._free = list(range(n))
        self._used: set[int] = set()
        self._scratch = torch.empty(0, device=self.device, dtype=self.dtype)
        # C kernels (trainer/decode_one.c) where they build and agree with the torch ops here: one stream
        # decoding alone is one C call a token (else _decode_torch; ``decode_one`` says which runs); in
        # a step of many rows the norms, rotation, cache writes and ReLU^2 are C calls, and so is the
        # decode attention where it wins the probe below
        self._native: _NativeStep | None = None
        self.native_reason = "turned off"
        self.decode_one_probe_ms: dict[str, float] | None = None
        if native == "auto":
            self._native, self.native_reason, self.decode_one_probe_ms = _NativeStep.make(self)
        probe = self.decode_one_probe_ms
        self.decode_one = "native" if probe is not None and probe["native"] <= probe["torch"] else "torch"
        if self._native is not None:
            self._in = self._native.unit
        elif attention == "native" or products == "strips":
            which = "attention='native'" if attention == "native" else "products='strips'"
            raise ValueError(f"{which} needs the C kernels, which are not available here: {self.native_reason}")
        # products of several rows: "packed" (oneDNN on reordered weights), "plain" (torch.mm on the
        # (in, out) layout), "strips" (C on strip-major copies), or "unpacked" (no second copy could be
        # made: _Weight's own choice per call)
        self.probe_ms: dict[str, float] | None = None
        self.products = self._settle_products(products)
        # decode attention of several rows: "native" (C, per row), or on CPU float32 "elementwise" or
        # "batched" (see _decode_plan)
        self.attention = attention
        self.attention_probe_ms: dict[str, float] | None = None
        if attention == "auto":
            elementwise_applies = self.device.type == "cpu" and self.dtype == torch.float32
            self.attention = self._choose_attention() if elementwise_applies and self.max_slots > 1 else "batched"
        # a step of up to STRIP_MAX_ROWS rows (streams decoding together, prompts joining them) is one
        # C call where both of its kernels won their probes: the strips' products and the C attention
        # (``_decode_rows``)
        self.decode_rows = self.products == "strips" and self.attention == "native"
        # a longer step as C calls of up to STRIP_MAX_ROWS rows each, where that was faster than
        # step()'s torch products when timed now (``_choose_split``)
        self.split_rows = False
        self.split_probe_ms: dict[str, float] | None = None
        if self.decode_rows:
            self._native.use_strips(self)
            self.split_rows = self._choose_split()

    # --- weights --------------------------------------------------------------------------------
    @torch.no_grad()
    def _load_weights(self, model: GPT, pack: bool) -> None:
        d = self.d
        # within each head, channel j of the new order is channel perm[j] of the model's: pairs (i, i + d/2)
        # become adjacent (2i, 2i + 1), the layout a complex view rotates in one multiply
        perm = torch.stack((torch.arange(d // 2), torch.arange(d // 2) + d // 2), dim=1).reshape(-1)
        qk_heads = self.H + self.Hkv
        row_perm = (torch.arange(qk_heads)[:, None] * d + perm[None, :]).reshape(-1)
        row_perm = torch.cat((row_perm, torch.arange(qk_heads * d, qk_heads * d + self.kv_dim))).to(self.device)

        def w(t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            t = t.detach()
            return (t.float() * scale if scale != 1.0 else t).to(self.dtype).contiguous()

        # Weights reordered for oneDNN may pay off over many steps of several rows (a server's batches,
        # see _choose_products); an engine of one slot (trainer.sample, made anew while the weights
        # train) multiplies many rows only in its one prefill, where reordering ~15 ms of weights at
        # depth 4 costs more than it saves: ``pack`` is false there.
        # the products after a norm take its sqrt(width) factor (see __init__)
        s = math.sqrt(self.config.n_embd) if self.fold else 1.0
        self.wte = w(model.wte.weight)
        self.layers = []
        for block in model.blocks:
            self.layers.append((_Weight(w(block.attn.c_qkv.weight.index_select(0, row_perm), s), pack),
                                _Weight(w(block.attn.c_proj.weight), pack), _Weight(w(block.mlp.c_fc.weight, s), pack),
                                _Weight(w(block.mlp.c_proj.weight), pack)))
        self.softcap = float(self.config.softcap)
        # (the head's weights carry 1/softcap: logits = softcap * tanh(h W^T / softcap), one pass fewer)
        self.head = _Weight(w(model.lm_head.weight, s / self.softcap), pack)

    # --- which kernels run the products of several rows --------------------------------------------
    PROBE_ROUNDS = 7
    PROBE_BUDGET_S = 1.0  # a big model's probe stops after 3 rounds once it has taken this long

    def _weights(self) -> list["_Weight"]:
        return [w for layer in self.layers for w in layer] + [self.head]

    def _probe(self, runs: dict[str, Callable[[], object]]) -> dict[str, float]:
        """The median milliseconds of each of ``runs`` (one kernel choice each), after one unkept call
        each (first calls pay one-time costs), rounds interleaved so a busy moment slows them all:
        PROBE_ROUNDS rounds, or 3 once they have taken PROBE_BUDGET_S (a big model's)."""
        for run in runs.values():
            run()
        times: dict[str, list[float]] = {kind: [] for kind in runs}
        started = time.perf_counter()
        for i in range(self.PROBE_ROUNDS):
            for kind, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[kind].append(time.perf_counter() - t0)
            if i >= 2 and time.perf_counter() - started > self.PROBE_BUDGET_S:
                break
        return {kind: round(sorted(v)[len(v) // 2] * 1000, 3) for kind, v in times.items()}

    def _settle_products(self, products: str) -> str:
        """Which kernels run the products of several rows (``products``: the caller's choice, or
        "auto": timed by :meth:`_choose_products` where there is a choice), with the second copies of
        the weights the others would use freed."""
        weights = self._weights()
        packed = all(w.packed is not None for w in weights)
        strips = (self._native is not None and self.max_slots > 1 and products in ("auto", "strips")
                  and all(w.second for w in weights))
        if products == "strips" and not strips:
            raise ValueError("products='strips' needs an engine of several slots on weights of at most "
                             f"{_Weight.BOTH_LAYOUTS_MAX_BYTES >> 20} MB a matrix")
        if strips:
            for w in weights:
                w.strip_mm = self._native.strip_product(w.t)
        kinds = ["packed"] * packed + ["strips"] * strips
        if products == "auto":
            chosen = self._choose_products(kinds + ["plain"]) if kinds else "unpacked"
        elif products == "packed":
            chosen = "packed" if packed else "unpacked"
        else:
            chosen = products
        for w in weights:
            if chosen != "packed":
                w.packed = None
            if chosen != "strips":
                w.strip_mm = None
            if chosen in ("plain", "strips"):
                w.w = None  # every product of few rows or many on (in, out) or the strips
        return chosen

    def _choose_products(self, kinds: list[str]) -> str:
        """Of ``kinds``, the kernels that run a step's products fastest here, timed now on this
        engine's weights (the first listed on a tie): "packed" (oneDNN on weights reordered once into
        its blocked layout), "strips" (C on strip-major copies, see ``ncs_mm_strips``), "plain"
        (torch.mm on the (in, out) layout, MKL's kernels). None wins everywhere: at 16 rows on a
        depth-4 model, the 17 products of a step took 1.6 ms packed on an AMD EPYC (Zen 4), ~1.4x less
        than torch.mm; on an Intel Xeon 1.5 ms plain against 2.1 packed and 1.05 strips. The probe runs
        every product once per round at the batch this engine is built for (up to 16 rows), the weights
        streaming through the caches as in a step: ~60 ms at load for a depth-4 model."""
        weights = self._weights()
        rows = min(16, self.max_slots)
        gen = torch.Generator().manual_seed(0)
        pairs = [(w, torch.randn(rows, w.t.size(0), generator=gen, dtype=self.dtype)) for w in weights]
        runs = {"packed": lambda: [cpu_ops.mm_packed(a, w.packed) for w, a in pairs],
                "strips": lambda: [w.strip_mm(a) for w, a in pairs],
                "plain": lambda: [torch.mm(a, w.t) for w, a in pairs]}
        with torch.inference_mode():
            self.probe_ms = self._probe({kind: runs[kind] for kind in kinds})
        return min(self.probe_ms, key=self.probe_ms.get)  # the first listed on a tie

    def _choose_attention(self) -> str:
        """"elementwise" or "batched" decode attention for several rows, whichever is faster here,
        timed now (elementwise on a tie): the one-query-a-row attention over a cold cache is
        memory-bound, and the two read it differently. On an AMD EPYC (Zen 4) the elementwise passes
        took ~40% less than batched products (16 sequences, 40-73 keys, the cache flushed between
        calls); on an Intel Xeon the batched products were faster (a 16-row depth-4 step 2.18 against
        2.47 ms). The probe: 16 rows (or this engine's slots) at 64 positions with mixed lengths (so a
        mask applies, as in serving), over up to 4 layers' worth of random keys and values (more than
        the L2 cache holds at depth 4, as in a step)."""
        span, length = min(16, self.max_slots), min(64, self.max_len)
        gen = torch.Generator().manual_seed(0)
        layers = [(torch.randn(length, span, self.Hkv, self.d, generator=gen),
                   torch.randn(length, span, self.Hkv, self.d, generator=gen))
                  for _ in range(min(4, self.config.n_layer))]
        q = torch.randn(span, self.H, self.d, generator=gen)
        rows = [Chunk(i, length - 1 - i % 4, [0]) for i in range(span)]

        def run(kind: str):
            plan = self._decode_plan(rows, kind)
            return lambda: [self._attend_decode(q, k, v, plan) for k, v in layers]

        runs = {kind: run(kind) for kind in ("elementwise", "batched")}
        if self._native is not None:  # C: each row over its own sequence's keys (it also norms, rotates
            # and writes the rows' keys and values, which the other two leave out)
            qkv = torch.randn(span, self.q_dim + 2 * self.kv_dim, generator=gen)
            slot_t = torch.arange(span)
            pos_t = torch.tensor([c.start for c in rows])
            runs = {"native": lambda: [self._native.layer_rows(self, 0, qkv, slot_t, pos_t, span, k, v)
                                       for k, v in layers], **runs}
        with torch.inference_mode():
            self.attention_probe_ms = self._probe(runs)
        return min(self.attention_probe_ms, key=self.attention_probe_ms.get)  # the first listed on a tie

    def _choose_split(self) -> bool:
        """Whether a step of more rows than one C call takes (``STRIP_MAX_ROWS``) runs faster as several
        such calls than as step()'s torch products, timed now on a prompt of twice that many tokens (or
        the context) in slot 0, free while the engine is made (its cache is left zeroed, as found).
        The calls avoid ~100 torch calls a step, but their products lose to MKL's on many rows of a big
        model: at depth 4 a 52-row step ran 1.55x faster split, at depth 12 1.2x slower (Intel Xeon)."""
        n = min(2 * _Weight.STRIP_MAX_ROWS, self.max_len)
        if n <= _Weight.STRIP_MAX_ROWS:
            return False  # no step is ever longer than one call
        tokens = [t % self.wte.size(0) for t in range(1, n + 1)]
        slot = self.alloc()
        try:
            chunk = [Chunk(slot, 0, tokens, "last")]
            with torch.inference_mode():
                self.split_probe_ms = self._probe({"torch": lambda: self._step(chunk),
                                                   "split": lambda: self._split_rows(chunk)})
        finally:
            self.k[:, :n, slot] = 0
            self.v[:, :n, slot] = 0
            self.release(slot)
        return self.split_probe_ms["split"] < self.split_probe_ms["torch"]

    def _rotary(self, length: int) -> None:
        # the same angles as GPT._rotary_tables, as unit complex numbers: e^{i angle} rotates a pair
        inv_freq = 1.0 / (ROTARY_BASE ** (torch.arange(0, self.d, 2, dtype=torch.float32) / self.d))
        angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
        # the model computes cos and sin in float32 and rounds them to its activations' dtype
        cos, sin = angles.cos().to(self.dtype).float(), angles.sin().to(self.dtype).float()
        self.freqs = torch.complex(cos, sin).to(self.device)  # (length, d/2)

    # --- slots ----------------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        """Slots allocated now (grows by doubling up to ``max_slots``)."""
        return self.k.size(2)

    def free_slots(self) -> int:
        return self.max_slots - len(self._used)

    def alloc(self) -> int:
        """A free slot, lowest first (keeps the decode range dense). Raises CacheFull."""
        if not self._free:
            if self.slots >= self.max_slots:
                raise CacheFull(f"all {self.max_slots} KV cache slots are in use")
            self._grow(min(self.max_slots, 2 * self.slots))
        slot = min(self._free)
        self._free.remove(slot)
        self._used.add(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot in self._used:
            self._used.remove(slot)
            self._free.append(slot)

    def _grow(self, n: int) -> None:
        old = self.slots
        for name in ("k", "v"):
            t = getattr(self, name)
            new = torch.zeros((*t.shape[:2], n, *t.shape[3:]), device=self.device, dtype=self.dtype)
            new[:, :, :old] = t
            setattr(self, name, new)
        self._free.extend(range(old, n))

    def cache_bytes_per_slot(self) -> int:
        return 2 * self.config.n_layer * self.kv_dim * self.max_len * (2 if self.dtype == torch.bfloat16 else 4)

    # --- the forward pass -----------------------------------------------------------------------
    def step(self, chunks: list[Chunk]) -> list[torch.Tensor | None]:
        """Run ``chunks`` (at most one per slot) and return, per chunk, its float32 logits: (V,) for
        "last", (len(tokens), V) for "all", None for "none". Raises ValueError for a chunk that does
        not fit its slot's cache."""
        if not chunks:
            return []
        if len(chunks) == 1 and len(chunks[0].tokens) == 1 and chunks[0].logits == "last":
            return [self._decode_one(chunks[0])]
        if self.decode_rows:
            if len({c.slot for c in chunks}) != len(chunks):
                raise ValueError("a step takes at most one chunk per slot")
            rows = sum(len(c.tokens) for c in chunks)
            if rows <= _Weight.STRIP_MAX_ROWS:
                return self._decode_rows(chunks)
            if self.split_rows:
                return self._split_rows(chunks)
        return self._step(chunks)

    def _split_rows(self, chunks: list[Chunk]) -> list[torch.Tensor | None]:
        """A step of more than ``STRIP_MAX_ROWS`` rows as C calls of up to that many each (the rows in
        order, a chunk cut where a call fills up: its first part leaves its keys and values in the
        cache for the next call's rows to attend to). Each chunk's logits as :meth:`step` gives them."""
        for c in chunks:  # (every chunk checked before any call writes the cache)
            self._check(c)
            if not all(0 <= t < self.wte.size(0) for t in c.tokens):
                raise ValueError(f"a token of the chunk at slot {c.slot} is out of range")
        calls: list[list[Chunk]] = [[]]
        owners: list[list[int]] = [[]]  # per call, the index in ``chunks`` of each of its pieces
        room = _Weight.STRIP_MAX_ROWS
        for i, c in enumerate(chunks):
            start, tokens = c.start, c.tokens
            while tokens:
                if room == 0:
                    calls.append([])
                    owners.append([])
                    room = _Weight.STRIP_MAX_ROWS
                take = min(room, len(tokens))
                end = take == len(tokens)
                calls[-1].append(Chunk(c.slot, start, tokens[:take], c.logits if end or c.logits == "all" else "none"))
                owners[-1].append(i)
                start, tokens, room = start + take, tokens[take:], room - take
        parts: list[list[torch.Tensor]] = [[] for _ in chunks]
        for call, who in zip(calls, owners):
            for i, logits in zip(who, self._decode_rows(call)):
                if logits is not None:
                    parts[i].append(logits)
        out: list[torch.Tensor | None] = []
        for c, got in zip(chunks, parts):
            if c.logits == "none":
                out.append(None)
            elif c.logits == "last":
                out.append(got[-1])
            else:
                out.append(got[0] if len(got) == 1 else torch.cat(got))
        return out

    def _decode_rows(self, chunks: list[Chunk]) -> list[torch.Tensor | None]:
        """A step of at most ``STRIP_MAX_ROWS`` rows in all as one C call (``ncs_decode_rows``): streams
        decoding together, prompts (or pieces of them) joining, or both. :meth:`_step`'s arithmetic on
        the kernels it would run (the strips' products, the C attention), without its ~100 calls a
        step; and only the rows whose logits are wanted go through the last layer's output product
        and MLP and the head (a prompt's other rows only leave their keys and values). One chunk per
        slot (:meth:`step` checks)."""
        slots: list[int] = []
        positions: list[int] = []
        tokens: list[int] = []
        out_rows: list[int] = []
        spans: list[tuple[int, int] | None] = []  # per chunk: (its first row of the logits, how many)
        for c in chunks:
            self._check(c)
            first, t = len(tokens), len(c.tokens)
            slots += [c.slot] * t
            positions += range(c.start, c.start + t)
            tokens += c.tokens
            if c.logits == "none":
                spans.append(None)
                continue
            spans.append((len(out_rows), t if c.logits == "all" else 1))
            out_rows += range(first, first + t) if c.logits == "all" else [first + t - 1]
        logits = self._native.decode_rows(self, slots, positions, tokens, out_rows)
        return [None if span is None else logits[span[0]] if c.logits == "last" else logits[span[0]:span[0] + span[1]]
                for c, span in zip(chunks, spans)]

    @torch.inference_mode()
    # The engine keeps its own dtypes (above); a CPU bf16 autocast around the caller (the trainer's
    # samples under --dtype bfloat16) must not re-type its products behind its back.
    @torch.autocast("cpu", enabled=False)
    def _step(self, chunks: list[Chunk]) -> list[torch.Tensor | None]:
        decode = sorted((c for c in chunks if len(c.tokens) == 1), key=lambda c: c.slot)
        # prefill chunks: whole prompts of one length side by side (they share one attention call, see
        # _prefill_groups), the rest after them
        prefill = sorted((c for c in chunks if len(c.tokens) > 1), key=lambda c: (c.start != 0, len(c.tokens)))
        order = decode + prefill  # the flat row order: decode rows by slot, then each prefill chunk
        tokens, slots, pos = [], [], []
        for c in order:
            self._check(c)
            tokens.extend(c.tokens)
            slots.extend([c.slot] * len(c.tokens))
            pos.extend(range(c.start, c.start + len(c.tokens)))
        dev = self.device
        idx = torch.tensor(tokens, dtype=torch.long, device=dev)
        slot_t = torch.tensor(slots, dtype=torch.long, device=dev)
        pos_t = torch.tensor(pos, dtype=torch.long, device=dev)
        native = self._native
        c_attend = len(decode) if native is not None and self.attention == "native" else 0
        if native is None:
            # each row's place in a layer's cache viewed as (max_len * slots, kv_head, d)
            flat_t = pos_t * self.slots + slot_t
            freqs = self.freqs.index_select(0, pos_t).unsqueeze(1)  # (N, 1, d/2)
        dec_attn = None if c_attend else self._decode_plan(decode)
        groups = self._prefill_groups(prefill)
        n = len(tokens)
        lone = order[0] if len(order) == 1 else None
        x = self._norm(F.embedding(idx, self.wte))
        for layer, (w_qkv, w_o, w_fc, w_down) in enumerate(self.layers):
            qkv = w_qkv.mm(self._in(x))
            kc, vc = self.k[layer], self.v[layer]
            v = qkv[:, self.q_dim + self.kv_dim:].view(n, self.Hkv, self.d)
            if native is not None:  # one C call: norms, rotation, cache writes (and decode attention)
                y_dec = native.layer_rows(self, layer, qkv, slot_t, pos_t, c_attend)
                q = qkv[:, : self.q_dim].view(n, self.H, self.d)
                k = qkv[:, self.q_dim: self.q_dim + self.kv_dim].view(n, self.Hkv, self.d)
            else:
                qk = self._qk(qkv, freqs)
                q, k = qk[:, : self.H], qk[:, self.H:]
                if lone is not None:  # one chunk (one stream decoding): a slice copy, not an index_put
                    kc[lone.start:lone.start + n, lone.slot] = k
                    vc[lone.start:lone.start + n, lone.slot] = v
                else:
                    kc.view(-1, self.Hkv, self.d).index_copy_(0, flat_t, k)
                    vc.view(-1, self.Hkv, self.d).index_copy_(0, flat_t, v)
            parts = []
            if c_attend:
                parts.append(y_dec)
            elif decode:
                parts.append(self._attend_decode(q[: len(decode)], kc, vc, dec_attn))
            row = len(decode)
            for group in groups:
                t = len(group[0].tokens)
                if len(group) > 1:
                    rows = slice(row, row + len(group) * t)
                    parts.append(self._attend_prompts(q[rows], k[rows], v[rows], len(group), t))
                else:
                    parts.append(self._attend_prefill(q[row:row + t], kc, vc, group[0]))
                row += len(group) * t
            y = parts[0] if len(parts) == 1 else torch.cat(parts)
            x = self._mlp(w_o.addmm(x, y), w_fc, w_down)
        return self._logits(x, order, chunks)

    def _check(self, c: Chunk) -> None:
        if c.slot not in self._used:
            raise ValueError(f"slot {c.slot} is not allocated")
        if c.start < 0 or c.start + len(c.tokens) > self.max_len:
            raise ValueError(f"chunk of {len(c.tokens)} tokens at {c.start} overflows the cache ({self.max_len})")

    def _qk(self, qkv: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """Queries and keys of the rows of ``qkv``, normed and rotated: (rows, H + Hkv, d)."""
        n, heads = qkv.size(0), self.H + self.Hkv
        qk = self._in(qkv[:, : self.q_dim + self.kv_dim].view(n, heads, self.d))
        qk = torch.view_as_real(torch.view_as_complex(qk.float().view(n, -1, self.d // 2, 2)) * freqs)
        return qk.view(n, heads, self.d).to(self.dtype)

    def _mlp(self, x: torch.Tensor, w_fc: "_Weight", w_down: "_Weight") -> torch.Tensor:
        """x plus the block's MLP of x (the residual add rides on the down projection)."""
        h = w_fc.mm(self._in(x))
        return w_down.addmm(x, self._native.relu2(h) if self._native is not None else torch.relu_(h).square_())

    def _decode_one(self, c: Chunk) -> torch.Tensor:
        """One stream decoding alone (sample.py, a lone chat): one C call (:class:`_NativeStep`) where
        it built and was faster when timed, else :meth:`_decode_torch`."""
        self._check(c)
        slot, p, token = c.slot, c.start, c.tokens[0]
        if not 0 <= token < self.wte.size(0):
            raise ValueError(f"token {token} is outside the vocabulary of {self.wte.size(0)}")
        if self.decode_one == "native":  # (the C call needs neither of step's modes: ~25 us a token)
            return self._native(self, slot, p, token)
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
            return self._decode_torch(slot, p, token)

    def _decode_torch(self, slot: int, p: int, token: int) -> torch.Tensor:
        """:meth:`step`'s arithmetic for one token, op for op, without its bookkeeping for many chunks
        (no index tensors, no row plan, no mask, views instead of gathers)."""
        H, Hkv, d, qk_dim = self.H, self.Hkv, self.d, self.q_dim + self.kv_dim
        freqs = self.freqs[p:p + 1].unsqueeze(1)  # (1, 1, d/2)
        x = self._norm(self.wte[token:token + 1])
        for layer, (w_qkv, w_o, w_fc, w_down) in enumerate(self.layers):
            qkv = w_qkv.mm(self._in(x))
            qk = self._qk(qkv, freqs)[0]  # (H + Hkv, d)
            kc, vc = self.k[layer][:, slot], self.v[layer][:, slot]  # (max_len, Hkv, d)
            kc[p] = qk[H:]
            vc[p] = qkv[0, qk_dim:].view(Hkv, d)
            y = F.scaled_dot_product_attention(qk[None, :H, None], kc[:p + 1].transpose(0, 1)[None],
                                               vc[:p + 1].transpose(0, 1)[None],
                                               enable_gqa=Hkv != H, scale=self.scale)
            x = self._mlp(w_o.addmm(x, y.view(1, self.q_dim)), w_fc, w_down)
        return torch.tanh_(self.head.mm(self._in(x)).float()).mul_(self.softcap)[0]

    # the decode attention's temporaries stay under this (see _attend_decode); past it, batched products
    EW_MAX_BYTES = 16 << 20

    def _decode_plan(self, decode: list[Chunk], attention: str | None = None):
        """What the decode rows' shared attention needs, computed once per step for every layer:
        (number of slots S in the range, key length L, mask or None, row slots if not 0..S-1, whether
        to use the elementwise kernel: where ``attention`` (the engine's choice unless given) says so
        and its temporaries stay small)."""
        if not decode:
            return None
        span = decode[-1].slot + 1
        length = max(c.start for c in decode) + 1
        dense = span == len(decode)
        if span == 1:
            return span, length, None, None, False
        elementwise = ((attention or self.attention) == "elementwise" and self.device.type == "cpu"
                       and self.dtype == torch.float32 and length * span * self.q_dim * 4 <= self.EW_MAX_BYTES)
        rows = None if dense else torch.tensor([c.slot for c in decode], dtype=torch.long, device=self.device)
        if dense and all(c.start == length - 1 for c in decode):
            return span, length, None, rows, elementwise  # all at the same position: nothing to hide
        # each slot's row sees its keys 0..start; slots in the range without a decode row see key 0 only
        # (their output is discarded; a fully masked row would be NaN)
        starts = [0] * span  # (a list, then one tensor: a tensor store per row was ~3 us each)
        for c in decode:
            starts[c.slot] = c.start
        limit = torch.tensor(starts)
        if elementwise:  # added to the scores (length, span, kv_head * group)
            hidden = torch.arange(length)[:, None, None] > limit[None, :, None]
            mask = torch.zeros(length, span, 1).masked_fill_(hidden, float("-inf"))
        else:  # added to the scores (span * kv_head, group, length), one row per (slot, kv_head) pair
            hidden = torch.arange(length)[None, :] > limit[:, None]
            mask = torch.zeros(span, length).masked_fill_(hidden, float("-inf"))
            mask = mask.to(self.device, self.dtype).repeat_interleave(self.Hkv, dim=0)[:, None, :]
        return span, length, mask, rows, elementwise

    def _attend_decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, plan) -> torch.Tensor:
        span, length, mask, rows, elementwise = plan
        k, v = kc[:length, :span], vc[:length, :span]  # (length, span, kv_head, d)
        if span == 1:  # one sequence, nothing to hide: SDPA's kernel is the quickest here
            y = F.scaled_dot_product_attention(q.unsqueeze(2), k[:, 0].transpose(0, 1)[None],
                                               v[:, 0].transpose(0, 1)[None],
                                               enable_gqa=self.Hkv != self.H, scale=self.scale)
            return y.reshape(1, self.q_dim)
        if rows is not None:  # holes in the slot range: place each row's query at its slot
            q = q.new_zeros(span, self.H, self.d).index_copy_(0, rows, q)
        g, b = self.H // self.Hkv, span * self.Hkv
        if elementwise:
            y = self._attend_elementwise(q.reshape(b, g, self.d), k, v, mask, length, b, g)
        else:
            # Batched products, the (slot, kv_head) pairs the batch: the cache slice views as (b, length, d)
            # without a copy. Query heads sharing a key/value head are grouped, so GQA copies nothing.
            qb = q.reshape(b, g, self.d)
            kt = k.reshape(length, b, self.d).permute(1, 2, 0)
            if mask is None:
                scores = torch.bmm(qb, kt).mul_(self.scale)
            else:
                scores = torch.baddbmm(mask, qb, kt, alpha=self.scale)
            y = torch.bmm(torch.softmax(scores, dim=-1), v.reshape(length, b, self.d).transpose(0, 1))
        y = y.reshape(span, self.q_dim)
        return y if rows is None else y.index_select(0, rows)

    def _attend_elementwise(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, length: int,
                            b: int, g: int) -> torch.Tensor:
        """Attention of one query per (slot, kv_head) pair ``b`` (``g`` query heads each) over the
        position-major cache slice, as two streaming passes of products and sums. On CPU one query per
        row is memory-bound: the keys and values of 16 sequences are megabytes a layer, mostly out of
        cache after a step's weights went through. Read in the cache's own order (position by
        position, every sequence's keys side by side) they stream; batched products read them sequence
        by sequence, ~1.6x slower measured here. The temporaries live in one scratch buffer, reused."""
        d = self.d
        need = length * b * g * (d + 1)
        if self._scratch.numel() < need:
            self._scratch = torch.empty(need, device=self.device, dtype=self.dtype)
        prod = self._scratch[: length * b * g * d].view(length, b, g, d)
        scores = self._scratch[length * b * g * d: need].view(length, b, g)
        torch.mul(k.reshape(length, b, 1, d), q.mul(self.scale), out=prod)
        torch.sum(prod, -1, out=scores)
        if mask is not None:
            scores.view(length, -1, self.Hkv * g).add_(mask)
        p = torch.softmax(scores, dim=0)
        torch.mul(v.reshape(length, b, 1, d), p.unsqueeze(-1), out=prod)
        return prod.sum(0)

    @staticmethod
    def _prefill_groups(prefill: list[Chunk]) -> list[list[Chunk]]:
        """``prefill`` (in row order) as runs of whole prompts (start 0) of one length, each run one
        attention call; every other chunk alone."""
        groups: list[list[Chunk]] = []
        for c in prefill:
            last = groups[-1][0] if groups else None
            if last is not None and c.start == 0 and last.start == 0 and len(c.tokens) == len(last.tokens):
                groups[-1].append(c)
            else:
                groups.append([c])
        return groups

    def _attend_prompts(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, t: int) -> torch.Tensor:
        """Causal attention of ``b`` whole prompts of ``t`` tokens each, side by side in the rows of this
        step: their keys and values are this step's own rows (what was just written to the cache), so
        one batched call serves them all. A 16-prompt prefill made 16 calls a layer before, each with
        its views of the cache: ~20% of that step's time at depth 4."""
        q = q.view(b, t, self.H, self.d).transpose(1, 2)
        k = k.reshape(b, t, self.Hkv, self.d).transpose(1, 2)
        v = v.reshape(b, t, self.Hkv, self.d).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.Hkv != self.H, scale=self.scale)
        return y.transpose(1, 2).reshape(b * t, self.q_dim)

    def _attend_prefill(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, c: Chunk) -> torch.Tensor:
        t, end = len(c.tokens), c.start + len(c.tokens)
        q = q.transpose(0, 1).unsqueeze(0)  # (1, H, t, d)
        k, v = kc[:end, c.slot].transpose(0, 1)[None], vc[:end, c.slot].transpose(0, 1)[None]
        gqa = self.Hkv != self.H
        if c.start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=self.scale)
        else:  # query i (position start + i) sees keys 0 .. start + i (the cached prefix and itself)
            mask = torch.ones(t, end, dtype=torch.bool, device=self.device).tril(diagonal=c.start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=self.scale)
        return y[0].transpose(0, 1).reshape(t, self.q_dim)

    def _logits(self, x: torch.Tensor, order: list[Chunk], chunks: list[Chunk]) -> list[torch.Tensor | None]:
        rows, spans, row = [], {}, 0
        for c in order:
            t = len(c.tokens)
            if c.logits == "all":
                spans[id(c)] = (len(rows), t)
                rows.extend(range(row, row + t))
            elif c.logits == "last":
                spans[id(c)] = (len(rows), 1)
                rows.append(row + t - 1)
            row += t
        if not rows:
            return [None] * len(chunks)
        h = x if len(rows) == x.size(0) else x.index_select(0, torch.tensor(rows, device=self.device))
        z = self.head.mm(self._in(h))
        logits = torch.tanh_(z.float()).mul_(self.softcap)
        out = []
        for c in chunks:
            span = spans.get(id(c))
            if span is None:
                out.append(None)
            elif c.logits == "last":
                out.append(logits[span[0]])
            else:
                out.append(logits[span[0]:span[0] + span[1]])
        return out


class _NativeStep:
    """The engine's C kernels (``trainer/decode_one.c``, CPU float32, the folded norms). Called, it is
    :meth:`Engine._decode_torch` as one C call: those ~20 small torch ops a layer cost ~0.7 ms a token
    at depth 4, about as much as the token's products. For steps of many rows: :meth:`layer_rows`,
    :meth:`unit`, :meth:`relu2`, products on strip-major copies (:meth:`strip_product`) and, where
    those won, a whole step of up to 32 rows (:meth:`decode_rows`). It reads the engine's weights
    and writes its cache in place (pointers taken here: the weights never move; the cache is passed
    each call, it moves when it grows)."""

    # per model shape (dims), once per process: (the probe's timings, or None if the check failed; the
    # largest logit gap found)
    checked: dict[tuple[int, ...], tuple[dict[str, float] | None, float]] = {}

    @classmethod
    def make(cls, engine: "Engine") -> tuple["_NativeStep | None", str, dict[str, float] | None]:
        """(the step, how its library was had, the one-row probe's timings), or (None, why not, None).
        Before the library is used for a model shape, once per process, it must give the torch ops'
        logits within 1e-4 (the engine's promise) for two tokens (a miscompiled or mismatched library
        is left out), and its one-row step is timed against the torch ops' (Engine._probe): the
        engine decodes a lone row with the faster. Once, because engines of a model being trained
        are made often and the check and probe cost ~20 ms at depth 4."""
        if not (engine.fold and engine.device.type == "cpu"):
            return None, "only on CPU in float32", None
        lib, how = native.load("decode_one")
        if lib is None:
            return None, how, None
        step = cls(engine, lib)
        shape = tuple(step.dims.tolist())
        if shape not in cls.checked:
            cls.checked[shape] = cls._check_and_time(engine, step)
        probe, gap = cls.checked[shape]
        if probe is None:
            return None, f"{how}, but its logits differ from the torch ops' by {gap:.3g}: not used", None
        return step, how, probe

    @staticmethod
    def _check_and_time(engine: "Engine", step: "_NativeStep") -> tuple[dict[str, float] | None, float]:
        # slot 0 is free while the engine is made: whatever is written there is overwritten before use
        gap = 0.0
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
            positions = ((0, 1), (1, 2))[:engine.max_len]
            for pos, token in positions:
                want = engine._decode_torch(0, pos, token)
                gap = max(gap, float((step(engine, 0, pos, token) - want).abs().max()))
            if gap <= 1e-4:
                pos, token = positions[-1]
                probe = engine._probe({"native": lambda: step(engine, 0, pos, token),
                                       "torch": lambda: engine._decode_torch(0, pos, token)})
            engine.k[:, :2, 0] = 0  # (the slot is left as it was found)
            engine.v[:, :2, 0] = 0
        if not gap <= 1e-4:
            log.warning("trainer/decode_one.c gives logits %.3g away from the torch ops': not used", gap)
            return None, gap
        return probe, gap

    def __init__(self, engine: "Engine", lib: ctypes.CDLL):
        ptr, i64, status = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int

        def bind(name: str, argtypes: list, restype: type | None) -> Callable:
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
            return fn

        self.fn = bind("ncs_decode_one", [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ptr, ptr], status)
        self.layer_fn = bind("ncs_layer_rows",
                             [ptr, ptr, ptr, i64, ptr, i64, ptr, ptr, i64, ptr, ptr, ptr, i64, ptr, ptr], status)
        self.unit_fn = bind("ncs_unit_rows", [ptr, ptr, i64, i64, ctypes.c_float], None)
        self.relu2_fn = bind("ncs_relu2", [ptr, i64], None)
        self.rows_fn = bind("ncs_decode_rows",
                            [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr], status)
        self.rows_work_fn = bind("ncs_decode_rows_floats", [ptr, i64], i64)
        self.pack_fn = bind("ncs_pack_strips", [ptr, ptr, i64, i64], None)
        self.strips_fn = bind("ncs_mm_strips", [ptr, ptr, ptr, ptr, i64, i64, i64, ptr], None)
        strip_dims = torch.empty(2, dtype=torch.int64)
        bind("ncs_strip_dims", [ptr], None)(strip_dims.data_ptr())
        self.strip_width, self.strip_rows = strip_dims.tolist()
        c = engine.config
        w_fc = engine.layers[0][2].t
        self.dims = torch.tensor([c.n_layer, c.n_embd, engine.H, engine.Hkv, engine.d, c.vocab_size,
                                  w_fc.size(1), engine.max_len], dtype=torch.int64)
        self.consts = torch.tensor([engine.softcap, engine.scale, _EPS], dtype=torch.float32)
        self.tensors = [engine.wte, engine.head.t, torch.view_as_real(engine.freqs).contiguous()]
        self.tensors += [w.t for layer in engine.layers for w in layer]
        assert all(t.dtype == torch.float32 and t.is_contiguous() for t in self.tensors)
        self.ptrs = (ptr * len(self.tensors))(*[t.data_ptr() for t in self.tensors])
        work_floats = bind("ncs_work_floats", [ptr], i64)(self.dims.data_ptr())
        self.work = torch.empty(work_floats, dtype=torch.float32)
        self.vocab = c.vocab_size
        # the strips' products transpose their rows' inputs here (one product at a time: one thread)
        self.strip_scratch = torch.empty(self.strip_rows * max(w.t.size(0) for w in engine._weights()))
        # addresses that never change, taken once (a data_ptr() call each time costs as much as the op)
        self.at = (self.dims.data_ptr(), self.consts.data_ptr(), self.tensors[2].data_ptr(), self.work.data_ptr())
        self.q_dim, self.width = engine.q_dim, engine.q_dim + 2 * engine.kv_dim

    def layer_rows(self, engine: "Engine", layer: int, qkv: torch.Tensor, slot_t: torch.Tensor,
                   pos_t: torch.Tensor, attend: int, k: torch.Tensor | None = None,
                   v: torch.Tensor | None = None) -> torch.Tensor | None:
        """One layer of a step between its QKV product and its output product: every row of ``qkv``
        (modified in place) normed and rotated at its position, its key and value written to the cache
        at (pos, slot), and for the first ``attend`` rows (decode rows) their attention (returned,
        (attend, q_dim)). ``k``, ``v``: another cache of one layer (the probe's)."""
        dims, consts, rot, work = self.at
        n = qkv.size(0)  # the C code trusts these shapes
        assert qkv.is_contiguous() and qkv.dtype == torch.float32 and qkv.size(1) == self.width
        assert slot_t.dtype == pos_t.dtype == torch.int64 and slot_t.numel() >= n and pos_t.numel() >= n
        assert slot_t.is_contiguous() and pos_t.is_contiguous() and 0 <= attend <= n
        y = torch.empty(attend, self.q_dim, dtype=torch.float32) if attend else None
        if k is None:
            k, v = engine.k, engine.v
        elif layer != 0:
            raise ValueError("a cache of one layer is layer 0")
        if self.layer_fn(dims, consts, rot, layer, qkv.data_ptr(), n, slot_t.data_ptr(),
                         pos_t.data_ptr(), attend, None, k.data_ptr(), v.data_ptr(), k.size(-3),
                         y.data_ptr() if attend else None, work):
            raise ValueError("a row's slot or position is outside the cache")
        return y

    def use_strips(self, engine: "Engine") -> None:
        """Point :meth:`decode_rows` at the engine's strip-major weights (made by strip_product)."""
        self.strip_tensors = [w.strip_mm.packed for w in engine._weights()]  # per layer 4, then the head
        self.strip_ptrs = (ctypes.c_void_p * len(self.strip_tensors))(*[t.data_ptr() for t in self.strip_tensors])
        floats = self.rows_work_fn(self.dims.data_ptr(), _Weight.STRIP_MAX_ROWS)
        self.rows_work = torch.empty(floats, dtype=torch.float32)

    def decode_rows(self, engine: "Engine", slots: list[int], positions: list[int], tokens: list[int],
                    out_rows: list[int]) -> torch.Tensor:
        """(len(out_rows), vocab) float32 logits of the rows ``out_rows`` (increasing) of a step of
        rows, row r the token ``tokens[r]`` at ``positions[r]`` of ``slots[r]``: one-token rows of
        decoding streams and the consecutive rows of prompts, one chunk per slot."""
        n = len(slots)
        assert 1 <= n <= _Weight.STRIP_MAX_ROWS and len(positions) == len(tokens) == n  # the scratch's size
        # (an array, not a tensor: torch.tensor of a list costs ~30 us, a tenth of a step's bookkeeping)
        index = array.array("q", slots + positions + tokens + out_rows)
        out = torch.empty(len(out_rows), self.vocab, dtype=torch.float32)
        dims, consts, _, _ = self.at
        i = index.buffer_info()[0]
        if self.rows_fn(dims, consts, self.ptrs, self.strip_ptrs, engine.k.data_ptr(), engine.v.data_ptr(),
                        engine.slots, n, i, i + 8 * n, i + 16 * n, len(out_rows), i + 24 * n, out.data_ptr(),
                        self.rows_work.data_ptr()):
            raise ValueError("a row's token, position or slot is out of range")
        return out

    def strip_product(self, wt: torch.Tensor) -> Callable[..., torch.Tensor]:
        """``(a, add=None) -> add + a @ wt`` for a float32 (rows, in) ``a`` and ``wt`` (in, out),
        through ``ncs_mm_strips`` on a strip-major copy of ``wt`` made now (as much memory again)."""
        n_in, n_out = wt.shape
        strips = -(-n_out // self.strip_width)
        packed = torch.empty(strips * n_in * self.strip_width, dtype=torch.float32)
        assert wt.dtype == torch.float32 and wt.is_contiguous()
        self.pack_fn(wt.data_ptr(), packed.data_ptr(), n_in, n_out)
        fn, scratch = self.strips_fn, self.strip_scratch.data_ptr()

        def product(a: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
            a = a.contiguous()
            rows = a.size(0)
            assert a.dtype == torch.float32 and a.size(1) == n_in  # the C code trusts these shapes
            if add is not None:
                add = add.contiguous()
                assert add.dtype == torch.float32 and add.shape == (rows, n_out)
            y = torch.empty(rows, n_out, dtype=torch.float32)
            fn(a.data_ptr(), packed.data_ptr(), add.data_ptr() if add is not None else None, y.data_ptr(),
               rows, n_in, n_out, scratch)
            return y

        product.packed = packed  # (kept alive by the closure; named for the tests)
        return product

    def unit(self, x: torch.Tensor) -> torch.Tensor:
        """engine._unit of every row of x, in one call."""
        x = x.contiguous()
        out = torch.empty_like(x)
        self.unit_fn(x.data_ptr(), out.data_ptr(), x.numel() // x.size(-1), x.size(-1), _EPS)
        return out

    def relu2(self, h: torch.Tensor) -> torch.Tensor:
        """relu(h)^2 in place (h contiguous, from a product)."""
        assert h.is_contiguous()
        self.relu2_fn(h.data_ptr(), h.numel())
        return h

    def __call__(self, engine: "Engine", slot: int, pos: int, token: int) -> torch.Tensor:
        dims, consts, _, work = self.at
        out = torch.empty(self.vocab, dtype=torch.float32)
        if self.fn(dims, consts, self.ptrs, engine.k.data_ptr(), engine.v.data_ptr(), engine.slots, slot, pos,
                   token, out.data_ptr(), work):
            raise ValueError(f"token {token} at {pos} in slot {slot} is out of range")
        return out


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=_EPS)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm divided by sqrt(n) (n: the last dimension), in 3 ops: x / max(|x|, sqrt(n eps)).
    RMSNorm is x / sqrt(|x|^2 / n + eps); the two differ only where |x|^2 is within a few n eps, a
    vector of ~1e-3 norm (never a real activation; there both stay finite)."""
    floor = math.sqrt(x.size(-1) * _EPS)
    return torch.div(x, torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(floor))


class _Norm:
    """RMSNorm over the last dimension, as the model's. On CPU in float32 as 6 ops instead of F.rms_norm's
    23 (its scalar arithmetic converts a Python float to a tensor twice a call): a one-token step is
    mostly the per-op cost of small ops, and there are 14 norms in a depth-4 step. The result is the
    same to the bit here (sum of squares, times 1/n, plus eps, rsqrt, times x); other devices and
    dtypes use F.rms_norm."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.fast = device.type == "cpu" and dtype == torch.float32
        self.eps = torch.tensor(_EPS, dtype=torch.float32)
        self.inv: dict[int, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            return _norm(x)
        n = x.size(-1)
        inv = self.inv.get(n)
        if inv is None:
            inv = self.inv[n] = torch.tensor(1.0 / n, dtype=torch.float32)
        return x * torch.rsqrt(torch.sum(x * x, -1, keepdim=True).mul_(inv).add_(self.eps))


class _Weight:
    """A (out, in) matrix kept for both kinds of product. One token's product is a matrix-vector
    product, which torch's CPU kernels run fastest from the (in, out) layout (the head: ~4x, see
    GPT._head; the block matrices less). Rows of several tokens go through oneDNN (x86 float32): with
    ``pack``, on a copy of the weight reordered once into its blocked layout (``cpu_ops.pack``: on an
    AMD EPYC from 2 rows on it beat both torch.mm layouts, ~1.4x at 16 rows; on an Intel Xeon torch.mm
    on (in, out) beat it, so the engine times both and may drop the packed copy, see
    Engine._choose_products), else through ``cpu_ops.mm_nt`` from the (out, in) layout, which oneDNN
    reorders on every call. Or, where the engine's C kernels won that timing, through ``strip_mm``
    (``_NativeStep.strip_product``: a strip-major copy). Two copies of the weights, unless they are
    large: then only the (in, out) one, for every product."""

    SMALL_ROWS = 8  # unpacked, up to this many rows torch.mm on the (in, out) layout is as fast
    STRIP_MAX_ROWS = 32  # past this many rows (prompts) torch.mm on (in, out) was as fast or faster
    BOTH_LAYOUTS_MAX_BYTES = 256 << 20

    def __init__(self, w: torch.Tensor, pack: bool = True):
        self.t = w.t().contiguous()
        self.second = w.device.type == "cpu" and w.numel() * w.element_size() <= self.BOTH_LAYOUTS_MAX_BYTES
        self.packed = cpu_ops.pack(w) if self.second and pack else None
        self.w = w if self.second and self.packed is None else None
        # (a, add=None) -> add + a @ W^T for 2 to STRIP_MAX_ROWS rows, set by the engine where it runs them
        self.strip_mm: Callable[..., torch.Tensor] | None = None

    def _onednn(self, rows: int) -> bool:
        """Whether a product of ``rows`` rows goes through oneDNN rather than torch.mm on (in, out)."""
        if self.packed is not None:
            return rows > 1
        return self.w is not None and rows > self.SMALL_ROWS

    def mm(self, a: torch.Tensor) -> torch.Tensor:
        if self.strip_mm is not None and 1 < a.size(0) <= self.STRIP_MAX_ROWS:
            return self.strip_mm(a)
        if not self._onednn(a.size(0)):
            return torch.mm(a, self.t)
        return cpu_ops.mm_packed(a, self.packed) if self.packed is not None else cpu_ops.mm_nt(a, self.w)

    def addmm(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """x + a @ W^T (the residual add rides on the product)."""
        if self.strip_mm is not None and 1 < a.size(0) <= self.STRIP_MAX_ROWS:
            return self.strip_mm(a, x)
        if not self._onednn(a.size(0)):
            return torch.addmm(x, a, self.t)
        return self.mm(a).add_(x)

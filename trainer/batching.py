"""Requests as decoding sequences: what the model server's scheduler advances one step at a time.

A :class:`Sequence` is one request's state: its prompt, sampling settings, where it stands in the
KV cache, and the output it owes its client (text deltas cut at stop strings, and log-probabilities
when asked). :class:`TorchBackend` advances every running sequence together: each step is one
``trainer.engine.Engine`` pass holding one new token of every decoding sequence plus prefill chunks
of newcomers, at most ``prefill_tokens`` of them per step (oldest request first), so a long prompt
delays the others by a bounded amount per step rather than for its whole length.

Sampling is ``trainer.sample``'s (the same choice for the same logits and seed); log-probabilities
are those of the model's distribution (soft-capped logits, temperature 1), whatever the sampling
settings. Text offsets count characters of the text this request sends (the echoed prompt first).

Errors: :meth:`TorchBackend.open` raises ValueError for a request the model cannot serve (bad
sampling values, token ids outside the vocabulary, a prompt too long to score).
"""

from __future__ import annotations

import codecs
import math
from typing import Any

MAX_LOGPROBS = 20  # alternatives per token, as the OpenAI API bounds them


class StopFilter:
    """Holds back text that may be the start of a stop string until it is known not to be."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hit = False

    def feed(self, delta: str) -> str:
        if not self.stops:
            return delta
        self.pending += delta
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.pending = self.pending[:cut], ""
            return out
        # keep the longest tail that is a proper prefix of some stop string
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Sequence:
    """Output bookkeeping shared by every backend: text through the stop filter, log-probability
    entries released with the text they belong to, counts and the finish reason."""

    def __init__(self, stops: list[str], max_tokens: int, logprobs: int | None):
        self.stop = StopFilter(stops)
        self.max_tokens = max_tokens
        self.logprobs = logprobs
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.sent = 0  # characters released to the client
        self.produced = 0  # characters produced (released or held by the stop filter)
        self._entries: list[dict] = []  # produced, not yet released
        self._out: list[tuple[str, list[dict] | None, bool]] = []  # (text, entries, echo) to send
        self.slot: int | None = None

    # the backend calls these -------------------------------------------------------------------
    def emit_echo(self, text: str, entries: list[dict] | None) -> None:
        """The prompt, sent back before the generated text (not subject to stop strings)."""
        self.sent += len(text)
        self.produced += len(text)
        self._out.append((text, entries, True))

    def emit(self, text: str, entry: dict | None = None) -> None:
        """Generated text (whole characters) and, with logprobs, the entry of the token behind it."""
        if entry is not None:
            entry["offset"] = self.produced
            self._entries.append(entry)
        self.produced += len(text)
        released = self.stop.feed(text)
        if self.stop.hit:
            self.finish_reason = "stop"
        self._release(released)

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
        if not self.stop.hit:
            self._release(self.stop.flush(), everything=True)

    def _release(self, text: str, everything: bool = False) -> None:
        end = self.sent + len(text)
        if self.logprobs is None:
            entries = None
        else:
            n = len(self._entries) if everything else sum(1 for e in self._entries if e["offset"] < end)
            entries, self._entries = self._entries[:n], self._entries[n:]
        self.sent = end
        if text or entries:
            self._out.append((text, entries, False))

    # the scheduler calls this ------------------------------------------------------------------
    def take_output(self) -> list[tuple[str, list[dict] | None, bool]]:
        out, self._out = self._out, []
        return out

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def _bounded_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer in [{low}, {high if high is not None else 'inf'}], got {value!r}")
    return value


def parse_logprobs(value: Any) -> int | None:
    """None (off) or the number of alternatives per token, 0..MAX_LOGPROBS. Raises ValueError."""
    if value is None or value is False:
        return None
    if value is True:
        return 0
    return _bounded_int(value, "logprobs", 0, MAX_LOGPROBS)


class TorchSequence(Sequence):
    def __init__(self, prompt: list[int], echo_from: int | None, score: bool, stop_ids: frozenset[int],
                 sampling: dict, stops: list[str], max_tokens: int, logprobs: int | None, gen):
        super().__init__(stops, max_tokens, logprobs)
        self.ids = list(prompt)  # everything fed or to feed, for rebuilding the cache when it is full
        self.todo = list(prompt)  # tokens not yet in the cache
        self.pos = 0  # cache position of todo[0]
        self.prompt_len = len(prompt)
        self.prompt_tokens = len(prompt)
        self.echo_from = echo_from  # echo the prompt from this index (None: no echo)
        self.score = score  # log-probabilities of the prompt's tokens are wanted
        self.prompt_text = ""  # the echoed prompt, built while scoring
        self.prompt_entries: list[dict] = []
        self.stop_ids = stop_ids
        self.sampling = sampling
        self.gen = gen
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def decoder_tail(self) -> str:
        """An unfinished UTF-8 character at the end of what was decoded (U+FFFD), and a fresh start."""
        return self.decoder.decode(b"", final=True)


class TorchBackend:
    """A checkpoint loaded once, decoded in batches by ``trainer.engine.Engine``."""

    def __init__(self, checkpoint: str, device: str, max_active: int = 16, prefill_tokens: int = 256,
                 kv_cache_mb: int = 4096):
        import torch

        from trainer import sample
        from trainer.engine import Engine

        self.torch, self.sample = torch, sample
        self.model, self.tokenizer, meta = sample.load_for_inference(checkpoint, device)
        self.engine = Engine(self.model, max_slots=max_active, max_cache_bytes=kv_cache_mb << 20)
        self.window = self.engine.max_len
        self.prefill_tokens = max(1, int(prefill_tokens))
        self.info = {"backend": "torch", "max_active": self.engine.max_slots, "products": self.engine.products,
                     "products_probe_ms": self.engine.probe_ms, "attention": self.engine.attention,
                     "attention_probe_ms": self.engine.attention_probe_ms,
                     "decode_one": self.engine.decode_one, "decode_one_probe_ms": self.engine.decode_one_probe_ms,
                     "split_rows": self.engine.split_rows, "split_probe_ms": self.engine.split_probe_ms,
                     "decode_one_reason": self.engine.native_reason,
                     "context": self.window, "vocab_size": self.model.config.vocab_size,
                     **({k: v for k, v in (meta or {}).items() if _jsonable(v)})}
        tok = self.tokenizer
        self.chat_stops = frozenset({tok.special_id("<|assistant_end|>"), tok.special_id("<|user_start|>"), tok.bos_id})
        self._token_text: dict[int, tuple[str, list[int]]] = {}

    def capacity(self) -> int:
        return self.engine.free_slots()

    # --- a request becomes a sequence -------------------------------------------------------------
    def open(self, mode: str, payload: Any, sampling: dict, *, echo: bool = False,
             logprobs: int | None = None) -> TorchSequence:
        """Tokenize and validate. Raises ValueError with a message for the client."""
        tok, vocab = self.tokenizer, self.model.config.vocab_size
        max_tokens = sampling.get("max_tokens")
        max_tokens = 256 if max_tokens is None else max_tokens
        temperature = sampling.get("temperature")
        temperature = 1.0 if temperature is None else temperature
        top_k, top_p, seed = sampling.get("top_k"), sampling.get("top_p"), sampling.get("seed")
        stops = sampling.get("stop") or []
        if isinstance(stops, str):
            stops = [stops]
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if mode == "chat":
            if echo:
                raise ValueError("echo applies to completions, not chat")
            prompt = list(tok.render_for_completion(payload))
            echo_from, stop_ids = None, self.chat_stops
        elif isinstance(payload, str):
            prompt = [tok.bos_id] + list(tok.encode(payload))
            echo_from, stop_ids = (1 if echo else None), frozenset({tok.bos_id})
        else:  # token ids, used as given; <|bos|> goes first as in every training document
            if not payload or any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in payload):
                raise ValueError(f"prompt token ids must be a non-empty list of integers in [0, {vocab})")
            lead = [] if payload[0] == tok.bos_id else [tok.bos_id]
            prompt = lead + list(payload)
            echo_from, stop_ids = (len(lead) if echo else None), frozenset({tok.bos_id})
        # the checks of trainer.sample, before anything runs
        self.sample._validate(self.model, prompt, max_tokens, temperature, top_k, top_p, seed)
        score = echo and logprobs is not None
        if len(prompt) > self.window:
            if score:
                raise ValueError(f"the prompt has {len(prompt)} tokens, more than the model's context of "
                                 f"{self.window}; its log-probabilities cannot be computed")
            prompt_all, prompt = prompt, prompt[-self.window:]  # generation sees the last window, as sample.py
        else:
            prompt_all = prompt
        gen = self.torch.Generator(device=self.engine.device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        sampling = {"temperature": float(temperature), "top_k": top_k, "top_p": top_p}
        seq = TorchSequence(prompt, echo_from, score, stop_ids, sampling, stops, max_tokens, logprobs, gen)
        seq.prompt_tokens = len(prompt)
        if echo and not score:  # echo without scores can be sent at once
            text = tok.decode(prompt_all[echo_from:])
            seq.emit_echo(text, None)
        return seq

    # --- one step for every running sequence ------------------------------------------------------
    def step(self, seqs: list[TorchSequence]) -> None:
        from trainer.engine import Chunk

        for s in seqs:
            if s.slot is None:
                s.slot = self.engine.alloc()
        chunks, owners, budget = [], [], self.prefill_tokens
        for s in seqs:  # oldest first: prefill budget goes to the longest waiting
            if len(s.todo) == 1:
                chunks.append(Chunk(s.slot, s.pos, s.todo, "last"))
            elif budget > 0:
                n = min(budget, len(s.todo))
                budget -= n
                last = n == len(s.todo)
                chunks.append(Chunk(s.slot, s.pos, s.todo[:n], "all" if s.score else ("last" if last else "none")))
            else:
                continue
            owners.append(s)
        if not chunks:
            return
        ready = []  # (sequence, its next-token logits)
        for s, c, logits in zip(owners, chunks, self.engine.step(chunks)):
            s.pos += len(c.tokens)
            s.todo = s.todo[len(c.tokens):]
            if s.score:  # row i holds the logits after position c.start + i: they score the next token
                self._score_rows(s, c.start, logits)
                logits = logits[-1]
            if s.todo:
                continue
            if s.score:
                s.emit_echo(s.prompt_text + s.decoder_tail(), s.prompt_entries)
                s.prompt_entries, s.score = [], False  # the prompt is scored; decoding goes on as usual
            ready.append((s, logits))
        # Greedy rows pick in one argmax over all of them and one transfer to Python (per-row calls cost
        # ~10 us each, a tenth of a 16-row step's work beside the model); sampled rows keep their own
        # generator, so a seed gives the same text alone or batched.
        greedy = [i for i, (s, _) in enumerate(ready)
                  if s.sampling["temperature"] == 0 and s.completion_tokens < s.max_tokens]
        picked: dict[int, int] = {}
        if len(greedy) > 1:
            with self.torch.inference_mode():
                ids = self.torch.stack([ready[i][1] for i in greedy]).argmax(dim=-1).tolist()
            picked = dict(zip(greedy, ids))
        for i, (s, logits) in enumerate(ready):
            self._next_token(s, logits, picked.get(i))

    def release(self, seq: TorchSequence) -> None:
        if seq.slot is not None:
            self.engine.release(seq.slot)
            seq.slot = None

    # --- after the logits -------------------------------------------------------------------------
    def _next_token(self, s: TorchSequence, logits, token: int | None = None) -> None:
        """Feed the next token (``token`` when it was already picked from ``logits``)."""
        if s.completion_tokens >= s.max_tokens:
            s.finish("length")
            return
        entry = None
        if token is None or s.logprobs is not None:  # (a greedy row picked already needs no torch here)
            with self.torch.inference_mode():
                if token is None:
                    token = self.sample._pick(logits, s.sampling["temperature"], s.sampling["top_k"],
                                              s.sampling["top_p"], s.gen)
                if s.logprobs is not None:
                    entry = self._entry(logits, token, s.logprobs)
        s.completion_tokens += 1
        if token in s.stop_ids:
            # The stop token gets its entry too (no text, "special": true): a client that asked for one
            # token with its log-probabilities (lm-eval's scoring requests) counts on one entry per token.
            if entry is not None:
                entry["special"] = True
            self._end(s, "stop", entry)
            return
        text = s.decoder.decode(self.tokenizer.decode_bytes([token]))
        s.emit(text, entry)
        if s.done:  # a stop string
            return
        if s.completion_tokens >= s.max_tokens:
            self._end(s, "length")
            return
        s.ids.append(token)
        if s.pos >= self.window:  # the cache is full: rebuild it from the last half window, as sample.py
            s.pos, s.todo = 0, s.ids[-max(1, self.window // 2):]
        else:
            s.todo = [token]

    def _end(self, s: TorchSequence, reason: str, stop_entry: dict | None = None) -> None:
        tail = s.decoder_tail()
        if tail:
            s.emit(tail)
        if stop_entry is not None and not s.done:
            s.emit("", stop_entry)
        s.finish(reason)

    def _score_rows(self, s: TorchSequence, start: int, logits) -> None:
        """Entries (with the echoed text) for the prompt tokens that ``logits`` (rows after positions
        start, start + 1, ...) predict; the prompt's first token has no prediction and gets none."""
        if start == 0 and s.echo_from == 0:
            self._add_prompt_token(s, self._bare_entry(s.ids[0]))
        first, last = max(start + 1, s.echo_from), min(start + logits.size(0), s.prompt_len - 1)
        if first > last:
            return
        rows = logits[first - 1 - start: last - start]
        tokens = s.ids[first: last + 1]
        for entry in self._entries(rows, tokens, s.logprobs):
            self._add_prompt_token(s, entry)

    def _add_prompt_token(self, s: TorchSequence, entry: dict) -> None:
        entry["offset"] = len(s.prompt_text)
        s.prompt_text += s.decoder.decode(self.tokenizer.decode_bytes([entry["token"]]))
        s.prompt_entries.append(entry)

    def _token_info(self, token: int) -> tuple[str, list[int]]:
        info = self._token_text.get(token)
        if info is None:
            raw = self.tokenizer.decode_bytes([token])
            info = self._token_text[token] = (raw.decode("utf-8", errors="replace"), list(raw))
        return info

    def _alternative(self, token: int, logprob: float) -> tuple[str, float, list[int]]:
        text, raw = self._token_info(token)
        return text, _finite(logprob), raw

    def _bare_entry(self, token: int) -> dict:
        text, raw = self._token_info(token)
        return {"token": token, "text": text, "bytes": raw, "logprob": None, "top": None}

    def _entry(self, logits, token: int, n: int) -> dict:
        return self._entries(logits[None], [token], n)[0]

    def _entries(self, logits, tokens: list[int], n: int) -> list[dict]:
        """Log-probability entries of ``tokens`` under the rows of ``logits`` (one row each)."""
        torch = self.torch
        with torch.inference_mode():
            lp = torch.log_softmax(logits.float(), dim=-1)
            chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
            top = lp.topk(n, dim=-1) if n else None
            top_vals = top.values.tolist() if n else None
            top_ids = top.indices.tolist() if n else None
        out = []
        for r, token in enumerate(tokens):
            entry = self._bare_entry(token)
            entry["logprob"] = _finite(chosen[r])
            entry["top"] = ([[i, *self._alternative(i, v)] for i, v in zip(top_ids[r], top_vals[r])]
                            if n else [])
            out.append(entry)
        return out


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf; a probability this small is zero


def _jsonable(v: Any) -> bool:
    import json

    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False

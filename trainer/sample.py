"""Text generation from a trained checkpoint, streamed as it is produced.

    python -m trainer.sample --checkpoint runs/r1/checkpoints/step_000200 --prompt "Once upon a time"

CPU recipe: OMP_NUM_THREADS=1 (tiny models decode faster on one thread on a 2-core machine).
Add --chat to send the prompt as a user message and stream the assistant's answer.

The model server (``trainer/serve.py``) uses :func:`load_for_inference`, :func:`complete` and
:func:`chat`; each returns a :class:`Generation`, an iterator of text deltas that are always whole
UTF-8 characters, with token counts and a finish reason once it is exhausted.

Context longer than the model's training length (``config.sequence_len``): the prompt is cropped to
its last ``sequence_len`` tokens. With the KV cache, when the cache is full it is rebuilt from the
last ``sequence_len // 2`` tokens (one prefill) and decoding continues from there, so long answers
cost one recompute per half window instead of one per token. Without the cache every step simply
runs on the last ``sequence_len`` tokens.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import math
import sys
import time
from typing import Any, Iterable, Iterator

import torch

from trainer.model import GPT


def load_for_inference(checkpoint_dir: str, device: str = "cpu") -> tuple[GPT, Any, dict]:
    """(model in eval mode, tokenizer, meta); raises trainer.checkpoint.CheckpointError."""
    from trainer.checkpoint import load_model

    model, tokenizer, meta = load_model(checkpoint_dir, device)
    model.eval().requires_grad_(False)  # for inference only: lets _engine_for keep its engine
    return model, tokenizer, meta


def _validate(model: GPT, prompt_ids: list[int], max_tokens, temperature, top_k, top_p, seed) -> None:
    vocab = model.config.vocab_size
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token")
    if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
        raise ValueError(f"prompt_ids must be integers in [0, {vocab})")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
          gen: torch.Generator) -> int:
    """One token id from float32 logits (V,)."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=gen))


def generate_tokens(model: GPT, prompt_ids: Iterable[int], *, max_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    stop_ids: Iterable[int] = (), use_cache: bool = True) -> Iterator[int]:
    """Token ids after ``prompt_ids``, one at a time; a stop id is yielded and then ends the stream.

    temperature 0 is greedy. A seed makes sampling reproducible (a generator seeded per call, so
    other users of torch's global RNG neither disturb nor are disturbed). Arguments are checked
    here, before the first token, and raise ValueError.
    """
    prompt_ids = list(prompt_ids)
    stop = frozenset(int(s) for s in stop_ids)
    _validate(model, prompt_ids, max_tokens, temperature, top_k, top_p, seed)
    return _generate(model, prompt_ids, max_tokens, float(temperature), top_k, top_p, seed, stop, use_cache)


def _generate(model, ids, max_tokens, temperature, top_k, top_p, seed, stop, use_cache) -> Iterator[int]:
    # a torch.compile'd model would recompile for every new cache position: decode with the original
    model = getattr(model, "_orig_mod", model)
    window = model.config.sequence_len
    device = model.lm_head.weight.device
    on_cuda = device.type == "cuda"
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    ids = ids[-window:]
    if use_cache:
        yield from _generate_cached(model, ids, max_tokens, temperature, top_k, top_p, gen, stop)
        return

    def run(tokens: list[int]) -> torch.Tensor:
        # grad mode is set per call, never held across a yield (it is thread state the caller shares)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            x = torch.tensor([tokens], dtype=torch.long, device=device)
            return model(x, last_only=True)[0, -1].float()

    logits = run(ids)
    for _ in range(max_tokens):
        with torch.inference_mode():
            token = _pick(logits, temperature, top_k, top_p, gen)
        yield token
        if token in stop:
            return
        ids.append(token)
        logits = run(ids[-window:])


def _generate_cached(model, ids, max_tokens, temperature, top_k, top_p, gen, stop) -> Iterator[int]:
    """The KV-cached path: trainer.engine with one slot (the model server runs many at once). When the
    cache is full it is rebuilt from the last half window (one prefill per half window)."""
    from trainer.engine import Chunk, Engine

    engine = _engine_for(model)
    window = engine.max_len
    slot = engine.alloc()
    try:
        logits = engine.step([Chunk(slot, 0, ids)])[0]
        pos = len(ids)
        for _ in range(max_tokens):
            with torch.inference_mode():
                token = _pick(logits, temperature, top_k, top_p, gen)
            yield token
            if token in stop:
                return
            ids.append(token)
            if pos >= window:
                pos, feed = 0, ids[-max(1, window // 2):]
            else:
                feed = [token]
            logits = engine.step([Chunk(slot, pos, feed)])[0]
            pos += len(feed)
    finally:
        engine.release(slot)


def _engine_for(model: GPT):
    """An Engine for ``model``. A model loaded for inference (no parameter wants gradients) keeps one,
    rebuilt if its weights change; a model being trained (the trainer's sample events) gets a fresh
    one each time, freed after the generation, so no copy of its weights outlives the sampling."""
    from trainer.engine import Engine

    if any(p.requires_grad for p in model.parameters()):
        return Engine(model, max_slots=1, initial_slots=1)
    key = tuple((p.data_ptr(), p._version) for p in model.parameters())
    cached = model.__dict__.get("_sample_engine")
    if cached is None or cached[0] != key or cached[1].free_slots() < 1:
        cached = (key, Engine(model, max_slots=1, initial_slots=1))
        model.__dict__["_sample_engine"] = cached
    return cached[1]


class Generation:
    """Text deltas of one generation, each whole UTF-8 characters; iterate it once.

    Tokens are turned into bytes with ``tokenizer.decode_bytes`` and fed to an incremental UTF-8
    decoder, so a token that ends in the middle of a character waits for the next one; bytes that
    can never form a character come out as U+FFFD, as ``bytes.decode(errors="replace")`` would.
    After iteration: ``prompt_tokens``, ``completion_tokens`` (the stop token included) and
    ``finish_reason`` ("stop" for a stop token, "length" at max_tokens).
    """

    def __init__(self, model: GPT, tokenizer, prompt_ids: list[int], *, stop_ids: Iterable[int] = (),
                 max_tokens: int = 256, **sampling):
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(stop_ids)
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._tokens = generate_tokens(model, prompt_ids, max_tokens=max_tokens, stop_ids=self.stop_ids,
                                       **sampling)

    def __iter__(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stopped = False
        for token in self._tokens:
            self.completion_tokens += 1
            if token in self.stop_ids:
                stopped = True
                break
            text = decoder.decode(self.tokenizer.decode_bytes([token]))
            if text:
                yield text
        self.finish_reason = "stop" if stopped else "length"
        tail = decoder.decode(b"", final=True)  # an unfinished character at the very end
        if tail:
            yield tail


def complete(model: GPT, tokenizer, text: str, *, stop_ids: Iterable[int] = (), **sampling) -> Generation:
    """Continue raw text. The prompt starts with <|bos|> as every training document does; a <|bos|>
    from the model means its document ended, so it stops there."""
    prompt = [tokenizer.bos_id] + list(tokenizer.encode(text))
    return Generation(model, tokenizer, prompt, stop_ids={tokenizer.bos_id, *stop_ids}, **sampling)


def chat(model: GPT, tokenizer, messages: list[dict], *, stop_ids: Iterable[int] = (), **sampling) -> Generation:
    """The assistant's next message, stopping at <|assistant_end|>; also at <|bos|> or <|user_start|>,
    which would begin another conversation or the user's next turn rather than continue this one."""
    prompt = list(tokenizer.render_for_completion(messages))
    stops = {tokenizer.special_id("<|assistant_end|>"), tokenizer.special_id("<|user_start|>"),
             tokenizer.bos_id, *stop_ids}
    return Generation(model, tokenizer, prompt, stop_ids=stops, **sampling)


def cut_at_stop_text(deltas: Iterable[str], stops: Iterable[str]) -> Iterator[str]:
    """Pass text deltas through until one of the ``stops`` strings appears; the text before it is
    kept. Text that might be the start of a stop string is held back until it is decided."""
    stops = [s for s in stops if s]
    if not stops:
        yield from deltas
        return
    pending = ""
    for delta in deltas:
        pending += delta
        hits = [i for i in (pending.find(s) for s in stops) if i >= 0]
        if hits:
            if min(hits):
                yield pending[:min(hits)]
            return
        hold = max((k for s in stops for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
        if len(pending) > hold:
            yield pending[:len(pending) - hold]
            pending = pending[len(pending) - hold:]
    if pending:
        yield pending


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.sample", description=__doc__.splitlines()[0])
    # what to load and where
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (trainer.checkpoint layout)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # what to ask
    p.add_argument("--prompt", required=True, help="text to continue, or the user message with --chat")
    p.add_argument("--chat", action="store_true", help="answer the prompt as a chat message")
    # how to sample
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (repeatable); the text before it is kept")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model, tokenizer, _ = load_for_inference(args.checkpoint, args.device)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    max_tokens=args.max_tokens, seed=args.seed)
    try:
        if args.chat:
            gen = chat(model, tokenizer, [{"role": "user", "content": args.prompt}], **sampling)
        else:
            gen = complete(model, tokenizer, args.prompt, **sampling)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.chat:
        sys.stdout.write(args.prompt)
    t0 = time.perf_counter()
    for delta in cut_at_stop_text(gen, args.stop):
        sys.stdout.write(delta)
        sys.stdout.flush()
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    print(f"[{gen.prompt_tokens} prompt tokens, {gen.completion_tokens} generated in {dt:.2f}s "
          f"({gen.completion_tokens / max(dt, 1e-9):.1f} tok/s), finish: {gen.finish_reason or 'stop'}]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

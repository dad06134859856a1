"""OpenAI's legacy completions (``POST /v1/completions``) and log-probabilities in both OpenAI shapes:
what a request may ask for, and how the model server's entries become the answer.

The view (views/openai.py) only wires: it parses here, opens the streams, and shapes what arrives with
:class:`Choice`. Entries come from the model server (trainer/serve.py's protocol): ``{"token", "text",
"bytes", "logprob", "top": [[id, text, logprob, bytes], ...], "offset"}``, offsets counting characters
from the start of the text the server sends (the echoed prompt first, when it echoes).

Errors: ``BadRequest`` (400) naming the field.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .chat import MAX_TOKENS_LIMIT, MAX_TOTAL_CHARS, number, parse_stop
from .errors import BadRequest
from .inference import Final, InferenceError, TooBusy

MAX_PROMPTS = 64  # prompts in one batched request (lm-eval's batch_size); each is one choice
MAX_PROMPT_TOKENS = 32_768  # token ids in one prompt; the model server refuses ids it cannot use
MAX_LOGPROBS = 20  # alternatives per token (trainer.batching.MAX_LOGPROBS)
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
# Sampling settings OpenAI accepts that this server does not implement: accepted at their neutral value.
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "best_of": 1, "n": 1}
REFUSED = ("suffix", "logit_bias", "tools", "functions")

Prompt = str | list[int]


@dataclass(frozen=True)
class CompletionRequest:
    """A ``POST /v1/completions`` body, checked (the model id is the view's to look up)."""

    prompts: list[Prompt]
    sampling: dict  # temperature, top_k, top_p, max_tokens, seed, stop: as ModelPool.stream takes them
    echo: bool
    logprobs: int | None  # alternatives per token, or None for no log-probabilities
    stream: bool
    include_usage: bool

    def server_sampling(self, prompt: Prompt) -> dict:
        """What the model server is asked for one prompt. Offsets of generated tokens count from the
        prompt's end, so without echo a token-id prompt is echoed anyway (its text length is needed;
        the web process has no tokenizer) and the echo is dropped: see :meth:`Choice.add`."""
        out = dict(self.sampling)
        if self.echo or (self.logprobs is not None and not isinstance(prompt, str)):
            out["echo"] = True
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        return out


def _token_ids(raw: list, where: str) -> list[int]:
    if not raw:
        raise BadRequest(f"{where} is an empty list of token ids", param="prompt")
    if len(raw) > MAX_PROMPT_TOKENS:
        raise BadRequest(f"{where} has {len(raw)} token ids (at most {MAX_PROMPT_TOKENS})", param="prompt")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in raw):
        raise BadRequest(f"{where} must hold only non-negative integer token ids", param="prompt")
    return list(raw)


def parse_prompts(raw: Any) -> list[Prompt]:
    """``prompt`` as OpenAI takes it: a string, a list of strings, a list of token ids, or a list of
    token-id lists. One choice per prompt. BadRequest names what is wrong."""
    if isinstance(raw, str):
        prompts: list[Prompt] = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
        prompts = [_token_ids(raw, "prompt")]
    elif isinstance(raw, list) and raw:
        if len(raw) > MAX_PROMPTS:
            raise BadRequest(f"prompt holds {len(raw)} prompts (at most {MAX_PROMPTS} in one request)",
                             param="prompt")
        prompts = []
        for i, p in enumerate(raw):
            if isinstance(p, str):
                prompts.append(p)
            elif isinstance(p, list):
                prompts.append(_token_ids(p, f"prompt[{i}]"))
            else:
                raise BadRequest(f"prompt[{i}] must be a string or a list of token ids", param="prompt")
    else:
        raise BadRequest("prompt must be a string, a list of strings, a list of token ids or a list of "
                         "token-id lists (not empty)", param="prompt")
    total = sum(len(p) for p in prompts if isinstance(p, str))
    if total > MAX_TOTAL_CHARS:
        raise BadRequest(f"the prompts are {total} characters long (at most {MAX_TOTAL_CHARS})", param="prompt")
    return prompts


def parse_flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, got {value!r}", param=name)
    return value


def parse_stream(body: dict) -> tuple[bool, bool]:
    """``stream`` and ``stream_options.include_usage``."""
    stream = parse_flag(body, "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise BadRequest("stream_options must be an object", param="stream_options")
    if not stream:
        raise BadRequest("stream_options is only allowed when stream is true", param="stream_options")
    return stream, parse_flag(opts, "include_usage")


def refuse_unsupported(body: dict, refused: tuple[str, ...] = REFUSED) -> None:
    """400 for fields this server cannot honour; OpenAI's fields that are neutral at their default
    (penalties 0, best_of 1, n 1) are accepted at that value only."""
    for key in refused:
        if body.get(key):
            raise BadRequest(f"'{key}' is not supported by this server.", param=key, code="unsupported_parameter")
    for key, neutral in NEUTRAL.items():
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or value != neutral):
            why = ("this server generates one choice per prompt" if key in ("n", "best_of")
                   else "this server applies no penalties")
            raise BadRequest(f"Only {key}={neutral} is supported: {why}.", param=key, code="unsupported_value")


def parse_completion_request(body: Any) -> CompletionRequest:
    """The ``POST /v1/completions`` body; BadRequest names the field that is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.", code="invalid_json")
    refuse_unsupported(body)
    prompts = parse_prompts(body.get("prompt"))
    echo = parse_flag(body, "echo")
    logprobs = number(body, "logprobs", 0, MAX_LOGPROBS, integer=True)
    max_tokens = number(body, "max_tokens", 0, MAX_TOKENS_LIMIT, integer=True)
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if max_tokens == 0 and not echo:
        raise BadRequest("max_tokens 0 only makes sense with echo (to score the prompt)", param="max_tokens")
    temperature = number(body, "temperature", 0, 2)
    top_p = number(body, "top_p", 0, 1, lo_open=True)
    sampling = {
        "temperature": 1.0 if temperature is None else temperature,  # OpenAI's defaults, not the chat page's
        "top_k": number(body, "top_k", 1, 100_000, integer=True),
        "top_p": None if top_p is None or top_p >= 1 else top_p,
        "max_tokens": max_tokens,
        "seed": number(body, "seed", -(2**63), 2**63 - 1, integer=True),
    }
    stop = parse_stop(body.get("stop"))
    if stop:
        sampling["stop"] = stop
    stream, include_usage = parse_stream(body)
    return CompletionRequest(prompts=prompts, sampling=sampling, echo=echo, logprobs=logprobs, stream=stream,
                             include_usage=include_usage)


def parse_chat_logprobs(body: dict) -> int | None:
    """Chat's ``logprobs`` (true/false) and ``top_logprobs`` (0..20, only with logprobs): the number of
    alternatives per token to ask the model server for, or None when log-probabilities are off."""
    on = parse_flag(body, "logprobs")
    top = number(body, "top_logprobs", 0, MAX_LOGPROBS, integer=True)
    if top is not None and not on:
        raise BadRequest("top_logprobs needs logprobs set to true", param="top_logprobs")
    return (top or 0) if on else None


# --- shaping the answer ----------------------------------------------------------------------------------


def token_string(raw: list[int]) -> str:
    """A token as OpenAI's legacy API names it: its text, or ``bytes:\\xe4\\xbd`` for a token that is
    not whole UTF-8 characters on its own."""
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def legacy_logprobs(entries: list[dict], offset_base: int = 0) -> dict:
    """The legacy ``logprobs`` object: parallel lists ``tokens``, ``token_logprobs``, ``top_logprobs``
    (a dict per token, null where the token has no prediction) and ``text_offset``."""
    tops: list[dict | None] = []
    for e in entries:
        if e.get("top") is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for alt in e["top"]:  # most likely first: two ids with the same text keep the likelier one
            top.setdefault(token_string(alt[3]), alt[2])
        tops.append(top)
    return {
        "tokens": [token_string(e["bytes"]) for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": tops,
        "text_offset": [e["offset"] + offset_base for e in entries],
    }


def chat_logprobs(entries: list[dict]) -> list[dict]:
    """``choices[].logprobs.content`` of chat completions. The end-of-turn token (``special``) is left
    out: the answer's text does not contain it."""
    out = []
    for e in entries:
        if e.get("special"):
            continue
        out.append({"token": e["text"], "logprob": e["logprob"], "bytes": e["bytes"],
                    "top_logprobs": [{"token": alt[1], "logprob": alt[2], "bytes": alt[3]}
                                     for alt in e["top"] or []]})
    return out


@dataclass
class Choice:
    """One prompt's answer as it arrives: text, legacy log-probability entries, the Final."""

    index: int
    prompt: Prompt
    echo: bool  # the client asked for the prompt back
    logprobs: bool
    text: list[str] = field(default_factory=list)
    entries: list[dict] = field(default_factory=list)
    final: Any = None
    _base: int = 0  # characters before the generated text, for offsets (see add)
    _first: bool = True

    def __post_init__(self) -> None:
        if not self.echo and isinstance(self.prompt, str):
            self._base = len(self.prompt)  # OpenAI counts offsets from the prompt's start

    def add(self, delta: Any) -> tuple[str, list[dict]]:
        """Take one delta from the stream; returns the text and entries it adds to the answer."""
        is_echo = bool(getattr(delta, "echo", False))
        entries = list(getattr(delta, "logprobs", None) or [])
        if is_echo and entries and self._first:
            # The prompt's first token has no prediction in OpenAI's shape (the server's <|bos|> in front
            # gives it one; a client cannot tell that token is there).
            entries[0] = dict(entries[0], logprob=None, top=None)
        if is_echo:
            self._first = False
        if is_echo and not self.echo:  # echoed only so that offsets can count from the prompt's end
            return "", []
        text = str(delta)
        self.text.append(text)
        if self.logprobs:
            self.entries.extend(entries)
        return text, entries

    def logprobs_json(self, entries: list[dict] | None = None) -> dict | None:
        if not self.logprobs:
            return None
        return legacy_logprobs(self.entries if entries is None else entries, self._base)


def finish_reason(final: Any) -> str:
    return "length" if final is not None and final.finish_reason == "length" else "stop"


def usage(finals: list[Any]) -> dict:
    p = sum(f.prompt_tokens for f in finals if f is not None)
    c = sum(f.completion_tokens for f in finals if f is not None)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# --- several prompts at once ------------------------------------------------------------------------------


def run_batch(first: Iterator[Any], open_next: Callable[[int], Iterator[Any]], n: int,
              window: int = 8, admit_wait_s: float = 120.0) -> Iterator[tuple[int, Any]]:
    """Items of ``n`` prompts' streams as ``(index, item)``, each prompt's Final (or its InferenceError,
    yielded, not raised) marking its end. ``first`` (prompt 0) was admitted by the caller, so a 429
    happens before any answer; ``open_next(i)`` opens prompt ``i``'s stream on the pool.

    Up to ``window`` prompts run at once, so the model server batches them: a worker beyond the first
    runs only while the pool admits it (TooBusy: it stops and leaves its prompts to the others), and the
    first worker waits for admission (up to ``admit_wait_s``) rather than fail a batch it has started.
    Closing this generator stops every worker at its stream's next item (their streams are closed in
    their own threads: a generator cannot be closed from another thread while it runs)."""
    if n == 1:  # no threads for the common case
        try:
            for item in first:
                yield 0, item
        except InferenceError as e:
            yield 0, e
        finally:
            first.close()
        return
    out: queue.Queue = queue.Queue()
    stop = threading.Event()
    lock = threading.Lock()
    todo = list(range(1, n))

    def take() -> int | None:
        with lock:
            return todo.pop(0) if todo else None

    def give_back(i: int) -> None:
        with lock:
            todo.insert(0, i)

    def drain(i: int, stream: Iterator[Any]) -> None:
        try:
            for item in stream:
                if stop.is_set():
                    return
                out.put((i, item))
        except InferenceError as e:
            out.put((i, e))
        except Exception as e:  # a bug must still end the prompt, or the request would wait forever
            out.put((i, InferenceError(f"generation failed: {e!r}")))
        finally:
            stream.close()

    def admit(i: int, patient: bool) -> Iterator[Any] | None:
        """Prompt i's stream; None when not admitted now (impatient) or stopping. Raises InferenceError."""
        deadline = time.monotonic() + admit_wait_s
        while not stop.is_set():
            try:
                return open_next(i)
            except TooBusy:
                if not patient or time.monotonic() > deadline:
                    if patient:
                        raise
                    return None
                time.sleep(0.05)
        return None

    def work(i: int, stream: Iterator[Any] | None, patient: bool) -> None:
        while stream is not None:
            drain(i, stream)
            stream = None
            while stream is None and not stop.is_set():
                nxt = take()
                if nxt is None:
                    return
                try:
                    stream = admit(nxt, patient)
                except InferenceError as e:
                    out.put((nxt, e))
                    continue
                if stream is None:
                    give_back(nxt)
                    return
                i = nxt

    threads = [threading.Thread(target=work, args=(0, first, True), name="completions-batch", daemon=True)]
    for _ in range(min(window, n) - 1):
        i = take()
        if i is None:
            break
        try:
            opened = admit(i, False)
        except InferenceError:
            opened = None  # the first worker meets this again and reports it
        if opened is None:
            give_back(i)
            break
        threads.append(threading.Thread(target=work, args=(i, opened, False), name="completions-batch",
                                        daemon=True))
    for t in threads:
        t.start()
    ended = 0
    try:
        while ended < n:
            i, item = out.get()
            if isinstance(item, (Final, InferenceError)):
                ended += 1
            yield i, item
    finally:
        stop.set()

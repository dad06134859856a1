"""The scripted model: a checkpoint directory holding ``fake_model.json`` served without torch.

    {"text": "Hello!", "delay_s": 0.01, "tokens_per_delta": 1, "load_delay_s": 0}

``trainer/serve.py`` replays ``text`` one delta per step (``tokens_per_delta`` characters each, after
``delay_s``), honouring max_tokens and stop strings, through the same scheduler as a real network: tests
use it for the plumbing (crashes, queues, hostile output) independently of the weights.
"""

from __future__ import annotations

import time
from typing import Any

from trainer.batching import Sequence


class ScriptedSequence(Sequence):
    def __init__(self, text: str, step: int, max_tokens: int, prompt_tokens: int, stops: list[str]):
        super().__init__(stops, max_tokens, None)
        self.chars = list(text)  # whole characters by construction
        self.i, self.step = 0, step
        self.prompt_tokens = prompt_tokens


class ScriptedBackend:
    def __init__(self, spec: dict):
        self.text = str(spec.get("text", "Hello from the scripted model."))
        self.delay_s = float(spec.get("delay_s", 0.0))
        self.tokens_per_delta = max(1, int(spec.get("tokens_per_delta", 1)))
        self.info = {"backend": "scripted", "chat": True}
        time.sleep(float(spec.get("load_delay_s", 0.0)))  # stands in for loading big weights

    def capacity(self) -> int:
        return 1 << 30

    def open(self, mode: str, payload: Any, sampling: dict, *, echo: bool = False,
             logprobs: int | None = None) -> ScriptedSequence:
        text = self.text
        if isinstance(payload, list) and mode == "complete":
            payload = " ".join(str(t) for t in payload)
        if "{prompt}" in text:  # lets a test see what reached the model
            text = text.replace("{prompt}", payload if mode == "complete" else payload[-1]["content"])
        prompt = payload if mode == "complete" else " ".join(m["content"] for m in payload)
        stops = sampling.get("stop") or []
        return ScriptedSequence(text, self.tokens_per_delta, int(sampling.get("max_tokens") or 256),
                                len(prompt.split()), [stops] if isinstance(stops, str) else list(stops))

    def step(self, seqs: list[ScriptedSequence]) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        for s in seqs:
            if s.i >= len(s.chars):
                s.finish("stop")
            elif s.completion_tokens >= s.max_tokens:
                s.finish("length")
            else:
                s.emit("".join(s.chars[s.i:s.i + s.step]))
                s.i += s.step
                s.completion_tokens += 1
                if s.i >= len(s.chars) and not s.done:
                    s.finish("stop")

    def release(self, seq: ScriptedSequence) -> None:
        pass

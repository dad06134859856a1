"""What a training run will cost before it starts: size, tokens, steps, memory and wall time.

The numbers come from the trainer's own rules (``trainer.sizing``, pure Python: shapes, parameter
counts, the run's length and schedule), from what the trainer finds in the data (datafacts.py: its
tokenizer's vocabulary and the token counts, learnt by preparing the data with the trainer's code),
and from a short calibration run of the real trainer on this machine's device (``python -m
trainer.calibrate``, started through runner.py and cached per device and shape in AppState): the time
of a step and of what a run does besides (start-up, evaluations, samples, checkpoints) and the
process's peak memory. Until a calibration is cached the time is extrapolated from the nearest
calibrated shape by FLOPs, or from a conservative FLOP rate, and the answer says so (``time.source``);
until the data's facts are known the plan says what it assumed (``data.note``, ``exact`` false).
"""

from __future__ import annotations

import math
import threading
from typing import Any

from trainer import sizing

from .models import AppState

# A model needs roughly this many bytes of text per token with a small BPE vocabulary; used only to
# warn about too little data before the tokenizer has seen it.
BYTES_PER_TOKEN = 3.6
TIGHT_FRACTION = 0.8  # above this share of the device's memory a run is "tight"
FALLBACK_FLOPS = {"cpu": 20e9, "mps": 2e12, "cuda": 100e12}  # sustained FLOP/s when nothing is measured
DEFAULT_VOCAB = 8192
VAL_FRACTION = 0.05  # trainer/data.py's default validation split


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def _calibration_prefix(device_name: str) -> str:
    # the trainer's speed revision is part of the key: timings of an older trainer are not reused
    return f"calib:r{sizing.SPEED_REVISION}:{device_name}:"


def calibration_key(device_name: str, shape: sizing.ModelShape, batch_size: int) -> str:
    return f"{_calibration_prefix(device_name)}d{shape.depth}:v{shape.vocab_size}:t{shape.seq_len}:b{batch_size}"


def cached_calibration(device_name: str, shape: sizing.ModelShape, batch_size: int) -> dict | None:
    row = AppState.get_or_none(AppState.key == calibration_key(device_name, shape, batch_size))
    return row.value if row else None


def store_calibration(device_name: str, shape: sizing.ModelShape, batch_size: int, result: dict) -> None:
    key = calibration_key(device_name, shape, batch_size)
    AppState.insert(key=key, value=result).on_conflict(
        conflict_target=[AppState.key], update={AppState.value: result}).execute()


def _nearest_rate(device_name: str, flops_per_step: float) -> float | None:
    """FLOP/s achieved by the calibrated shape on this device closest in FLOPs per step."""
    best: tuple[float, float] | None = None
    for row in AppState.select().where(AppState.key.startswith(_calibration_prefix(device_name))):
        v = row.value or {}
        rate = v.get("flops_per_sec")
        if not rate or not v.get("flops_per_step"):
            continue
        distance = abs(math.log(v["flops_per_step"] / flops_per_step))
        if best is None or distance < best[0]:
            best = (distance, rate)
    return best[1] if best else None


def estimate(config: dict[str, Any], device: dict[str, Any], *, data_bytes: int | None = None,
             defaults: dict[str, int] | None = None, facts: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plan for ``config`` on ``device`` ({"device", "device_name", "memory_bytes"}, and the probe's
    "startup_s" and "base_rss_bytes" when known).

    ``facts`` (datafacts.for_plan) are what the trainer finds in the data: with status "known" the
    vocabulary, training tokens, parameters and steps are exactly the run's (``exact``); otherwise
    the plan assumes a vocabulary and BYTES_PER_TOKEN and says so in ``data``. Wall time adds to the
    steps what a run also spends (start-up, data preparation, evaluations, samples, checkpoints), each
    from the calibration of this shape when there is one. Raises ValueError for a shape the trainer
    would refuse (the message names the setting).
    """
    kind = device.get("device", "cpu")
    defaults = defaults or sizing.device_defaults(kind)
    seq_len = int(config.get("seq_len") or defaults["seq_len"])
    batch = int(config.get("batch_size") or defaults["batch_size"])
    facts = dict(facts or {})
    exact = facts.get("status") == "known"
    if exact:
        vocab = int(facts["vocab_size"])
        train_tokens, val_tokens = int(facts["n_train_tokens"]), int(facts.get("n_val_tokens") or 0)
        data_bytes = facts.get("raw_bytes") or data_bytes
        est_tokens: int | None = train_tokens + val_tokens
    else:
        # The trainer sizes a new tokenizer's vocabulary from the data; unknown data gets a common size.
        vocab = int(config.get("vocab_size") or (sizing.choose_vocab_size(data_bytes) if data_bytes else DEFAULT_VOCAB))
        est_tokens = int(data_bytes / BYTES_PER_TOKEN) if data_bytes is not None else None
        train_tokens = int(est_tokens * (1 - VAL_FRACTION)) if est_tokens is not None else None
        val_tokens = est_tokens - train_tokens if est_tokens is not None and train_tokens is not None else None
    shape = sizing.shape_for(int(config["depth"]), vocab, seq_len)
    counts = sizing.param_counts(shape)
    params = counts["total"]
    tokens_per_step = batch * seq_len
    # The trainer's own rule (sizing.run_length): ~20 tokens per parameter, at most a few passes over the data.
    steps, budget = sizing.run_length(params, tokens_per_step, train_tokens, max_steps=config.get("max_steps"))
    tokens = steps * tokens_per_step
    fpt = sizing.flops_per_token(shape)

    calib = cached_calibration(device.get("device_name", kind), shape, batch)
    if calib and calib.get("tokens_per_sec"):
        tps, source = float(calib["tokens_per_sec"]), "calibrated"
    else:
        rate = _nearest_rate(device.get("device_name", kind), fpt * tokens_per_step)
        source = "extrapolated" if rate else "rough"
        tps = (rate or FALLBACK_FLOPS.get(kind, FALLBACK_FLOPS["cpu"])) / fpt
        calib = None
    breakdown = _time_breakdown(config, steps, tokens_per_step / tps, calib, device, facts, data_bytes,
                                sizing.eval_rows(val_tokens, batch, seq_len) if val_tokens is not None
                                else sizing.EVAL_BATCHES * batch, batch, params)
    seconds = sum(breakdown.values())

    mem = sizing.memory_estimate(shape, batch, device_kind=kind)
    # A run's token files are memory-mapped: the pages it reads count in its resident memory.
    itemsize = 2 if vocab <= 1 << 16 else 4
    data_pages = itemsize * (min(tokens, train_tokens if train_tokens is not None else tokens)
                             + sizing.eval_rows(val_tokens or 0, batch, seq_len) * seq_len)
    if calib and calib.get("peak_rss_bytes"):
        peak_rss, peak_source = int(calib["peak_rss_bytes"]) + data_pages, "calibrated"
    else:
        peak_rss = int(device.get("base_rss_bytes") or ROUGH_BASE_RSS) + mem["total"] + data_pages
        peak_source = "rough"
    need, have = mem["total"], int(device.get("memory_bytes") or 0)
    if kind == "cpu":
        need = max(need, peak_rss)  # the device's memory is the machine's: the whole process counts
    verdict = "unknown" if not have else ("fits" if need <= TIGHT_FRACTION * have
                                            else "tight" if need <= have else "wont_fit")

    warnings: list[str] = []
    data = _data_summary(facts, exact, data_bytes, est_tokens, train_tokens, val_tokens, vocab, tokens)
    about = "" if exact else "about "
    if facts.get("status") == "error":
        warnings.append(f"This data cannot be used: {facts.get('message') or 'preparing it failed'}.")
    if train_tokens is not None and est_tokens is not None:
        if train_tokens < tokens_per_step + 1:
            warnings.append(f"The data holds {about}{_human(est_tokens)} tokens, fewer than one batch "
                            f"({_human(tokens_per_step)}): the run would fail. Add data or shrink the batch.")
        elif budget == "data":
            ideal = sizing.default_training_tokens(params)
            warnings.append(f"The data is small for this size: a {_human(params)}-parameter model learns best "
                            f"from about {_human(ideal)} tokens, but the data holds {about}"
                            f"{_human(train_tokens)}, so the run stops after {sizing.DEFAULT_MAX_EPOCHS:g} "
                            f"passes over it. Add data, or choose a smaller depth.")
        elif train_tokens and tokens > sizing.DEFAULT_MAX_EPOCHS * train_tokens:
            warnings.append(f"The run reads the data {tokens / train_tokens:.0f} times: a model repeats "
                            f"and memorises small data. Lower max steps or add data.")
    if verdict == "wont_fit":
        warnings.append(f"Needs about {need / 2**30:.1f} GiB but the device has {have / 2**30:.1f} GiB: "
                        f"lower the depth or the batch size.")
    return {
        "shape": shape.to_dict(),
        "params": params,
        "params_human": _human(params),
        "param_counts": counts,
        "flops_per_token": fpt,
        "batch_size": batch,
        "seq_len": seq_len,
        "vocab_size": vocab,
        "tokens_per_step": tokens_per_step,
        "steps": steps,
        "tokens": tokens,
        "tokens_human": _human(tokens),
        "tokens_per_param": round(tokens / params, 2),
        "budget": budget,
        "exact": exact,
        "memory": {"needed_bytes": mem["total"], "device_bytes": have or None, "verdict": verdict, "breakdown": mem,
                   "peak_rss_bytes": peak_rss, "peak_source": peak_source},
        "time": {"seconds": seconds, "tokens_per_sec": tps, "source": source,
                 "breakdown": {k: round(v, 3) for k, v in breakdown.items()}},
        "device": device,
        "data": data,
        "warnings": warnings,
    }


# What a run spends besides its steps, when no calibration of the shape says: generous guesses for a
# small CPU machine (every calibration replaces them with this machine's own figures).
ROUGH_STARTUP_S = 5.0  # interpreter, torch and the trainer's imports, device set-up
ROUGH_BASE_RSS = 400 << 20  # a process with torch loaded, before the model
ROUGH_SAMPLE_S = 0.3  # one generation of sizing.SAMPLE_TOKENS tokens with a tiny model
COLD_PREPARE_BYTES_PER_S = 1.2e6  # training the tokenizer and tokenizing, data new to the cache
WARM_PREPARE_BYTES_PER_S = 6e6  # hashing the data and finding its tokens in the cache


def _time_breakdown(config: dict, steps: int, step_s: float, calib: dict | None, device: dict, facts: dict,
                    data_bytes: int | None, eval_rows: int, batch: int, params: int) -> dict[str, float]:
    """Seconds by part of a run, from the calibration of its shape (``calib``) when there is one."""
    c = calib or {}
    events = sizing.run_events(steps, checkpoint_every=int(config.get("checkpoint_every") or sizing.CHECKPOINT_EVERY))
    if facts.get("warm_prepare_s") is not None:
        prepare_s = float(facts["warm_prepare_s"])  # measured: the preparation left the tokens in the cache
    elif facts.get("origin") == "run":
        prepare_s = (data_bytes or 0) / WARM_PREPARE_BYTES_PER_S  # the earlier run left them there
    else:
        prepare_s = (data_bytes or 0) / COLD_PREPARE_BYTES_PER_S
    eval_batch_s = c.get("eval_batch_s", step_s / 3)  # a forward pass is about a third of a training step
    return {
        "startup": float(c.get("startup_s") or device.get("startup_s") or ROUGH_STARTUP_S) + float(c.get("build_s", 0.0)),
        "data": prepare_s,
        "steps": steps * step_s + float(c.get("first_step_extra_s", 0.0)),
        "evals": events["evals"] * eval_rows / batch * eval_batch_s,
        "samples": events["samples"] * float(c.get("sample_s", ROUGH_SAMPLE_S)),
        # weights and optimizer state, about 16 bytes a parameter, at a slow disk's 200 MB/s
        "checkpoints": events["checkpoints"] * float(c.get("checkpoint_s", 0.05 + 16 * params / 200e6)),
    }


def _data_summary(facts: dict, exact: bool, data_bytes: int | None, est_tokens: int | None,
                  train_tokens: int | None, val_tokens: int | None, vocab: int, tokens: int) -> dict[str, Any]:
    """The plan's ``data``: sizes, passes, where the numbers come from and a sentence saying so."""
    status = facts.get("status") or "unknown"
    data: dict[str, Any] = {"bytes": data_bytes, "est_tokens": est_tokens, "train_tokens": train_tokens,
                            "val_tokens": val_tokens, "status": status, "origin": facts.get("origin"),
                            "exact": exact}
    if train_tokens is not None:
        data["epochs"] = round(tokens / train_tokens, 2) if train_tokens else None
    counts = f"a {vocab:,}-entry vocabulary and {train_tokens:,} training tokens" if train_tokens is not None else ""
    if exact:
        data["note"] = {
            "prepared": f"Exact: {counts}, from preparing this data the way the trainer will.",
            "precomputed": f"Exact: {counts}; the demo corpus is fixed, so this is what the trainer makes of it.",
            "run": f"Exact if the data has not changed since job #{facts.get('job_id')} read it: {counts}.",
        }.get(str(facts.get("origin")), f"Exact: {counts}.")
        return data
    data["assumed"] = {"vocab_size": vocab, "bytes_per_token": BYTES_PER_TOKEN, "val_fraction": VAL_FRACTION}
    assumption = (f"a {vocab:,}-entry vocabulary and {BYTES_PER_TOKEN} bytes per token"
                  + (f" (about {_human(est_tokens)} tokens)" if est_tokens is not None else ""))
    if status == "estimating":
        data["note"] = f"Estimating: the data is being prepared the way the trainer reads it. Until then this assumes {assumption}."
    elif status == "error":
        data["note"] = f"The data could not be prepared ({facts.get('message') or 'unknown error'}); this assumes {assumption}."
    else:
        data["note"] = (f"Assumed: {assumption}, since no run has read this data yet. The job page sets the "
                        f"trainer's own plan beside this one as soon as it starts.")
    return data


class Calibrator:
    """Runs calibrations in the background, one at a time, and remembers which are in flight."""

    def __init__(self, run_calibration) -> None:
        self._run = run_calibration  # (shape, batch_size) -> result dict; spawns through runner.py
        self._lock = threading.Lock()
        self._pending: set[str] = set()

    def request(self, device_name: str, shape: sizing.ModelShape, batch_size: int) -> bool:
        """Start a calibration unless cached or running; True when one is (now) in flight."""
        key = calibration_key(device_name, shape, batch_size)
        with self._lock:
            if key in self._pending:
                return True
            if cached_calibration(device_name, shape, batch_size):
                return False
            self._pending.add(key)
        threading.Thread(target=self._work, args=(key, device_name, shape, batch_size), daemon=True).start()
        return True

    def _work(self, key: str, device_name: str, shape: sizing.ModelShape, batch_size: int) -> None:
        from .db import database

        try:
            result = self._run(shape, batch_size)
            if result and result.get("tokens_per_sec"):
                with database.connection_context():
                    store_calibration(device_name, shape, batch_size, result)
        finally:
            with self._lock:
                self._pending.discard(key)

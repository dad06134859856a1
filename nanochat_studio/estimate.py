"""What a training run will cost before it starts: size, tokens, steps, memory and wall time.

The numbers come from the trainer's own formulas (``trainer.sizing``, pure Python) and from a short
calibration run of the real trainer on this machine's device (``python -m trainer.calibrate``, started
through runner.py and cached per device and shape in AppState). Until a calibration is cached the
time is extrapolated from the nearest calibrated shape by FLOPs, or from a conservative FLOP rate, and
the answer says so (``time.source``).
"""

from __future__ import annotations

import math
import threading
from typing import Any

from trainer import sizing
from trainer.sizing import VAL_FRACTION

from .models import AppState

# A model needs roughly this many bytes of text per token with a small BPE vocabulary; used only to
# warn about too little data before the tokenizer has seen it.
BYTES_PER_TOKEN = 3.6
TIGHT_FRACTION = 0.8  # above this share of the device's memory a run is "tight"
FALLBACK_FLOPS = {"cpu": 20e9, "mps": 2e12, "cuda": 100e12}  # sustained FLOP/s when nothing is measured
DEFAULT_VOCAB = 8192


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
             defaults: dict[str, int] | None = None) -> dict[str, Any]:
    """The plan for ``config`` on ``device`` ({"device", "device_name", "memory_bytes"}).

    Raises ValueError for a shape the trainer would refuse (the message names the setting).
    """
    kind = device.get("device", "cpu")
    defaults = defaults or sizing.device_defaults(kind)
    seq_len = int(config.get("seq_len") or defaults["seq_len"])
    batch = int(config.get("batch_size") or defaults["batch_size"])
    # The trainer sizes a new tokenizer's vocabulary from the data; unknown data gets a common size.
    vocab = int(config.get("vocab_size") or (sizing.choose_vocab_size(data_bytes) if data_bytes else DEFAULT_VOCAB))
    shape = sizing.shape_for(int(config["depth"]), vocab, seq_len)
    counts = sizing.param_counts(shape)
    params = counts["total"]
    tokens_per_step = batch * seq_len
    # Rough until the tokenizer has seen the data; the trainer holds out VAL_FRACTION for validation.
    est_tokens = int(data_bytes / BYTES_PER_TOKEN) if data_bytes is not None else None
    train_tokens = int(est_tokens * (1 - VAL_FRACTION)) if est_tokens is not None else None
    if config.get("max_steps"):
        steps, budget = int(config["max_steps"]), "max_steps"
    else:
        # The trainer's own rule: ~20 tokens per parameter, but at most a few passes over the data.
        wanted, budget = sizing.planned_tokens(params, data_tokens=train_tokens)
        steps = max(1, math.ceil(wanted / tokens_per_step))
    tokens = steps * tokens_per_step
    fpt = sizing.flops_per_token(shape)

    mem = sizing.memory_estimate(shape, batch, device_kind=kind)
    need, have = mem["total"], int(device.get("memory_bytes") or 0)
    verdict = "unknown" if not have else ("fits" if need <= TIGHT_FRACTION * have
                                            else "tight" if need <= have else "wont_fit")

    calib = cached_calibration(device.get("device_name", kind), shape, batch)
    if calib and calib.get("tokens_per_sec"):
        tps, source = float(calib["tokens_per_sec"]), "calibrated"
    else:
        rate = _nearest_rate(device.get("device_name", kind), fpt * tokens_per_step)
        source = "extrapolated" if rate else "rough"
        tps = (rate or FALLBACK_FLOPS.get(kind, FALLBACK_FLOPS["cpu"])) / fpt
    seconds = tokens / tps if tps else None

    warnings: list[str] = []
    data: dict[str, Any] = {"bytes": data_bytes, "est_tokens": est_tokens}
    if train_tokens is not None:
        data["epochs"] = round(tokens / train_tokens, 2) if train_tokens else None
        if train_tokens < tokens_per_step + 1:
            warnings.append(f"The data holds about {_human(est_tokens)} tokens, fewer than one batch "
                            f"({_human(tokens_per_step)}): the run would fail. Add data or shrink the batch.")
        elif budget == "data":
            ideal = sizing.default_training_tokens(params)
            warnings.append(f"The data is small for this size: a {_human(params)}-parameter model learns best "
                            f"from about {_human(ideal)} tokens, but the data holds about "
                            f"{_human(train_tokens)}, so the run stops after {sizing.DEFAULT_MAX_EPOCHS:g} "
                            f"passes over it. Add data, or choose a smaller depth.")
        elif tokens > sizing.DEFAULT_MAX_EPOCHS * train_tokens:
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
        "memory": {"needed_bytes": need, "device_bytes": have or None, "verdict": verdict, "breakdown": mem},
        "time": {"seconds": seconds, "tokens_per_sec": tps, "source": source},
        "device": device,
        "data": data,
        "warnings": warnings,
    }


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

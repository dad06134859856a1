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

:func:`estimate_for` answers an estimate request (``GET /api/estimate``, the plan page): it checks the
arguments (:func:`parse_args`, the job config's bounds), asks the app's :class:`Calibrator` for the
device, and starts a calibration of the shape when worth it. :func:`data_bytes` is what is known of a
dataset spec's size before a job runs. :func:`record_for_job` keeps the estimate a job was planned with.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Callable, Mapping

from trainer import sizing
from trainer.sizing import VAL_FRACTION

from . import chatplan, datafacts, datasets, formats, jobconfig
from .db import database
from .errors import BadRequest, NotFound
from .models import AppState, Dataset, TrainingJob, User, parse_id
from .runner import SpawnError

log = logging.getLogger(__name__)

# A model needs roughly this many bytes of text per token with a small BPE vocabulary; used only to
# warn about too little data before the tokenizer has seen it.
BYTES_PER_TOKEN = 3.6
TIGHT_FRACTION = 0.8  # above this share of the device's memory a run is "tight"
FALLBACK_FLOPS = {"cpu": 20e9, "mps": 2e12, "cuda": 100e12}  # sustained FLOP/s when nothing is measured
DEFAULT_VOCAB = 8192


_human = formats.count  # counts in plans and warnings are written as the pages write them


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
    # The trainer's own rule (sizing.run_length): ~20 tokens per parameter (all but the input embedding,
    # sizing.scaling_params), at most a few passes over the data.
    counted = sizing.scaling_params(shape)
    steps, budget = sizing.run_length(counted, tokens_per_step, train_tokens, max_steps=config.get("max_steps"))
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
    data = datafacts.summary(facts, exact, data_bytes, est_tokens, train_tokens, val_tokens, vocab, tokens,
                             assumed={"bytes_per_token": BYTES_PER_TOKEN, "val_fraction": VAL_FRACTION})
    about = "" if exact else "about "
    if facts.get("status") == "error":
        warnings.append(f"This data cannot be used: {facts.get('message') or 'preparing it failed'}.")
    if train_tokens is not None and est_tokens is not None:
        if train_tokens < tokens_per_step + 1:
            warnings.append(f"The data holds {about}{_human(est_tokens)} tokens, fewer than one batch "
                            f"({_human(tokens_per_step)}): the run would fail. Add data or shrink the batch.")
        elif budget == "data":
            ideal = sizing.default_training_tokens(counted)
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
        "scaling_params": counted,  # what tokens_per_param divides by (the length rule's count)
        "tokens_per_param": round(tokens / counted, 2),
        "budget": budget,
        "exact": exact,
        "memory": {"needed_bytes": mem["total"], "device_bytes": have or None, "verdict": verdict, "breakdown": mem,
                   "peak_rss_bytes": peak_rss, "peak_source": peak_source},
        # dtype: what the calibration's steps ran in (the trainer's --dtype auto choice on this device)
        "time": {"seconds": seconds, "tokens_per_sec": tps, "source": source,
                 "dtype": calib.get("dtype") if calib else None,
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
ROUGH_EXIT_S = 0.5  # a torch process's teardown after its last event
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
        "exit": float(device.get("exit_s", ROUGH_EXIT_S)),
    }


# --- requests for an estimate --------------------------------------------------------------------------------

ESTIMATE_KEYS = ("max_steps", "seq_len", "batch_size", "vocab_size")  # besides depth, what an estimate reads
CALIBRATION_MAX_PARAMS_CPU = 200_000_000  # beyond this a CPU timing run itself takes minutes


def _int_arg(args: Mapping[str, Any], key: str) -> int | None:
    raw = args.get(key)
    if raw in (None, ""):
        return None
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise BadRequest(f"'{key}' must be an integer, got {raw!r}") from None
    if value < 1:
        raise BadRequest(f"'{key}' must be positive, got {value}")
    return value


def parse_args(args: Mapping[str, Any]) -> tuple[dict[str, int], str]:
    """The config an estimate request describes (``depth``, required, and any of ESTIMATE_KEYS, within
    the job config's bounds) and its dataset spec ("demo" when none). BadRequest names the argument."""
    config: dict[str, int] = {}
    for key in ("depth", *ESTIMATE_KEYS):
        value = _int_arg(args, key)
        if value is None:
            if key == "depth":
                raise BadRequest("'depth' is required")
            continue
        lo, hi = jobconfig.INT_BOUNDS[key]
        if not lo <= value <= hi:
            raise BadRequest(f"'{key}' must be between {lo} and {hi}, got {value}")
        config[key] = value
    return config, str(args.get("dataset") or "demo")


def data_bytes(spec: str, user: User) -> int | None:
    """What is known of the size of dataset ``spec``'s raw text before a job runs (None: nothing yet,
    e.g. a URL not fetched). NotFound for an upload that is not ``user``'s."""
    if spec == "demo":
        return sizing.DEMO_CORPUS_BYTES
    if spec.startswith("ds:") and spec[3:].isdigit():
        pk = parse_id(spec[3:])  # None beyond 64 bits: no such dataset
        ds = None if pk is None else Dataset.get_or_none((Dataset.id == pk) & (Dataset.user == user))
        if ds is None:
            raise NotFound(f"no dataset {spec[:40]}")
        return ds.counted_bytes  # gzip: what it expands to, which is what the trainer reads
    return None


def estimate_for(args: Mapping[str, Any], user: User, calibrator: "Calibrator", *, calibrate: bool = True) -> dict:
    """The plan for the config in ``args`` (a query string or a job config) on the app's device, with
    ``calibrating`` saying whether a timing run of its shape is under way. Raises BadRequest, NotFound."""
    ask = chatplan.parse(args, user)  # a chat stage (chatplan.py); NotFound for another user's model
    if ask is not None and ask.model is not None:
        args = chatplan.model_args(ask, args)  # chat-tuning a model: its shape, no pretraining
    config, spec = parse_args(args)
    dev = calibrator.device()
    known = spec != chatplan.FROM_MODEL_DATA
    size = data_bytes(spec, user) if known else None  # first: NotFound for another user's upload
    # What the trainer will find in the data; a missing preparation is queued when it can be.
    facts = datafacts.for_plan(spec, user, config.get("vocab_size"),
                               calibrator.prepare if calibrate else None) if known else {}
    try:
        plan = estimate(config, dev, data_bytes=size, facts=facts)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    if ask is not None:
        chatplan.add_stage(plan, ask, user)
    plan["calibrating"] = False
    if calibrate and plan["time"]["source"] != "calibrated" and _worth_calibrating(plan, dev):
        if facts.get("status") == "estimating" or facts.get("preparing"):
            # The data's preparation first: a guessed vocabulary is not worth timing, and a timing run
            # beside a preparation would measure both. Still "calibrating": the page asks again.
            plan["calibrating"] = True
        else:
            shape = sizing.shape_for(config["depth"], plan["vocab_size"], plan["seq_len"])
            plan["calibrating"] = calibrator.request(dev["device_name"], shape, plan["batch_size"])
    return plan


def _worth_calibrating(plan: dict, device: dict) -> bool:
    # Only a shape that comfortably fits is timed (a timing run must not push the machine into swap or
    # out of GPU memory), and on a CPU only one whose timing run itself takes seconds, not minutes.
    if plan["memory"]["verdict"] != "fits":
        return False
    return device["device"] != "cpu" or plan["params"] <= CALIBRATION_MAX_PARAMS_CPU


def record_for_job(job: TrainingJob, calibrator: "Calibrator") -> None:
    """Keep on ``job`` the estimate its config gets now (what the plan page showed). A courtesy: a job
    whose config cannot be estimated keeps none."""
    spec = datasets.describe_spec(job.config.get("dataset"))
    try:
        plan = estimate_for({**job.config, "dataset": spec}, job.user, calibrator, calibrate=False)
    except (BadRequest, NotFound):
        return
    summary = {k: plan[k] for k in ("params", "tokens", "steps", "time", "memory", "vocab_size", "budget", "exact",
                                    "data", "batch_size", "seq_len", "tokens_per_step", "stages", "chat")
               if k in plan}  # stages, chat: a chat stage's (chatplan.py)
    TrainingJob.update(estimate=summary).where(TrainingJob.id == job.id).execute()


# --- the device and its calibrations ---------------------------------------------------------------------------

DEVICE_PROBE_KEY = "device_probe"  # AppState: the last answer of the probe, used when it fails
UNKNOWN_DEVICE = {"device": "cpu", "device_name": "cpu", "memory_bytes": 0}

Shape = sizing.ModelShape


class Calibrator:
    """What the app knows of the device its jobs train on, and the timing runs that calibrate its
    estimates there. One per app (``app.extensions["ncs_calibrator"]``, made by create_app).

    ``probe()`` answers {"device", "device_name", "memory_bytes"} (runner.probe_device asks the trainer)
    and may raise SpawnError; ``run(shape, batch_size)`` times a shape on a free worker slot and answers
    the calibration event's fields, or None when no slot was free (tasks.calibrate_on_a_slot);
    ``prepare(key)``, when given, queues the preparation of a dataset's facts (datafacts.py).
    Calibrations run one at a time on one thread, the newest request first; at most MAX_PENDING wait
    (older requests are dropped: the person planning has moved on), and a shape whose run gave no
    answer is not asked for again before RETRY_AFTER_S.
    """

    MAX_PENDING = 4
    RETRY_AFTER_S = 60.0

    def __init__(self, probe: Callable[[], dict], run: Callable[[Shape, int], dict | None],
                 prepare: Callable[[str], bool] | None = None) -> None:
        self._probe, self._run = probe, run
        # queues the preparation of a dataset's facts by their datafacts key (tasks.enqueue_facts)
        self.prepare = prepare
        self._device: dict[str, Any] | None = None
        self._probe_lock = threading.Lock()
        self._lock = threading.Lock()  # guards everything below
        self._queue: list[tuple[str, str, Shape, int]] = []  # oldest first
        self._running: str | None = None
        self._not_before: dict[str, float] = {}
        self._thread: threading.Thread | None = None

    def device(self) -> dict[str, Any]:
        """{"device", "device_name", "memory_bytes"}: probed once, remembered in AppState for the day the
        probe fails."""
        with self._probe_lock:
            if self._device is None:
                cached = AppState.get_or_none(AppState.key == DEVICE_PROBE_KEY)
                try:
                    started = time.monotonic()
                    self._device = self._probe()
                    if self._device.get("startup_s") is not None:
                        # The probe is a trainer-like process: what its life took beyond getting ready is
                        # the exit (torch's teardown) that every run also pays.
                        lived = time.monotonic() - started
                        self._device["exit_s"] = round(max(0.0, lived - float(self._device["startup_s"])), 3)
                    AppState.insert(key=DEVICE_PROBE_KEY, value=self._device).on_conflict(
                        conflict_target=[AppState.key], update={AppState.value: self._device}).execute()
                except SpawnError:
                    log.warning("the device probe failed; planning with the last known device", exc_info=True)
                    self._device = cached.value if cached else dict(UNKNOWN_DEVICE)
            return dict(self._device)

    def request(self, device_name: str, shape: Shape, batch_size: int) -> bool:
        """Ask for a calibration of ``shape`` unless it is cached; True while one is waiting or running."""
        key = calibration_key(device_name, shape, batch_size)
        with self._lock:
            if key == self._running or any(k == key for k, *_ in self._queue):
                return True
            if time.monotonic() < self._not_before.get(key, 0.0) or cached_calibration(device_name, shape,
                                                                                        batch_size):
                return False
            self._queue.append((key, device_name, shape, batch_size))
            del self._queue[:-self.MAX_PENDING]
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="calibrator", daemon=True)
                self._thread.start()
        return True

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._running = self._thread = None
                    return
                key, device_name, shape, batch_size = self._queue.pop()
                self._running = key
            try:
                result = self._run(shape, batch_size)
            except Exception:  # SpawnError (a failed or slow timing run), or the database
                log.warning("calibrating %s failed", key, exc_info=True)
                result = None
            if result and result.get("tokens_per_sec"):
                with database.connection_context():
                    store_calibration(device_name, shape, batch_size, result)
            else:
                with self._lock:
                    self._not_before[key] = time.monotonic() + self.RETRY_AFTER_S

"""The JSON-lines contract between the trainer and whoever watches it.

Every line the trainer writes to stdout is one JSON object with an ``event`` field; human-readable
logs go to stderr. The web app parses trainer output only through :func:`parse_line` and reads exit
codes only through the constants below. This module imports nothing beyond the standard library so
the web process can use it without torch.

Events and their fields (extra fields are allowed; these are guaranteed):

``start``      config (dict), params (int), flops_per_token (int), total_steps (int),
               total_tokens (int), device (str), world_size (int), resumed_from_step (int|None);
               the trainer also sends budget ("tokens_per_param" | "data" | "max_steps" |
               "target_tokens": what set the run's length), data_source (str), data_sha256 (str,
               the content hash of the training text, shown on the model card), vocab_size (int, the
               tokenizer's), n_train_tokens and n_val_tokens (int, the prepared split), data_bytes
               (int, UTF-8 bytes of the text tokenized) and tokens_per_step (int): the facts an
               estimate needs, so the job page can set the plan beside what the trainer decided
``step``       step, total_steps, loss, lr, tokens_per_sec, mfu (float|None), elapsed_s, eta_s
``eval``       step, val_loss, val_bpb
``sample``     step, samples: list of {"prompt": str, "text": str}
``checkpoint`` step, path
``done``       step, final_loss, final_val_bpb (float|None), elapsed_s, checkpoint (path|None)
``error``      kind ("user" | "infrastructure"), code (a short slug), message. A fault of the device
               itself has code ``device`` (kind "infrastructure") and also ``fault``: one of
               DEVICE_FAULTS ("oom", "cuda", "lost", "ecc", "nccl"), and ``device_index`` (the CUDA index
               it ran on, among CUDA_VISIBLE_DEVICES) when one process used one GPU. The supervisor then
               quarantines that GPU and retries the job elsewhere (nanochat_studio/quarantine.py).

``python -m trainer.calibrate`` speaks the same contract with one more event:

``calibration`` device, device_name, memory_bytes (total memory of the device), base_rss_bytes (the
               process's resident memory once torch is loaded), and when a shape was timed: shape
               (dict), tokens_per_sec, step_s, first_step_extra_s, eval_batch_s, sample_s (one
               generation of SAMPLE_TOKENS), checkpoint_s, startup_s (process start to ready),
               peak_memory_bytes (CUDA: the allocator's peak; None where unknown) and peak_rss_bytes
               (the process's resident peak; None off Linux)

``python -m trainer.facts`` (prepare a dataset the way the trainer will) adds:

``facts``      data_sha256, raw_bytes, vocab_size, n_train_tokens, n_val_tokens, and n_bytes,
               prepare_s (this preparation, cold or not), warm_prepare_s (a preparation that finds
               the cache filled, what a run pays), from_cache (bool)
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import IO, Any

SCHEMA_VERSION = 1

EVENTS = ("start", "step", "eval", "sample", "checkpoint", "done", "error", "calibration", "facts", "stage")
REQUIRED: dict[str, tuple[str, ...]] = {
    "start": ("config", "params", "flops_per_token", "total_steps", "total_tokens", "device"),
    "step": ("step", "total_steps", "loss", "lr", "tokens_per_sec", "elapsed_s", "eta_s"),
    "eval": ("step", "val_loss", "val_bpb"),
    "sample": ("step", "samples"),
    "checkpoint": ("step", "path"),
    "done": ("step", "final_loss"),
    "error": ("kind", "code", "message"),
    "calibration": ("device", "device_name", "memory_bytes"),
    "facts": ("data_sha256", "raw_bytes", "vocab_size", "n_train_tokens", "n_val_tokens"),
    "stage": ("stage", "step", "steps"),
}

ERROR_KINDS = ("user", "infrastructure")

# Exit codes. Anything not listed (1, negative signal numbers, ...) is an infrastructure failure
# that a supervisor may retry from the last checkpoint.
EXIT_OK = 0
EXIT_USAGE = 2  # bad flags or config (argparse also exits 2): a user error, never retried
EXIT_DATA = 65  # the dataset is empty, binary, undecodable or too small: a user error (EX_DATAERR)
EXIT_DIVERGED = 66  # loss became NaN/inf or exploded: a user error (try a lower learning rate)
EXIT_PREEMPTED = 75  # SIGTERM: checkpointed and stopped on request; resumable (EX_TEMPFAIL)

USER_ERROR_EXITS = frozenset({EXIT_USAGE, EXIT_DATA, EXIT_DIVERGED})

# A device fault (see ``error`` above): the error code, and what :func:`device_fault` can name.
DEVICE_ERROR_CODE = "device"
DEVICE_FAULTS = ("oom", "cuda", "lost", "ecc", "nccl")
# Lower-case fragments of CUDA, cuBLAS, cuDNN, NCCL and driver messages, per fault; the first match wins.
_DEVICE_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("lost", ("fallen off the bus", "gpu is lost", "gpu has fallen", "cudaerrordevicesunavailable",
              "no cuda gpus are available", "cuda-capable device(s) is/are busy or unavailable",
              "device not ready", "assigned gpu is gone")),
    ("ecc", ("uncorrectable ecc", "ecc error")),
    ("oom", ("cuda out of memory", "cuda error: out of memory", "cublas_status_alloc_failed")),
    ("nccl", ("nccl error", "ncclunhandledcudaerror", "ncclsystemerror")),
    ("cuda", ("cuda error", "cublas_status_", "cudnn_status_", "cudnn error", "illegal memory access",
              "unspecified launch failure", "cuda driver error")),
)
# The program's own bug reported through CUDA (an index out of range in a kernel): another GPU would fail
# the same way, so it accuses no device.
_PROGRAM_FAULTS = ("device-side assert",)


def device_fault(type_name: str, message: str) -> str | None:
    """Which of DEVICE_FAULTS an exception (by its class name and message) is, or None when it is not the
    device's. Pure text matching: the trainer classifies with it, and the tests need no GPU."""
    if type_name == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return "oom"
    text = message.lower()
    if any(f in text for f in _PROGRAM_FAULTS):
        return None
    for fault, fragments in _DEVICE_PATTERNS:
        if any(f in text for f in fragments):
            return fault
    return None


# ``python -m trainer.serve`` (a model server, not a training run) exits with this when its checkpoint is
# missing or cannot load: starting it again will not help.
EXIT_BAD_CHECKPOINT = 3


def outcome_of_exit(code: int) -> str:
    """Map a trainer exit code to 'completed', 'user_error', 'preempted' or 'infrastructure'."""
    if code == EXIT_OK:
        return "completed"
    if code in USER_ERROR_EXITS:
        return "user_error"
    if code == EXIT_PREEMPTED:
        return "preempted"
    return "infrastructure"


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; a diverged loss must still be a valid line.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def format_event(event: str, **fields: Any) -> str:
    """One JSON line (no trailing newline) for ``event`` with ``fields``."""
    if event not in EVENTS:
        raise ValueError(f"unknown progress event {event!r}")
    missing = [k for k in REQUIRED[event] if k not in fields]
    if missing:
        raise ValueError(f"progress event {event!r} lacks {', '.join(missing)}")
    record = {"event": event, "v": SCHEMA_VERSION, "time": round(time.time(), 3)}
    record.update(_clean(fields))
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str)


class Emitter:
    """Writes events to a stream (stdout by default); a disabled emitter (non-zero ranks) is silent."""

    def __init__(self, stream: IO[str] | None = None, enabled: bool = True):
        self.stream = stream
        self.enabled = enabled

    def __call__(self, event: str, **fields: Any) -> None:
        line = format_event(event, **fields)
        if not self.enabled:
            return
        out = self.stream or sys.stdout
        out.write(line + "\n")
        out.flush()


emit = Emitter()


def parse_line(line: str | bytes) -> dict[str, Any] | None:
    """The event in one line of trainer stdout, or None if the line is not a contract event.

    Never raises on garbage: a stray print from a library must not break the supervisor.
    """
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("event") not in EVENTS:
        return None
    if any(k not in record for k in REQUIRED[record["event"]]):
        return None
    return record

"""Refuse at submit the work no worker can ever run (issue 10, point 6).

:func:`check` reads the worker registry (workers.py): the live workers and the devices they train on.

* ``gpus: n`` is refused when no live worker has n GPUs (a CPU-only install has none: it runs one job
  per CPU slot and never a multi-GPU one). The message names the workers and what they have.
* A shape is refused when, on every device of the workers that could take the job, the estimate's
  memory verdict (estimate.estimate, the numbers the plan page shows) is "wont_fit". The message gives
  the memory needed and the largest device's. "tight" and "unknown" (a GPU whose memory NVML could not
  read) are accepted: the estimate may be pessimistic there, and the trainer halves its CUDA batch to fit.
* No live worker at all (the web started with the worker off, the worker not up yet, scaled to zero):
  the job is **accepted with a warning**, kept in its "submitted" event and shown as why it waits. A
  worker may start later (the autoscaler starts one for the first queued job), and refusing would make
  a scale-from-zero setup unusable. Quarantined GPUs still count: a quarantine ends.
"""

from __future__ import annotations

from typing import Any

from . import datasets, estimate, workers
from .jobconfig import JobConfigError
from .models import User
from .quarantine import per_device_config

NO_WORKER_WARNING = ("No worker is running right now: the job waits in the queue until one starts "
                     "(`nanochat-studio worker`, or `serve` with the worker on).")


def check(config: dict[str, Any], user: User) -> str:
    """"" or a warning for the validated job ``config``; raises JobConfigError (400) with the numbers
    when no live worker can run it."""
    rows = workers.live()
    if not rows:
        return NO_WORKER_WARNING
    wanted = int(config.get("gpus") or 1)
    able = [r for r in rows if (r.gpu_count >= wanted if r.gpu_count else wanted == 1)]
    if not able:
        most = max(r.gpu_count for r in rows)
        have = f"at most {most} GPU{'s' if most != 1 else ''}" if most else "no GPU (CPU only)"
        raise JobConfigError(f"'gpus' asks for {wanted}, but the running workers have {have}: "
                             f"{workers.summary(rows)}. Ask for {max(most, 1)} or fewer.")
    data_bytes = _data_bytes(config, user)
    per_device = per_device_config(config, wanted)
    verdicts = []
    for row in able:
        for device in row.devices:  # one per slot, and a slot is one GPU (or a CPU share)
            try:
                plan = estimate.estimate(per_device, device, data_bytes=data_bytes)
            except ValueError as exc:
                raise JobConfigError(str(exc)) from None
            verdicts.append((plan["memory"], device))
            if plan["memory"]["verdict"] != "wont_fit":
                return ""
    if not verdicts:
        return ""
    memory, biggest = max(verdicts, key=lambda v: v[0]["device_bytes"] or 0)  # the best chance it had
    need = memory["needed_bytes"]
    where = f"{biggest['device_name']} with {_gib(memory['device_bytes'])} GiB"
    split = f" per GPU (batch split over {wanted})" if wanted > 1 else ""
    shape = (f"depth {config['depth']}, seq_len {config.get('seq_len', 'default')}, "
             f"batch_size {config.get('batch_size', 'default')}")
    raise JobConfigError(f"this run needs about {_gib(need)} GiB of memory{split} ({shape}), "
                         f"but the largest device of the running workers is {where}: it won't fit. "
                         "Lower the depth, the sequence length or the batch size.")


def _data_bytes(config: dict[str, Any], user: User) -> int | None:
    try:
        return estimate.data_bytes(datasets.describe_spec(config.get("dataset")), user)
    except Exception:  # the size of the data only refines the vocabulary guess; never refuse over it
        return None


def _gib(n: Any) -> str:
    return f"{(n or 0) / 2**30:,.1f}"

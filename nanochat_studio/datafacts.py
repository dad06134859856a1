"""What the trainer will find in a dataset (its tokenizer's vocabulary and its token counts), learnt
by preparing the data with the trainer's own code, so a plan's size and length are the run's.

Facts depend on the data and on the vocabulary a run asks for (none: the trainer picks one):

- ``demo``: the corpus is fixed by its seed, so its facts ship precomputed (``sizing.DEMO_FACTS``, a
  test holds them to what the trainer prepares) until this installation has prepared it once itself;
- ``ds:<id>`` (an upload): prepared when it is uploaded, by a task on the queue running
  ``python -m trainer.facts`` through runner.py into the data cache runs read, so the first run also
  finds its tokens ready. Until the task is done the plan says "estimating";
- URLs, ``s3://`` prefixes and server paths: learnt from the ``start`` event of the user's latest run
  on the same source; before any run has read it, the plan says what it assumed.

Stored in AppState under ``datafacts:...`` as {"status": "pending"|"ready"|"error", "facts": {...},
"message": str, "at": epoch seconds, "request": {...}}. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any, Callable

from trainer import sizing

from . import formats
from .db import database
from .models import AppState, Dataset, JobEvent, TrainingJob
from .settings import Settings

log = logging.getLogger(__name__)

PREFIX = "datafacts:v1:"
PENDING_STALE_S = 1800.0  # a request nobody finished in this long was lost (huey is at-most-once): ask again
ERROR_RETRY_S = 600.0  # a failed preparation is tried again after this long (bad data fails again, quickly)
RECENT_RUNS = 100  # jobs of the user searched for a run on the same source
_running: set[str] = set()  # keys this process is preparing now
_running_lock = threading.Lock()
FACT_KEYS = ("vocab_size", "n_train_tokens", "n_val_tokens", "raw_bytes", "data_sha256", "warm_prepare_s",
             "prepare_s", "n_bytes")


def key_for(source: str, user_id: int | None, vocab_size: int | None) -> str:
    """The AppState key of the facts for ``source`` (a spec's source string) read with ``vocab_size``."""
    vocab = f"v{vocab_size}" if vocab_size else "vauto"
    if source == "demo":
        return f"{PREFIX}demo:{vocab}"
    if source.startswith("ds:") and source[3:].isdigit():
        return f"{PREFIX}ds{int(source[3:])}:{vocab}"
    digest = hashlib.sha256(source.encode()).hexdigest()[:32]  # URLs can be long; keys are <= 128
    return f"{PREFIX}u{user_id}:{digest}:{vocab}"


def _read(key: str) -> dict | None:
    row = AppState.get_or_none(AppState.key == key)
    return row.value if row and isinstance(row.value, dict) else None


def _write(key: str, value: dict) -> None:
    AppState.insert(key=key, value=value).on_conflict(
        conflict_target=[AppState.key], update={AppState.value: value}).execute()


# --- what an estimate gets --------------------------------------------------------------------------------

def for_plan(source: str, user: Any, vocab_size: int | None,
             enqueue: Callable[[str], bool] | None = None) -> dict:
    """The facts a plan for ``source`` can use now: {"status", "origin", and the fact fields when known}.

    status "known" (fields present), "estimating" (a preparation is queued or running), "unknown" (no
    run has read this source yet) or "error" (``message`` says why the data cannot be used).
    ``origin`` says where known facts come from: "prepared" (trainer.facts on this installation),
    "precomputed" (the demo's shipped facts) or "run" (``job_id``'s start event); ``preparing`` that
    a preparation of the data is under way all the same. With ``enqueue``
    (tasks.enqueue_facts for this app's queue), a missing preparation of the demo or an upload is queued.
    """
    user_id = getattr(user, "id", user)
    key = key_for(source, user_id, vocab_size)
    stored = _read(key)
    if stored and stored.get("status") == "ready":
        return {"status": "known", "origin": "prepared", **stored["facts"]}
    preparable = source == "demo" or (source.startswith("ds:") and source[3:].isdigit())
    if preparable and enqueue is not None and _should_request(stored):
        stored = queue(key, source, user_id, vocab_size, enqueue)
    # A preparation under way competes for the cores: a timing run now would measure it too.
    preparing = bool(stored and stored.get("status") == "pending")
    ran = from_runs(source, user_id, vocab_size)
    if ran is not None:
        return {**ran, "preparing": preparing}
    if source == "demo" and not vocab_size:
        return {"status": "known", "origin": "precomputed", **sizing.DEMO_FACTS, "preparing": preparing}
    if stored and stored.get("status") == "error":
        return {"status": "error", "message": stored.get("message", "")}
    if stored and stored.get("status") == "pending":
        return {"status": "estimating"}
    return {"status": "unknown"}


def _should_request(stored: dict | None) -> bool:
    if stored is None:
        return True
    age = time.time() - float(stored.get("at") or 0)
    if stored.get("status") == "pending":
        return age > PENDING_STALE_S
    return stored.get("status") == "error" and age > ERROR_RETRY_S


def from_runs(source: str, user_id: int | None, vocab_size: int | None) -> dict | None:
    """Facts from the start event of ``user_id``'s latest run on ``source`` with the same vocabulary
    request, or None. (Exact for data that has not changed since; a URL or a bucket may have.)"""
    from .datasets import describe_spec

    if user_id is None:
        return None
    jobs = (TrainingJob.select(TrainingJob.id, TrainingJob.config).where(TrainingJob.user == user_id)
            .order_by(TrainingJob.id.desc()).limit(RECENT_RUNS))
    for job in jobs:
        config = job.config or {}
        if describe_spec(config.get("dataset")) != source or (config.get("vocab_size") or None) != vocab_size:
            continue
        event = (JobEvent.select().where((JobEvent.job == job.id) & (JobEvent.kind == "start"))
                 .order_by(JobEvent.seq.desc()).first())
        data = event.data if event is not None else {}
        if data.get("n_train_tokens") is None or data.get("vocab_size") is None:
            continue  # not started yet, or a trainer from before the start event carried the counts
        return {"status": "known", "origin": "run", "job_id": job.id, "vocab_size": data["vocab_size"],
                "n_train_tokens": data["n_train_tokens"], "n_val_tokens": data.get("n_val_tokens", 0),
                "raw_bytes": data.get("data_bytes"), "data_sha256": data.get("data_sha256")}
    return None


# --- preparing: queued here, run by a consumer ------------------------------------------------------------

def queue(key: str, source: str, user_id: int | None, vocab_size: int | None,
          enqueue: Callable[[str], bool]) -> dict:
    """Mark ``key`` pending and ring the queue's ``facts`` task for it; returns the stored record."""
    record = {"status": "pending", "at": time.time(),
              "request": {"source": source, "user_id": user_id, "vocab_size": vocab_size}}
    _write(key, record)
    enqueue(key)
    return record


def request_upload(dataset: Dataset, settings: Settings) -> None:
    """Queue the preparation of a just-uploaded dataset with the trainer's default vocabulary."""
    from . import tasks

    source = f"ds:{dataset.id}"
    queue(key_for(source, dataset.user_id, None), source, dataset.user_id, None,
          lambda key: tasks.enqueue_facts(key, settings))


def forget_dataset(dataset_id: int) -> None:
    """Drop the facts of a deleted upload (its id is never reused for other data)."""
    AppState.delete().where(AppState.key.startswith(f"{PREFIX}ds{int(dataset_id)}:")).execute()


def compute(key: str, settings: Settings) -> str:
    """Run ``python -m trainer.facts`` for the request stored under ``key`` and store its answer;
    returns the new status. Called by the queue's ``facts`` task, in a consumer thread (the helper
    dies with it). Never raises for the data's or the helper's failures: they become status "error"."""
    from . import runner
    from .storage import Storage
    from .supervisor import data_cache_dir

    with database.connection_context():
        stored = _read(key) or {}
        req = stored.get("request") or {}
        source = req.get("source")
        if stored.get("status") == "ready" or not source:
            return str(stored.get("status") or "missing")
        size = sizing.DEMO_CORPUS_BYTES
        try:
            data = "demo"
            if source != "demo":
                ds = Dataset.get_or_none((Dataset.id == int(source[3:])) & (Dataset.user == req.get("user_id"))
                                         & (Dataset.sha256 != ""))
                if ds is None:
                    AppState.delete().where(AppState.key == key).execute()
                    return "missing"  # deleted meanwhile
                # Local storage answers its own path; remote keys are copied once into the storage cache.
                data = Storage.from_settings(settings).local_path(ds.storage_key)
                size = ds.size_bytes
        except Exception as exc:  # storage unreachable: try again later
            _write(key, {**stored, "status": "error", "at": time.time(), "message": f"cannot read the data: {exc}"})
            return "error"
    args = ["--data", data, "--cache-dir", str(data_cache_dir(settings))]
    if req.get("vocab_size"):
        args += ["--vocab-size", str(int(req["vocab_size"]))]
    with _running_lock:
        if key in _running:
            return "pending"  # rung twice: the other thread is preparing it
        _running.add(key)
    started = time.monotonic()
    try:
        # ~1-2 MB/s tokenizing on one slow core, plus the tokenizer's training: generous, never endless
        facts = runner.run_helper(settings, "trainer.facts", args, event="facts", timeout=600 + size / 200_000)
        record = {"status": "ready", "at": time.time(), "request": req,
                  "facts": {k: facts[k] for k in FACT_KEYS if k in facts}}
        log.info("prepared %s in %.1f s: vocabulary %s, %s training tokens", source, time.monotonic() - started,
                 facts.get("vocab_size"), facts.get("n_train_tokens"))
    except runner.SpawnError as exc:
        record = {"status": "error", "at": time.time(), "request": req, "message": str(exc)}
        log.warning("preparing %s for an estimate failed: %s", source, exc)
    finally:
        with _running_lock:
            _running.discard(key)
    with database.connection_context():
        if _read(key) is not None:  # not forgotten (deleted) while it ran
            _write(key, record)
    return record["status"]


# --- what a plan says about its data ------------------------------------------------------------------------

def summary(facts: dict, exact: bool, data_bytes: int | None, est_tokens: int | None, train_tokens: int | None,
            val_tokens: int | None, vocab: int, tokens: int, *, assumed: dict) -> dict[str, Any]:
    """A plan's ``data``: sizes, passes, where the numbers come from and a sentence saying so. ``assumed``
    holds the estimate's guesses ({"bytes_per_token", "val_fraction"}) for data whose facts are unknown."""
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
    data["assumed"] = {"vocab_size": vocab, **assumed}
    assumption = (f"a {vocab:,}-entry vocabulary and {assumed['bytes_per_token']} bytes per token"
                  + (f" (about {formats.count(est_tokens)} tokens)" if est_tokens is not None else ""))
    if status == "estimating":
        data["note"] = ("Estimating: the data is being prepared the way the trainer reads it. "
                        f"Until then this assumes {assumption}.")
    elif status == "error":
        data["note"] = (f"The data could not be prepared ({facts.get('message') or 'unknown error'}); "
                        f"this assumes {assumption}.")
    else:
        data["note"] = (f"Assumed: {assumption}, since no run has read this data yet. The job page sets the "
                        f"trainer's own plan beside this one as soon as it starts.")
    return data

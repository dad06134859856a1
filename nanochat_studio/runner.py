"""The only code that spawns processes: trainers, short trainer helpers and model servers.

Everything goes through :func:`spawn`: its own process group, and a parent-death signal so a child never
outlives the thread that supervises it. This module owns the process side of a run: the worker's
slots (:class:`Slot`), the run directory's lock (RUN_DIR/trainer.lock, inherited by the trainer), the trainer's
command line and environment, helper runs (:func:`probe_device`, :func:`calibrate`, :func:`export_hf`) and
:func:`start_model_server`. What a training attempt means for the job (events, progress, lease, outcome,
the Model it leaves) is supervisor.py's, which starts its trainer through :func:`spawn`; inference.py
is the only client of the model servers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import functools
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from trainer import progress
from trainer.sizing import ModelShape

from .settings import Settings

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True) if sys.platform == "linux" else None


# --- slots -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slot:
    """A place a job runs in this worker process: one GPU (or several, for torchrun), or a CPU share."""

    name: str
    kind: str  # "cpu" | "gpu"
    gpu_ids: tuple[str, ...] = ()
    threads: int = 1

    def env(self) -> dict[str, str]:
        if self.kind == "gpu":
            # PCI bus order: the ids then mean what nvidia-smi and NVML (gpus.py, quarantines) call them
            return {"CUDA_VISIBLE_DEVICES": ",".join(self.gpu_ids), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        return {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(self.threads)}

    @property
    def device(self) -> str:
        return "cuda" if self.kind == "gpu" else "cpu"


def local_slots(settings: Settings) -> list[Slot]:
    """This process's slots: one per GPU (``gpus`` = auto / none / "0,1"), else ``cpu_slots`` CPU shares."""
    ids: list[str] = []
    if settings.gpus == "auto":
        ids = detect_gpus()
    elif settings.gpus != "none":
        ids = [g for g in settings.gpus.split(",") if g]
    if ids:
        return [Slot(f"gpu{i}", "gpu", (i,)) for i in ids]
    n = settings.cpu_slots
    threads = max(1, (os.cpu_count() or 1) // n)
    return [Slot(f"cpu{k}", "cpu", (), threads) for k in range(n)]


def detect_gpus() -> list[str]:
    """GPU ids visible here, without importing torch (the web process never does). The one GPU
    heuristic of the appliance: CUDA_VISIBLE_DEVICES when set, else what ``nvidia-smi -L`` lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    return list(_nvidia_smi_gpus())


@functools.lru_cache(maxsize=1)
def _nvidia_smi_gpus() -> tuple[str, ...]:
    # Asked once per process: the job pages ask which slots there are for every waiting job.
    if not shutil.which("nvidia-smi"):
        return ()
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(line.split(":", 1)[0].split()[1] for line in out.splitlines() if line.startswith("GPU "))


# --- the spawn primitive -----------------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        # Runs in the child between fork and exec. PR_SET_PDEATHSIG fires when the THREAD that forked
        # exits, so callers spawn from the thread that supervises the child for its whole life.
        if _libc is not None:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def spawn(argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
          stdin: Any = subprocess.DEVNULL, stdout: Any = None, stderr: Any = None,
          pass_fds: Sequence[int] = (), die_with_parent: bool = True) -> subprocess.Popen:
    """Start ``argv`` in its own process group (signals reach its children too), dying with the
    calling thread when ``die_with_parent``. Raises OSError when the program cannot start."""
    return subprocess.Popen(
        list(argv), env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr, pass_fds=tuple(pass_fds),
        start_new_session=True, preexec_fn=_die_with_parent(os.getpid()) if die_with_parent else None,
    )


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


# --- short helper runs of the trainer package (device probe, calibration) -----------------------------


class SpawnError(RuntimeError):
    """A helper program could not start, failed, timed out or gave no answer."""


def run_helper(settings: Settings, module: str, args: Sequence[str], *, event: str, timeout: float,
               slot: Slot | None = None) -> dict:
    """Run ``python -m module args`` on ``slot`` (default: this process's first slot) and return the
    fields of the first ``event`` line it prints. Call it from the thread that waits for the answer
    (the child dies with it). Raises SpawnError."""
    proc, out, err = _run_to_end(settings, module, args, slot or local_slots(settings)[0], timeout)
    for line in out.splitlines():
        record = progress.parse_line(line)
        if record is None:
            continue
        if record["event"] == event:
            return {k: v for k, v in record.items() if k not in ("event", "v", "time")}
        if record["event"] == "error":
            raise SpawnError(record.get("message") or record.get("code") or f"{module} failed")
    raise SpawnError(f"{module} exited {proc.returncode} without a {event} event: {_last_line(err)}")


def _run_to_end(settings: Settings, module: str, args: Sequence[str], slot: Slot,
                timeout: float) -> tuple[subprocess.Popen, bytes, bytes]:
    """Run ``python -m module args`` on ``slot`` until it exits: (the process, its stdout, its stderr).
    SpawnError when it cannot start, or runs past ``timeout`` (its process group is killed then)."""
    try:
        proc = spawn([settings.trainer_python, "-m", module, *args], env=trainer_env(slot), stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    except OSError as exc:
        raise SpawnError(f"cannot start {module}: {exc}") from exc
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        proc.communicate()
        raise SpawnError(f"{module} took longer than {timeout:g} s") from None
    return proc, out, err


def _last_line(err: bytes) -> str:
    """The last line of a child's stderr (where Python puts the exception), cut to fit a message."""
    tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    return tail[0][:300]


def probe_device(settings: Settings) -> dict:
    """{"device", "device_name", "memory_bytes"} of where this process's jobs train, asked of the
    trainer itself (the web process never imports torch). Raises SpawnError."""
    return run_helper(settings, "trainer.calibrate", ["--probe"], event="calibration", timeout=120)


def probe_gpu(settings: Settings, slot: Slot, *, timeout: float = 300) -> dict:
    """A health probe of ``slot``'s GPU: a few real training steps of a tiny model on CUDA (forward,
    backward, optimizer), without compilation. The calibration event's fields; raises SpawnError when
    the GPU cannot train (quarantine.py keeps it out of service then)."""
    args = ["--device", "cuda", "--compile", "false", "--depth", "1", "--vocab-size", "512", "--seq-len", "64",
            "--batch-size", "2", "--steps", "2"]
    return run_helper(settings, "trainer.calibrate", args, event="calibration", timeout=timeout, slot=slot)


def calibrate(settings: Settings, shape: ModelShape, batch_size: int, *, timeout: float = 600,
              slot: Slot | None = None) -> dict:
    """Time a few real training steps at ``shape`` (trainer.sizing.ModelShape) on ``slot`` (default: this
    machine's first): the calibration event's fields (tokens_per_sec, step_s, ...). Raises SpawnError."""
    args = ["--depth", str(shape.depth), "--vocab-size", str(shape.vocab_size), "--seq-len", str(shape.seq_len),
            "--batch-size", str(batch_size)]
    return run_helper(settings, "trainer.calibrate", args, event="calibration", timeout=timeout, slot=slot)


def export_hf(settings: Settings, checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
              timeout: float = 900) -> None:
    """Write the transformers directory of a checkpoint with ``python -m trainer.export_hf`` (torch
    lives there, never in this process). Call it from the thread that waits (the child dies with it).
    Raises SpawnError."""
    proc, _, err = _run_to_end(settings, "trainer.export_hf", [str(checkpoint_dir), str(out_dir)],
                               Slot("export", "cpu"), timeout)
    if proc.returncode != 0:
        raise SpawnError(f"trainer.export_hf exited {proc.returncode}: {_last_line(err)}")


# --- the run directory's lock --------------------------------------------------------------------------


def acquire_run_lock(run_dir: Path, wait_s: float = 0.0) -> int | None:
    """flock RUN_DIR/trainer.lock; the fd (inherited by the trainer) holds it until every holder exits.
    None if another live process holds it after ``wait_s`` seconds."""
    fd = os.open(run_dir / "trainer.lock", os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(0.1)


# --- the trainer's command line and environment ----------------------------------------------------------


def trainer_argv(settings: Settings, slot: Slot, config_path: Path, run_dir: Path) -> list[str]:
    python, module = settings.trainer_python, settings.trainer_module
    args = ["--config", str(config_path), "--out", str(run_dir), "--resume"]
    if slot.kind == "gpu" and len(slot.gpu_ids) > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(slot.gpu_ids)}",
                "-m", module, *args]
    return [python, "-m", module, *args]


def trainer_env(slot: Slot | None = None) -> dict[str, str]:
    """This process's environment for a trainer-package child, on ``slot`` when given."""
    env = dict(os.environ)
    if slot is not None:
        env.update(slot.env())
    env["PYTHONUNBUFFERED"] = "1"
    # Make `trainer` importable whether it is installed or this is a checkout, without touching cwd.
    spec = importlib.util.find_spec("trainer")
    if spec and spec.submodule_search_locations:
        root = str(Path(list(spec.submodule_search_locations)[0]).parent)
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


# --- model servers (owned by the chat engineer; inference.py is their only client) ----------------------


def start_model_server(checkpoint_dir: str, socket_path: str, device: str, settings: Settings, *,
                       stderr: Any = None, max_active: int = 16) -> subprocess.Popen:
    """Start ``python -m trainer.serve`` for one checkpoint, listening on ``socket_path``; returns the Popen
    (inference.ModelPool waits for the socket, stops and restarts it). Raises OSError."""
    env = trainer_env()
    # tiny models decode fastest on few threads; an explicit OMP_NUM_THREADS is left alone
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    # the engine's C kernels are built for this machine into the data directory (trainer/native.py): a
    # service's home may be read-only, and its /tmp private to one run
    env.setdefault("NCS_NATIVE_CACHE", str(settings.home_path / "native"))
    argv = [settings.trainer_python, "-m", "trainer.serve", "--socket", socket_path, "--checkpoint", checkpoint_dir,
            "--device", device or "auto", "--max-active", str(max_active)]
    # Not die_with_parent: that follows the spawning THREAD, and a request thread may end before the
    # server should; trainer.serve watches its parent process instead and exits when it is gone.
    return spawn(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr, die_with_parent=False)

"""Checkpoints: atomic, verifiable directories that never unpickle code.

Layout of ``<out>/checkpoints/step_0000200/``::

    model.safetensors   the weights (safetensors: plain tensors, no pickle)
    optim.pt            optimizer states; tensors and primitives only, so
                        ``torch.load(weights_only=True)`` reads it
    state.json          step, data-loader position, tokens seen, elapsed time, RNG states (base64)
    config.json         {"model": GPTConfig fields, "train": TrainConfig fields, ...}
    tokenizer/          a copy of the tokenizer directory
    manifest.json       written LAST: sha256 and size of every other file

A checkpoint is built in a hidden temp directory beside its final place, every file and the
directory are fsynced, and only then is it renamed into place, so a crash leaves either the whole
new checkpoint or nothing. A directory whose manifest is missing or does not match its files is
"torn" and :func:`latest_checkpoint` skips it. Pruning never deletes the newest valid checkpoint.

Errors: :class:`CheckpointError` (a missing, torn or corrupted checkpoint).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


class CheckpointError(Exception):
    """A checkpoint is missing, torn or corrupted."""


# --- helpers -------------------------------------------------------------------------------------

def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n")


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng() -> dict[str, Any]:
    """Every RNG state this process uses, as JSON-safe data (no pickle)."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        states = [_unb64(s) for s in state["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step_* directory under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


# --- verification --------------------------------------------------------------------------------

def verify(path: str | os.PathLike, deep: bool = True) -> dict[str, Any]:
    """Check ``path`` against its manifest and return the manifest; raise CheckpointError if not.

    ``deep`` re-hashes every file; without it only presence and sizes are checked.
    """
    path = Path(path)
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: no readable manifest ({e})") from None
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{path}: {rel} is missing")
        if f.stat().st_size != meta["size"]:
            raise CheckpointError(f"{path}: {rel} has the wrong size")
        if deep and _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{path}: {rel} does not match its checksum")
    for required in ("model.safetensors", "state.json", "config.json"):
        if required not in files:
            raise CheckpointError(f"{path}: the manifest does not list {required}")
    return manifest


def latest_checkpoint(out_dir: str | os.PathLike, deep: bool = True) -> Path | None:
    """The newest checkpoint under ``out_dir/checkpoints`` that verifies, or None."""
    for _, p in _checkpoint_dirs(Path(out_dir) / "checkpoints"):
        try:
            verify(p, deep=deep)
        except CheckpointError:
            continue
        return p
    return None


# --- saving --------------------------------------------------------------------------------------

def save_checkpoint(out_dir: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizers: list[torch.optim.Optimizer], train_state: dict[str, Any],
                    tokenizer_dir: str | os.PathLike | None, config: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write ``out_dir/checkpoints/step_{step:07d}`` atomically and prune older ones.

    ``train_state`` must be JSON-serialisable; the RNG states are added to it under "rng".
    Keeps the ``keep`` newest valid checkpoints (at least one).
    """
    from safetensors.torch import save_file

    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    # Leftovers of a save that was killed: nobody else writes here (only rank 0 saves).
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()

    weights = {k: v.detach().to("cpu", copy=True).contiguous()
               for k, v in unwrap(model).state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt", "step": str(step)})
    del weights
    torch.save({"optimizers": [opt.state_dict() for opt in optimizers]}, tmp / "optim.pt")
    state = dict(train_state, step=step, rng=capture_rng(), saved_at=time.time())
    _write_json(tmp / "state.json", state)
    _write_json(tmp / "config.json", config)
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")

    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync_file(f)
        files[f.relative_to(tmp).as_posix()] = {"sha256": _sha256(f), "size": f.stat().st_size}
    for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        _fsync_dir(d)
    _write_json(tmp / MANIFEST, {"format": FORMAT_VERSION, "step": step, "files": files})
    _fsync_file(tmp / MANIFEST)
    _fsync_dir(tmp)

    if final.exists():  # the same step saved again (e.g. after a resume): replace it
        trash = root / f".tmp-step_old-{final.name}-{os.getpid()}"
        final.rename(trash)
        tmp.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    prune(out_dir, keep=keep)
    return final


def prune(out_dir: str | os.PathLike, keep: int = 2) -> list[Path]:
    """Delete all but the ``keep`` newest valid checkpoints, and torn ones older than those."""
    keep = max(1, keep)
    kept: list[Path] = []
    removed = []
    for _, p in _checkpoint_dirs(Path(out_dir) / "checkpoints"):
        if len(kept) < keep:
            try:
                verify(p, deep=False)
                kept.append(p)
                continue
            except CheckpointError:
                if not kept:
                    continue  # a torn directory newer than every good one: leave it for inspection
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# --- loading -------------------------------------------------------------------------------------

def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module,
                    optimizers: list[torch.optim.Optimizer] | None, device: str | torch.device,
                    restore_rng_state: bool = True) -> dict[str, Any]:
    """Restore weights, optimizer states and RNG from ``path``; return its train_state dict."""
    from safetensors.torch import load_file

    path = Path(path)
    verify(path)
    device = torch.device(device)
    weights = load_file(str(path / "model.safetensors"), device=str(device))
    unwrap(model).load_state_dict(weights, strict=True)
    if optimizers is not None:
        saved = torch.load(path / "optim.pt", map_location=device, weights_only=True)["optimizers"]
        if len(saved) != len(optimizers):
            raise CheckpointError(f"{path}: holds {len(saved)} optimizer states, expected {len(optimizers)}")
        for opt, sd in zip(optimizers, saved):
            opt.load_state_dict(sd)
    state = json.loads((path / "state.json").read_text())
    if restore_rng_state and "rng" in state:
        restore_rng(state["rng"])
    return state


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text())


def load_model(ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, meta) for inference; never unpickles anything.

    ``meta`` holds step, the config dict and the checkpoint path. Raises CheckpointError.
    """
    from safetensors.torch import load_file

    from trainer.model import GPT, GPTConfig
    from trainer.tokenizer import Tokenizer

    ckpt_dir = Path(ckpt_dir)
    verify(ckpt_dir)
    config = read_config(ckpt_dir)
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    model_cfg = GPTConfig(**{k: v for k, v in config["model"].items() if k in fields})
    device = torch.device(device)
    model = GPT(model_cfg)
    model.load_state_dict(load_file(str(ckpt_dir / "model.safetensors"), device="cpu"), strict=True)
    model.to(device).eval()
    tokenizer = Tokenizer.load(ckpt_dir / "tokenizer")
    state = json.loads((ckpt_dir / "state.json").read_text())
    meta = {"step": state.get("step"), "config": config, "path": str(ckpt_dir),
            "train_state": {k: v for k, v in state.items() if k != "rng"}}
    return model, tokenizer, meta

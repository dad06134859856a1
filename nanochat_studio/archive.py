"""The download archive's format: a forward-only tar.gz writer and the generated MODEL_CARD.md.

Pure functions of their arguments (no storage, no fsspec): storage.stream_model_archive feeds them;
:func:`stream_dir` packs a local directory (the transformers export).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any, Iterator


def inline_member(name: str, content: bytes | str) -> tuple[str, None, int, str, bytes]:
    data = content.encode() if isinstance(content, str) else bytes(content)
    return (name, None, len(data), hashlib.sha256(data).hexdigest(), data)


class GzipTar:
    """A POSIX tar written forward only into a gzip stream; every method yields compressed pieces of at
    least ``chunk`` bytes (the last may be shorter). tarfile's own writer cannot yield mid-file."""

    def __init__(self, chunk: int = 64 << 10) -> None:
        self.chunk = chunk
        self._z = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip header and trailer
        self._buf: list[bytes] = []
        self._n = 0
        self._written = 0

    def _feed(self, raw: bytes) -> Iterator[bytes]:
        self._written += len(raw)
        out = self._z.compress(raw)
        if out:
            self._buf.append(out)
            self._n += len(out)
        if self._n >= self.chunk:
            yield b"".join(self._buf)
            self._buf, self._n = [], 0

    def header(self, name: str, size: int, mtime: int) -> Iterator[bytes]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, mtime, 0o644
        yield from self._feed(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def data(self, chunk: bytes) -> Iterator[bytes]:
        yield from self._feed(chunk)

    def end_member(self, size: int) -> Iterator[bytes]:
        yield from self._feed(b"\0" * (-size % tarfile.BLOCKSIZE))

    def close(self) -> Iterator[bytes]:
        yield from self._feed(b"\0" * (2 * tarfile.BLOCKSIZE))
        yield from self._feed(b"\0" * (-self._written % tarfile.RECORDSIZE))
        self._buf.append(self._z.flush())
        yield b"".join(self._buf)


def stream_dir(local_dir: str | os.PathLike, top: str, chunk: int = 64 << 10) -> Iterator[bytes]:
    """A ``.tar.gz`` of the files under ``local_dir`` as ``top/...``, generated piece by piece."""
    out = GzipTar(chunk)
    mtime = int(time.time())
    root = Path(local_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        yield from out.header(f"{top}/{path.relative_to(root).as_posix()}", size, mtime)
        with open(path, "rb") as f:
            while piece := f.read(chunk):
                yield from out.data(piece)
        yield from out.end_member(size)
    yield from out.close()


def archive_dirname(model: Any) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(model.name or "")).strip("-.")[:60]
    return slug or f"model-{model.id}"


def model_card(model: Any, weights_sha256: str, dirname: str) -> str:
    """MODEL_CARD.md: what the model is, what it learned from, how well, and how to run it."""
    cfg = model.config or {}
    metrics = model.metrics or {}
    lines = [f"# {model.name or dirname}", "",
             "A small GPT trained from scratch with nanochat-studio.", "",
             f"- Step: {model.step}", f"- Parameters: {model.params:,}",
             f"- Weights: `model.safetensors`, sha256 `{weights_sha256}`", "",
             "## Data", "", f"- Source: `{model.data_source or 'unknown'}`",
             f"- sha256: `{model.data_sha256 or 'unknown'}`", "", "## Configuration", "",
             "| setting | value |", "|---|---|"]
    lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in sorted(cfg.items())]
    lines += ["", "## Metrics", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(metrics.items())] or ["- none recorded"]
    lines += ["", "## Samples", ""]
    for s in model.samples or []:
        prompt, text = (s.get("prompt", ""), s.get("text", "")) if isinstance(s, dict) else ("", str(s))
        # Indented blocks, not fences: model text may itself contain ``` and must stay inert.
        lines += [f"Prompt: `{prompt!r}`", ""] + ["    " + ln for ln in str(text).splitlines() or [""]] + [""]
    if not model.samples:
        lines += ["(none recorded)", ""]
    lines += ["## How to load it", "",
              "With the nanochat-studio trainer (no web app needed):", "",
              f"    tar xzf {dirname}.tar.gz",
              f"    python -m trainer.sample --checkpoint {dirname} --prompt 'Once upon a time'", "",
              "The weights alone, in any PyTorch program:", "",
              "    from safetensors.torch import load_file",
              f"    state_dict = load_file('{dirname}/model.safetensors')", "",
              "`config.json` holds the model shape; `tokenizer/` the BPE the model was trained with. "
              "`SHA256SUMS` lists every file here (`sha256sum -c SHA256SUMS` inside the directory).", ""]
    return "\n".join(lines)

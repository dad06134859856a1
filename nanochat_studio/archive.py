"""The download archive's format: a forward-only tar.gz writer and the generated MODEL_CARD.md.

Pure functions of their arguments (no storage, no fsspec): storage.stream_model_archive reads the
stored files and feeds them (:func:`model_members` says which files a model's archive holds);
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
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

# One file of a model's archive: (archive name, storage key or None, size, sha256, inline bytes or None).
Member = tuple[str, str | None, int, str, bytes | None]


def inline_member(name: str, content: bytes | str) -> tuple[str, None, int, str, bytes]:
    data = content.encode() if isinstance(content, str) else bytes(content)
    return (name, None, len(data), hashlib.sha256(data).hexdigest(), data)


def model_members(model: Any, top: str, checkpoint: list[Member], tokenizer: list[Member], run_config: Any,
                  trainer_manifest: dict[str, Any], extra_files: Mapping[str, bytes | str]) -> list[Member]:
    """What a model's download holds, in order: ``checkpoint``'s model.safetensors, config.json (the
    run's config without the server's paths), the rest of ``checkpoint`` (state.json), the ``tokenizer``
    files, the trainer's manifest with its file list cut to what ships (optim.pt stays home),
    MODEL_CARD.md, ``extra_files`` (name -> content) and SHA256SUMS of all of them."""
    members = [checkpoint[0], inline_member("config.json", json.dumps(public_config(run_config), indent=2)),
               *checkpoint[1:], *tokenizer]
    manifest = dict(trainer_manifest)
    manifest["files"] = {name: {"sha256": sha, "size": size} for name, _, size, sha, _ in members}
    members.append(inline_member("manifest.json", json.dumps(manifest, indent=1)))
    members.append(inline_member("MODEL_CARD.md", model_card(model, checkpoint[0][3], top)))
    for name, content in extra_files.items():
        members.append(inline_member(name, content))
    sums = "".join(f"{sha}  {name}\n" for name, _, _, sha, _ in members)
    members.append(inline_member("SHA256SUMS", sums))
    return members


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


# Keys of a run's config that name places on the server (or hold secrets): never shipped or shown.
SERVER_ONLY_KEYS = frozenset({"out", "cache_dir", "storage_options", "run_dir", "log_path", "output_path",
                              "credentials", "sealed_credentials"})
# What can make inline Markdown more than text: links and images ([ ] ( ) !), raw HTML and autolinks
# (< > &), code (`), tables (|), headings (#), emphasis (* ~, and _ at a word's edge: inside a word like
# final_loss it is only a character), and the backslash itself.
_MD_SPECIAL = re.compile(r"([\\`*\[\]()!<>&|#~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")


def public_config(value: Any) -> Any:
    """A run or job config as it may leave the server: no keys naming server places or secrets, a
    dataset spec as its public source, and every absolute path cut to its last part."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in SERVER_ONLY_KEYS:
                continue
            if k == "dataset" and isinstance(v, dict):
                v = v.get("source", "")
            out[k] = public_config(v)
        return out
    if isinstance(value, list):
        return [public_config(v) for v in value]
    if isinstance(value, str):
        return public_source(value)
    return value


def public_source(text: str) -> str:
    """An absolute server path (or file: URL) as its last part; anything else as it is."""
    if text.startswith(("/", "file:")):
        return PurePosixPath(text.split(":", 1)[1] if text.startswith("file:") else text).name or "data"
    return text


def md_text(text: Any) -> str:
    """Inline Markdown that shows ``text`` literally: one line, every character that means Markdown escaped (so a
    model named ``[x](https://...)`` or ``<img onerror>`` renders as those characters)."""
    flat = " ".join(str(text).split())
    return _MD_SPECIAL.sub(r"\\\1", flat)


def md_code(text: Any) -> str:
    """An inline code span holding ``text`` literally, even if it contains backticks (CommonMark: the
    fence is longer than any run of backticks inside), safe in a table cell (pipes escaped)."""
    flat = " ".join(str(text).split()).replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", flat)), default=0)
    fence = "`" * (longest + 1)
    return f"{fence} {flat} {fence}" if longest else f"`{flat}`"


def model_card(model: Any, weights_sha256: str, dirname: str) -> str:
    """MODEL_CARD.md: what the model is, what it learned from, how well, and how to run it. Every value
    that came from a person or the trainer is escaped Markdown; no server path appears."""
    cfg = public_config(model.config or {})
    metrics = model.metrics or {}
    lines = [f"# {md_text(model.name or dirname)}", "",
             "A small GPT trained from scratch with nanochat-studio.", "",
             f"- Step: {int(model.step or 0)}", f"- Parameters: {int(model.params or 0):,}",
             f"- Weights: `model.safetensors`, sha256 `{weights_sha256}`", "",
             "## Data", "", f"- Source: {md_code(public_source(model.data_source or 'unknown'))}",
             f"- sha256: {md_code(model.data_sha256 or 'unknown')}", "", "## Configuration", "",
             "| setting | value |", "|---|---|"]
    lines += [f"| {md_text(k)} | {md_code(json.dumps(v))} |" for k, v in sorted(cfg.items())]
    lines += ["", "## Metrics", ""]
    lines += [f"- {md_text(k)}: {md_text(v)}" for k, v in sorted(metrics.items())] or ["- none recorded"]
    lines += ["", "## Samples", ""]
    for s in model.samples or []:
        prompt, text = (s.get("prompt", ""), s.get("text", "")) if isinstance(s, dict) else ("", str(s))
        # Indented blocks, not fences: model text may itself contain ``` and must stay inert.
        lines += [f"Prompt: {md_code(repr(prompt))}", ""] + ["    " + ln for ln in str(text).splitlines() or [""]] + [""]
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

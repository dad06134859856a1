"""Tiny real checkpoints for the chat tests, built with the trainer's own code.

``tiny_checkpoint(dir)`` trains a depth-1 GPT for a few dozen steps on demo stories (a second or two on
one CPU thread) and saves it with ``trainer.checkpoint.save_checkpoint``, so the model server loads it
exactly as it loads a real run. Built once per test session and copied (``cached_tiny_checkpoint``).

``scripted_checkpoint(dir, text, delay_s)`` makes a directory the model server replays instead of
running a network (see trainer/serve.py): for crash, queue and hostile-output tests.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

_CACHE: dict[str, Path] = {}


def tiny_checkpoint(out_dir: str | os.PathLike, steps: int = 40, seed: int = 0) -> Path:
    """Train and save; returns the step directory (``out_dir/checkpoints/step_*``)."""
    import torch

    from trainer import demo
    from trainer.checkpoint import save_checkpoint
    from trainer.model import GPT, GPTConfig
    from trainer.tokenizer import Tokenizer

    torch.manual_seed(seed)
    stories = list(demo.generate_stories(seed=seed, n=200))
    out = Path(out_dir)
    tok_dir = out / "tokenizer"
    tok = Tokenizer.train_from_iterator(stories, vocab_size=300)
    tok.save(tok_dir)
    cfg = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    model = GPT(cfg)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.tensor([t for s in stories for t in [tok.bos_id, *tok.encode(s)]], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - cfg.sequence_len - 1, (8,), generator=g)
        x = torch.stack([ids[i : i + cfg.sequence_len] for i in starts])
        y = torch.stack([ids[i + 1 : i + cfg.sequence_len + 1] for i in starts])
        loss = model(x, targets=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    config = {"model": cfg.to_dict(), "train": {"max_steps": steps, "note": "tests/chat_fixtures.py"}}
    return save_checkpoint(out, steps, model, [opt], {"tokens_seen": steps * 8 * cfg.sequence_len},
                           tok_dir, config)


def cached_tiny_checkpoint(dest: str | os.PathLike) -> Path:
    """A copy of a tiny checkpoint built once per process, at ``dest`` (a new directory). The cache is
    checked against its manifest before each copy: one CI run found its weights changed (size right,
    checksum wrong) and the model server refused the copy; this says so at the source, with the tests
    that copied it before."""
    from trainer.checkpoint import CheckpointError, verify

    if "tiny" not in _CACHE:
        _CACHE["tiny"] = tiny_checkpoint(tempfile.mkdtemp(prefix="ncs-tiny-"))
    try:
        verify(_CACHE["tiny"])
    except CheckpointError as e:
        raise AssertionError(f"the cached tiny checkpoint changed after these tests copied it: {_COPIED_BY}: {e}") from None
    _COPIED_BY.append(os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0])
    shutil.copytree(_CACHE["tiny"], dest)
    return Path(dest)


_COPIED_BY: list[str] = []


def scripted_checkpoint(dest: str | os.PathLike, text: str, delay_s: float = 0.0, tokens_per_delta: int = 1,
                        load_delay_s: float = 0.0) -> Path:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "fake_model.json").write_text(
        json.dumps({"text": text, "delay_s": delay_s, "tokens_per_delta": tokens_per_delta,
                    "load_delay_s": load_delay_s}), encoding="utf-8")
    return dest


# --- a live app on loopback ------------------------------------------------------------------------------


class LiveServer:
    """The app served by waitress on 127.0.0.1 and a free port, in a thread (what `serve` runs)."""

    def __init__(self, app, threads: int = 8):
        import threading

        from nanochat_studio.webserver import create_server

        self.app = app
        self.server = create_server(app, host="127.0.0.1", port=0, threads=threads)
        self.port = self.server.effective_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._run, name="waitress", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.run()
        except (OSError, ValueError):  # close() from the test thread pulls the sockets from under select()
            pass

    def close(self) -> None:
        self.server.close()


def make_chat_app(home: str | os.PathLike, mode: str = "hosted", **pool_kw):
    """An app over a fresh SQLite file in ``home``, CSRF off (tests send JSON), with a model pool whose
    servers are cleaned up by ``app.extensions['model_pool'].close()``."""
    from nanochat_studio.app import create_app
    from nanochat_studio.inference import ModelPool
    from nanochat_studio.settings import load_settings

    settings = load_settings(environ={"NCS_HOME": str(home)}, mode=mode)
    app = create_app(settings)
    app.config.update(TESTING=True, WTF_CSRF_ENABLED=False)
    pool_kw.setdefault("device", "cpu")
    app.extensions["model_pool"] = ModelPool(settings, **pool_kw)
    return app


def add_user(email: str):
    from nanochat_studio import accounts

    return accounts.create_user(email, "correct horse battery", name=email.split("@")[0])


def add_model(user, checkpoint_dir, name: str = "tiny", **fields):
    from nanochat_studio.models import Model

    return Model.create(user=user, name=name, checkpoint_key=str(checkpoint_dir),
                        tokenizer_key=str(Path(checkpoint_dir) / "tokenizer"), **fields)


def login_session(base_url: str, email: str):
    """A requests.Session signed in as ``email`` on the live server."""
    import requests

    s = requests.Session()
    r = s.post(f"{base_url}/account/login", data={"email": email, "password": "correct horse battery"},
               allow_redirects=False)
    assert r.status_code in (302, 303), (r.status_code, r.text[:300])
    return s


def sse_events(lines) -> list[tuple[str, dict | str]]:
    """(event, data) pairs from an iterator of SSE text lines; comments and retry lines skipped."""
    out, event, data = [], "message", []
    for line in lines:
        if line == "":
            if data:
                raw = "\n".join(data)
                try:
                    out.append((event, json.loads(raw)))
                except ValueError:
                    out.append((event, raw))
            event, data = "message", []
        elif line.startswith(":") or line.startswith("retry:") or line.startswith("id:"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
    return out

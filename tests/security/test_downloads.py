"""Downloads leak no server paths (issue 10, point 11): the archive's config.json and MODEL_CARD.md, and
the model's JSON, carry no absolute path of the server (the trainer wrote ``out``, ``cache_dir`` and
``data`` as they were on this machine), and the card's Markdown shows a hostile model name as text.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path

import pytest
import requests

from harness import Studio, open_store, persona
from nanochat_studio import auth
from nanochat_studio.checkpoints import publish_checkpoint
from nanochat_studio.models import Model
from nanochat_studio.settings import load_settings
from nanochat_studio.storage import Storage

NAME = "[click me](https://evil.example/steal) <img src=x onerror=alert(1)> # `x`"


def trainer_checkpoint(root: Path, home: Path) -> tuple[Path, dict]:
    """A checkpoint as the trainer leaves it, its config.json full of this machine's paths."""
    run = home / "runs" / "7"
    train = {"depth": 2, "data": str(home / "storage/users/1/datasets/3/corpus.txt"), "out": str(run),
             "cache_dir": str(run / "cache"), "storage_options": {"key": "<redacted>"}, "name": NAME,
             "sample_prompts": ["Once upon a time,"]}
    config = {"model": {"n_layer": 2, "n_embd": 64, "vocab_size": 512}, "train": train,
              "data": {"source": train["data"], "sha256": "ab" * 32, "n_train_tokens": 1000}}
    d = root / "step_0000010"
    (d / "tokenizer").mkdir(parents=True)
    files = {"model.safetensors": os.urandom(10_000), "state.json": b'{"step": 10}',
             "config.json": json.dumps(config).encode(), "tokenizer/tokenizer.pkl": b"ranks",
             "tokenizer/meta.json": b'{"vocab_size": 512}'}
    for rel, data in files.items():
        (d / rel).write_bytes(data)
    manifest = {"step": 10, "files": {rel: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                                      for rel, data in files.items()}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d, train


@pytest.fixture(scope="module")
def lab(tmp_path_factory, store_url):
    studio = Studio(tmp_path_factory.mktemp("downloads") / "home", store_url, mode="lab")
    yield studio
    studio.stop()
    studio.assert_no_tracebacks()


def test_the_archive_and_the_model_json_carry_no_server_path(lab, store_url, tmp_path):
    open_store(store_url)
    alice = persona("alice")
    _, key = auth.create_api_key(alice)
    bearer = {"Authorization": f"Bearer {key}"}
    home = lab.home.resolve()
    ckpt, train = trainer_checkpoint(tmp_path / "run", home)
    model = Model.create(user=alice, name=NAME, step=10, checkpoint_key="", tokenizer_key="", config=train,
                         data_source="/srv/private/corpus.txt", samples=[{"prompt": "a`b", "text": "c"}])
    storage = Storage.from_settings(load_settings(environ={"NCS_HOME": str(home), "NCS_DATABASE_URL": store_url}))
    stored = publish_checkpoint(storage, alice.id, model.id, ckpt)
    Model.update(checkpoint_key=stored, tokenizer_key=f"{stored}/tokenizer").where(Model.id == model.id).execute()

    r = requests.get(f"{lab.url}/api/models/{model.id}/download", headers=bearer, timeout=60)
    assert r.status_code == 200
    leaks = (str(home), str(tmp_path), "/srv/private", "/runs/7")
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        members = {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode("utf-8", "replace")
                   for m in tar.getmembers() if m.isfile() and not m.name.endswith(".safetensors")}
    for name, text in members.items():
        for leak in leaks:
            assert leak not in text, (name, leak)
    config = json.loads(members["config.json"])
    assert config["model"] == {"n_layer": 2, "n_embd": 64, "vocab_size": 512}  # what loading needs stays
    assert config["train"]["data"] == "corpus.txt" and "out" not in config["train"]
    assert "cache_dir" not in config["train"] and "storage_options" not in config["train"]
    # SHA256SUMS describes the config.json that ships.
    sums = dict(line.split("  ")[::-1] for line in members["SHA256SUMS"].splitlines())
    assert sums["config.json"] == hashlib.sha256(members["config.json"].encode()).hexdigest()

    card = members["MODEL_CARD.md"]
    title = card.splitlines()[0]
    # Every character that would make a link, an image or HTML is escaped: it renders as text.
    assert title.startswith("# ") and not re.search(r"(?<!\\)\]\(|(?<!\\)<|(?<!\\)`", title), title
    assert "\\[click me\\]\\(https://evil.example/steal\\)" in title and "\\<img" in title
    assert "corpus.txt" in card

    shown = requests.get(f"{lab.url}/api/models/{model.id}", headers=bearer, timeout=30).json()
    for leak in leaks:
        assert leak not in json.dumps(shown), leak
    assert shown["data_source"] == "corpus.txt"

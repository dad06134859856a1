"""``GET /api/models/ID/download?format=hf`` through a live server: the archive untars into a directory
that the real transformers loads (no remote code) and that gives our model's logits and token ids."""

from __future__ import annotations

import io
import os
import sys
import tarfile
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).parent))
from chat_fixtures import (  # noqa: E402
    LiveServer, add_model, add_user, cached_tiny_checkpoint, login_session, make_chat_app,
)

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

PROMPTS = ["Once upon a time, a little fox", "The cat ran to the big tree.", "naïve café 🙂 — Zürich"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from nanochat_studio import auth

    tmp = tmp_path_factory.mktemp("hfdl")
    app = make_chat_app(tmp / "home", mode="hosted")
    server = LiveServer(app)
    alice, bob = add_user("alice@example.com"), add_user("bob@example.com")
    _, alice_key = auth.create_api_key(alice, "test")
    _, bob_key = auth.create_api_key(bob, "test")
    ckpt = cached_tiny_checkpoint(tmp / "tiny")
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"not weights")
    yield {"url": server.url, "alice": alice_key, "bob": bob_key, "ckpt": ckpt, "home": tmp / "home",
           "model": add_model(alice, ckpt, name="fox tales"), "broken": add_model(alice, broken, name="broken"),
           "gone": add_model(alice, tmp / "nowhere", name="gone")}
    server.close()
    app.extensions["model_pool"].close()


def get(world, path: str, key: str = "alice", **kw) -> requests.Response:
    return requests.get(f"{world['url']}{path}", headers={"Authorization": f"Bearer {world[key]}"}, timeout=300,
                        **kw)


@pytest.mark.process  # runs trainer.export_hf as a child process
def test_the_hf_download_loads_in_transformers_with_our_logits(world, tmp_path):
    from trainer.checkpoint import load_model

    r = get(world, f"/api/models/{world['model'].id}/download?format=hf")
    assert r.status_code == 200, r.text[:500]
    assert r.headers["Content-Type"] == "application/gzip"
    assert r.headers["Content-Disposition"].endswith('-hf.tar.gz"')
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        names = tar.getnames()
        tar.extractall(tmp_path, filter="data")
    tops = {n.split("/")[0] for n in names}
    assert len(tops) == 1
    hf_dir = tmp_path / tops.pop()
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= {
        p.name for p in hf_dir.iterdir()}

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=False).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    ours, tok, _ = load_model(world["ckpt"])
    for text in PROMPTS:
        ids = [tok.bos_id, *tok.encode(text)]
        assert hf_tok(text).input_ids == ids
        x = torch.tensor([ids])
        with torch.no_grad():
            want = ours(x)[0].float()
            got = hf(x).logits[0].float()
        assert (want - got).abs().max().item() < 1e-4
        with torch.no_grad():
            gen = hf.generate(x, max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
        step_ids = list(ids)
        for _ in range(len(gen)):
            with torch.no_grad():
                step_ids.append(int(ours(torch.tensor([step_ids]))[0, -1].argmax()))
        assert gen == step_ids[len(ids):][:len(gen)]
    assert not any((world["home"] / "tmp").iterdir())  # the export's working directory went with the stream


def test_formats_owners_and_missing_checkpoints(world):
    mid = world["model"].id
    r = get(world, f"/api/models/{mid}/download?format=gguf")
    assert r.status_code == 400 and "format" in r.json()["error"]["message"]
    r = get(world, f"/api/models/{mid}/download?format=hf", key="bob")
    assert r.status_code == 404
    r = get(world, f"/api/models/{world['gone'].id}/download?format=hf")
    assert r.status_code == 404 and "not available" in r.json()["error"]["message"]
    r = get(world, f"/api/models/{mid}")
    assert r.json()["urls"]["download_hf"] == f"/api/models/{mid}/download?format=hf"


@pytest.mark.process
def test_a_checkpoint_that_cannot_convert_is_a_clear_error(world):
    r = get(world, f"/api/models/{world['broken'].id}/download?format=hf")
    assert r.status_code == 500
    assert "could not be converted for transformers" in r.json()["error"]["message"]
    assert not any((world["home"] / "tmp").iterdir())


def test_the_model_page_has_the_button(world):
    s = login_session(world["url"], "alice@example.com")
    page = s.get(f"{world['url']}/models/{world['model'].id}").text
    assert "Download for transformers" in page
    assert f'href="/api/models/{world["model"].id}/download?format=hf"' in page

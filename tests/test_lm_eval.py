"""EleutherAI's lm-evaluation-harness (``lm-eval``), a client no one here wrote, against a live server
through its ``local-completions`` model: two local tasks (tests/lm_eval_tasks: a multiple-choice task
scored by log-likelihood, a generate-until task), fully offline, with the tokenizer of the model's own
transformers export. The scores it prints must equal what we compute from the model's logits here."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from chat_fixtures import LiveServer, add_model, add_user, make_chat_app, tiny_checkpoint  # noqa: E402

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.process  # starts a real model server
TASKS = Path(__file__).parent / "lm_eval_tasks"
STEPS = 400


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def logprobs_of(model, ids: list[int]):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)  # row i scores token i + 1


def choice_loglikelihood(model, tok, context: str, choice: str) -> float:
    """What a harness asks for: the continuation's log-probability after the context, the context and
    the continuation tokenized as one text and split where the context's own tokens end (lm-eval's
    rule; its default target delimiter is one space). Our server puts <|bos|> in front."""
    whole = tok.encode(context + " " + choice)
    n_ctx = len(tok.encode(context))
    ids = [tok.bos_id, *whole]
    lp = logprobs_of(model, ids)
    return sum(lp[i, ids[i + 1]].item() for i in range(n_ctx, len(whole)))


def greedy_until(model, tok, prompt: str, stop: str, max_tokens: int) -> str:
    ids = [tok.bos_id, *tok.encode(prompt)]
    out: list[int] = []
    for _ in range(max_tokens):
        nxt = int(logprobs_of(model, ids + out)[-1].argmax())
        if nxt == tok.bos_id:
            break
        out.append(nxt)
        if stop in tok.decode(out):
            break
    return tok.decode(out).split(stop)[0]


def test_lm_eval_scores_equal_the_models_own(tmp_path):
    from nanochat_studio import auth
    from trainer.checkpoint import load_model
    from trainer.export_hf import export

    app = make_chat_app(tmp_path / "home", mode="hosted")
    server = LiveServer(app)
    try:
        alice = add_user("alice@example.com")
        _, key = auth.create_api_key(alice, "lm-eval")
        # trained longer than the chat tests' model, so the scores are not all zero (a few seconds)
        ckpt = tiny_checkpoint(tmp_path / "tiny", steps=STEPS)
        model_row = add_model(alice, ckpt)
        hf_dir = export(ckpt, tmp_path / "hf")  # lm-eval counts tokens with this tokenizer: ours, in HF form
        model, tok, _ = load_model(ckpt)
        out_dir = tmp_path / "lm-eval-out"
        env = dict(os.environ, OPENAI_API_KEY=key, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), TOKENIZERS_PARALLELISM="false")
        model_args = ",".join([
            f"model={model_row.id}", f"base_url={server.url}/v1/completions", f"tokenizer={hf_dir}",
            "tokenizer_backend=huggingface", "tokenized_requests=True", "max_length=64", "max_retries=1",
            "timeout=120",
        ])
        proc = subprocess.run(
            [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
             "--tasks", "ncs_story_choice,ncs_story_continue", "--include_path", str(TASKS),
             "--batch_size", "4", "--output_path", str(out_dir), "--log_samples"],
            cwd=TASKS, env=env, capture_output=True, text=True, timeout=900)
        failures = [ln for ln in proc.stderr.splitlines() if "error message" in ln]
        assert proc.returncode == 0, (failures[:3], proc.stderr[-3000:])
    finally:
        server.close()
        app.extensions["model_pool"].close()

    # What we compute ourselves, from the model's logits.
    docs = read_jsonl(TASKS / "story_choice.jsonl")
    lls = [[choice_loglikelihood(model, tok, d["context"], c) for c in d["choices"]] for d in docs]
    acc = sum(max(range(len(ll)), key=ll.__getitem__) == d["label"] for ll, d in zip(lls, docs)) / len(docs)
    acc_norm = sum(max(range(len(ll)), key=lambda i: ll[i] / len(d["choices"][i])) == d["label"]
                   for ll, d in zip(lls, docs)) / len(docs)
    gens = read_jsonl(TASKS / "story_continue.jsonl")
    outputs = [greedy_until(model, tok, g["prompt"], ".", 8) for g in gens]
    exact = sum(o == g["target"] for o, g in zip(outputs, gens)) / len(gens)

    print(f"expected: acc {acc} acc_norm {acc_norm} exact_match {exact}; outputs {outputs}")
    # What lm-eval printed and wrote.
    results = json.loads(Path(sorted(glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True))[-1])
                         .read_text())["results"]
    assert results["ncs_story_choice"]["acc,none"] == pytest.approx(acc, abs=1e-9)
    assert results["ncs_story_choice"]["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-9)
    assert results["ncs_story_continue"]["exact_match,none"] == pytest.approx(exact, abs=1e-9)
    table = proc.stdout
    for task, metric, value in [("ncs_story_choice", "acc", acc), ("ncs_story_continue", "exact_match", exact)]:
        row = next(line for line in table.splitlines() if task in line)
        # the value's cell, after the metric's and the arrow's: lm-eval drops trailing zeros ("0.25")
        cell = re.search(rf"\|\s*{metric}\s*\|[^|]*\|\s*([0-9.]+)\s*\|", row)
        assert cell and float(cell.group(1)) == pytest.approx(value, abs=5e-5), row

    # Sample by sample: every choice's log-likelihood and every generated text.
    samples = sorted(glob.glob(str(out_dir / "**" / "samples_ncs_story_choice_*.jsonl"), recursive=True))
    got = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in read_jsonl(Path(samples[-1]))}
    for i, ll in enumerate(lls):
        assert got[i] == pytest.approx(ll, abs=1e-4)
    samples = sorted(glob.glob(str(out_dir / "**" / "samples_ncs_story_continue_*.jsonl"), recursive=True))
    got_text = {s["doc_id"]: s["filtered_resps"][0] for s in read_jsonl(Path(samples[-1]))}
    assert [got_text[i] for i in range(len(gens))] == outputs
    # the scores are not trivially the same whatever the model said
    assert len({round(x, 3) for ll in lls for x in ll}) > len(docs)

"""trainer/export_hf.py with the real transformers: the exported directory loads with AutoModelForCausalLM and
AutoTokenizer (no remote code), gives our logits within 1e-4 and our greedy text, and our token ids."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from chat_fixtures import cached_tiny_checkpoint  # noqa: E402

transformers = pytest.importorskip("transformers")

from trainer import chat_template, demo  # noqa: E402
from trainer.checkpoint import load_model, save_checkpoint  # noqa: E402
from trainer.export_hf import ROPE_THETA, export  # noqa: E402
from trainer.model import ROTARY_BASE, GPT, GPTConfig  # noqa: E402
from trainer.sample import generate_tokens  # noqa: E402
from trainer.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.trainer

TEXTS = [
    "Once upon a time, a little fox",
    "naïve café — 世界 🙂 ok; Zürich, Ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト",
    "I'm sure they'll say we've done it, don't you? It's 3.14159 or 1234567 or 42.",
    "  leading spaces\n\n\ttabs\r\nand  double  spaces   \n",
    "code: def f(x):\n    return x ** 2  # square\n",
    "emoji run 🙂🙂🙂 and a lone combining mark é",
    "",
]


@pytest.fixture(scope="module")
def rich_checkpoint(tmp_path_factory):
    """A GQA model (n_kv_head < n_head) with non-trivial weights and a tokenizer with many merges,
    multi-byte ones included, so every part of the mapping is exercised."""
    out = tmp_path_factory.mktemp("rich")
    corpus = list(demo.generate_stories(seed=1, n=200)) + [t * 20 for t in TEXTS if t]
    tok = Tokenizer.train_from_iterator(corpus, vocab_size=900)
    tok.save(out / "tokenizer")
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p is not model.wte.weight else 1.0)
    return save_checkpoint(out, 1, model, [torch.optim.SGD(model.parameters(), lr=0.0)], {}, out / "tokenizer",
                           {"model": cfg.to_dict(), "train": {"note": "test_export_hf"}})


@pytest.fixture(scope="module", params=["tiny", "rich"])
def exported(request, tmp_path_factory, rich_checkpoint):
    base = tmp_path_factory.mktemp("hf")
    ck = cached_tiny_checkpoint(base / "ck") if request.param == "tiny" else rich_checkpoint
    out = export(ck, base / "hf")
    ours, tok, _ = load_model(ck)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    return ours, tok, hf, hf_tok, out


def test_the_directory_has_the_expected_files_and_native_architecture(exported):
    ours, _, hf, _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
            "generation_config.json"} <= names
    assert type(hf).__name__ == "NanoChatForCausalLM"  # transformers' own class: no remote code
    assert type(hf).__module__.startswith("transformers.models.nanochat")
    assert ROPE_THETA == ROTARY_BASE
    assert sum(p.numel() for p in hf.parameters()) == ours.num_params()


def test_logits_equal_ours(exported):
    ours, tok, hf, _, _ = exported
    for text in TEXTS:
        ids = [tok.bos_id, *tok.encode(text)][:64]
        with torch.no_grad():
            a = hf(torch.tensor([ids])).logits[0].float()
            b = ours(torch.tensor([ids]))[0]
        assert (a - b).abs().max().item() < 1e-4, text
    # a batch with padding on the left, as generate() builds for prompts of different lengths
    short, long = [tok.bos_id, *tok.encode("Once")], [tok.bos_id, *tok.encode("Once upon a time, a little")]
    pad = len(long) - len(short)
    batch = torch.tensor([[tok.bos_id] * pad + short, long])
    mask = torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)])
    with torch.no_grad():
        a = hf(batch, attention_mask=mask).logits[0, -1]
        b = ours(torch.tensor([short]))[0, -1]
    assert (a - b).abs().max().item() < 1e-4


def test_greedy_generation_is_identical(exported):
    ours, tok, hf, hf_tok, _ = exported
    for text in TEXTS[:3]:
        ids = [tok.bos_id, *tok.encode(text)][:24]
        mine = list(generate_tokens(ours, ids, max_tokens=24, temperature=0, stop_ids={tok.bos_id}))
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                 eos_token_id=[tok.bos_id], pad_token_id=tok.bos_id)[0, len(ids):].tolist()
        assert theirs == mine


def test_tokenizer_ids_are_ours(exported):
    _, tok, _, hf_tok, _ = exported
    for text in TEXTS:
        assert hf_tok(text).input_ids == [tok.bos_id, *tok.encode(text)], text
        assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == text
    for name in ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                 "<|system_start|>", "<|system_end|>"):
        assert hf_tok.convert_tokens_to_ids(name) == tok.special_id(name)
    # special-token strings in text become the special tokens (that is how the chat template is read)
    text = "<|user_start|>hi 🙂<|user_end|>"
    assert hf_tok(text, add_special_tokens=False).input_ids == [
        tok.special_id("<|user_start|>"), *tok.encode("hi 🙂"), tok.special_id("<|user_end|>")]
    assert hf_tok.bos_token_id == tok.bos_id


def test_the_chat_template_is_ours(exported):
    _, tok, _, hf_tok, out = exported
    chats = [
        [{"role": "user", "content": "Hi! 世界"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who?"},
         {"role": "assistant", "content": "The fox."}, {"role": "user", "content": "Where?"}],
    ]
    for messages in chats:
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(ids) == tok.render_for_completion(messages)
        text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text == chat_template.render(messages, add_generation_prompt=True)
        assert hf_tok.apply_chat_template(messages, tokenize=False) == chat_template.render(messages)
    with pytest.raises(Exception, match="system message can only be the first"):
        hf_tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
                                   tokenize=False)
    with pytest.raises(ValueError, match="system message"):
        chat_template.render([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    assert "nanochat" in (out / "README.md").read_text()


def test_the_cli_exports_and_refuses_to_overwrite(tmp_path):
    ck = cached_tiny_checkpoint(tmp_path / "ck")
    run = [sys.executable, "-m", "trainer.export_hf", str(ck), str(tmp_path / "hf")]
    done = subprocess.run(run, capture_output=True, text=True)
    assert done.returncode == 0 and (tmp_path / "hf" / "model.safetensors").is_file()
    again = subprocess.run(run, capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr
    (tmp_path / "broken").mkdir()
    bad = subprocess.run([sys.executable, "-m", "trainer.export_hf", str(tmp_path / "broken"), str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "manifest" in bad.stderr and not (tmp_path / "o").exists()

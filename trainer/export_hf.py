"""Export a checkpoint as a Hugging Face model directory: loads with transformers, no remote code.

    python -m trainer.export_hf runs/r1/checkpoints/step_0000200 out/my-model

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("out/my-model")
    tok = AutoTokenizer.from_pretrained("out/my-model")

Writes config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
special_tokens_map.json and README.md (a model card). Needs neither transformers nor tokenizers: the
files are written from their documented formats, and tests load them with the real libraries.

The model maps exactly onto transformers' native ``nanochat`` architecture (NanoChatForCausalLM: rotary,
QK-norm, ReLU^2 MLP, untied head, final logit soft-cap, parameter-free RMSNorm after the embedding, in
every block and before the head). What differs, and the bridge:
- Our fused ``c_qkv`` is split into ``q_proj``, ``k_proj``, ``v_proj``; ``c_fc``/``c_proj`` of the MLP
  become ``fc1``/``fc2``; ``wte`` is ``model.embed_tokens``.
- Rotation direction: we rotate channel pairs (i, i + d/2) by +angle; transformers' nanochat rotates
  them by -angle (nanochat's own convention). Negating the second half of every query and key head
  (the rows of q_proj and k_proj that produce channels d/2..d-1) makes its rotation of the negated
  vector equal ours with that half negated; queries and keys carry the same sign flips, so their dot
  products, and RMSNorm, are unchanged: the attention is exactly ours. Values are untouched.
- Order of QK-norm and rotary: we normalise then rotate, transformers rotates then normalises; a
  rotation keeps a vector's RMS, so both give the same result.
- RMSNorm epsilon: ours is float32's machine epsilon (what F.rms_norm uses), written as
  ``rms_norm_eps``; rotary base 10000 as ``rope_theta``; the soft-cap as ``final_logit_softcapping``.
- The tokenizer: our byte-level BPE (tiktoken ranks) as a tokenizers ``BPE`` model with the merges
  recovered from the ranks, ``ignore_merges`` (tiktoken takes a piece that is a whole token as it is),
  the same split pattern, and byte-level mapping; the special tokens at our ids; <|bos|> put in front
  of every encoded text, as our completion prompts have it. One difference stays: in text given to the
  HF tokenizer, special-token strings ("<|user_start|>") become the special tokens (that is how the chat
  template is tokenized); our own ``encode`` keeps them as plain text.

GGUF (llama.cpp, Ollama): mainline llama.cpp has no ``nanochat`` architecture, in its converter
(``convert_hf_to_gguf.py``) or its C++ model list, as far as the material we could search shows; forks
add one (an ``LLM_ARCH_NANOCHAT`` graph of ~170 lines plus registrations, with GGUFs published from the
fork), and their notes say the fork's master is otherwise identical to upstream. So a GGUF written here
would load nowhere mainline, and this module writes none. What it would take, upstream or in a fork:
- C++: an architecture entry and tensor names, and a graph builder stringing together pieces llama.cpp
  already has: ``ggml_rms_norm`` without a weight (after the embedding, before attention and MLP, on
  queries and keys per head, before the head), NEOX rotary (pairs i, i + d/2; that is our own
  convention, so converting from our checkpoint needs no sign trick, unlike from the HF export above),
  a sequential (not gated) MLP with the squared-ReLU activation, and the final logit soft-cap (as for
  Gemma-2); QK-norm may come before or after rotary (a rotation keeps the RMS).
- Python: a converter class mapping these tensors to GGUF names and writing head counts, rotary base,
  epsilon and soft-cap; the tokenizer as a ``gpt2``-style BPE with our split pattern, registered as a
  new pre-tokenizer (llama.cpp recognises pre-tokenizers by the hash of their output on a test text).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from trainer.chat_template import JINJA, REPLY_END

ROPE_THETA = 10000.0  # trainer.model.ROTARY_BASE, repeated here so the docstring's claims are checked by tests
FLOAT32_EPS = 1.1920928955078125e-07  # torch.finfo(torch.float32).eps


def byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet (GPT-2's): every byte as a printable character, so tokens are strings."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def recover_merges(ranks: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The merge that made each token of rank >= 256, in rank order: BPE over the token's bytes with only
    the merges of lower rank ends in exactly two pieces, the pair that was merged last."""
    rank_of = {tok: r for r, tok in enumerate(ranks)}
    merges = []
    for r, tok in enumerate(ranks):
        if len(tok) < 2:
            continue
        parts = [bytes([b]) for b in tok]
        while len(parts) > 2:
            best, at = None, -1
            for i in range(len(parts) - 1):
                pr = rank_of.get(parts[i] + parts[i + 1])
                if pr is not None and pr < r and (best is None or pr < best):
                    best, at = pr, i
            if best is None:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {r} ({tok!r}) is not a merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def tokenizer_json(tok) -> dict[str, Any]:
    """The tokenizers-library description of our tokenizer (``tokenizer.json``)."""
    b2u = byte_to_unicode()

    def s(raw: bytes) -> str:
        return "".join(b2u[b] for b in raw)

    ranks = tok._ranks  # the trained token bytes in rank (= id) order
    specials = {name: tok.special_id(name) for name in sorted(tok._specials, key=tok._specials.get)}
    bos = "<|bos|>"
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for name, i in specials.items()
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
            "vocab": {s(t): i for i, t in enumerate(ranks)},
            "merges": [f"{s(a)} {s(b)}" for a, b in recover_merges(ranks)],
        },
    }


def hf_config(cfg, tok) -> dict[str, Any]:
    stops = [tok.bos_id, tok.special_id(REPLY_END)]
    return {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": 4 * cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.sequence_len,
        "hidden_act": "relu2",
        "rms_norm_eps": FLOAT32_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "final_logit_softcapping": float(cfg.softcap),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": tok.bos_id,
        "eos_token_id": stops,
        "pad_token_id": None,
        "dtype": "float32",
    }


def hf_weights(model) -> dict[str, Any]:
    """Our state as transformers' nanochat names, with the query/key sign bridge (module docstring)."""
    import torch

    c = model.config
    d, q_dim, kv_dim = c.head_dim, c.n_head * c.head_dim, c.n_kv_head * c.head_dim

    def flip_second_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
        sign = torch.ones(heads, d, 1, dtype=w.dtype)
        sign[:, d // 2:] = -1.0
        return (w.view(heads, d, -1) * sign).reshape(heads * d, -1)

    out = {"model.embed_tokens.weight": model.wte.weight, "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.blocks):
        q, k, v = block.attn.c_qkv.weight.split((q_dim, kv_dim, kv_dim), dim=0)
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = flip_second_halves(q, c.n_head)
        out[p + "self_attn.k_proj.weight"] = flip_second_halves(k, c.n_kv_head)
        out[p + "self_attn.v_proj.weight"] = v
        out[p + "self_attn.o_proj.weight"] = block.attn.c_proj.weight
        out[p + "mlp.fc1.weight"] = block.mlp.c_fc.weight
        out[p + "mlp.fc2.weight"] = block.mlp.c_proj.weight
    return {k: t.detach().to("cpu", dtype=torch.float32).contiguous() for k, t in out.items()}


def model_card(cfg, meta: dict, n_params: int) -> str:
    train = (meta.get("config") or {}).get("train") or {}
    state = meta.get("train_state") or {}
    facts = [f"- {n_params / 1e6:.2f}M parameters: {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads "
             f"({cfg.n_kv_head} key/value), vocabulary {cfg.vocab_size}, context {cfg.sequence_len} tokens"]
    if meta.get("step") is not None:
        facts.append(f"- trained for {meta['step']} steps" +
                     (f", {state['tokens_seen']:,} tokens" if isinstance(state.get("tokens_seen"), int) else ""))
    if train.get("dataset") or train.get("data"):
        facts.append(f"- data: {train.get('dataset') or train.get('data')}")
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [nanochat, nanochat-studio]",
        "---", "", "# A small GPT trained with nanochat-studio", "",
        "Trained from scratch with nanochat-studio (a nanochat-style decoder-only transformer: rotary positions, "
        "QK-norm, ReLU² MLP, untied head, logit soft-cap). It loads with the `nanochat` architecture built "
        "into transformers; no remote code.", "", *facts, "", "## Use", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(PATH)",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        'ids = tok("Once upon a time", return_tensors="pt").input_ids  # starts with <|bos|>',
        "print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=False)[0]))", "```", "",
        "The chat template wraps each message in `<|user_start|>`/`<|user_end|>` (and the system and "
        "assistant equivalents) after `<|bos|>`; the model answers after `<|assistant_start|>` and ends with "
        "`<|assistant_end|>`. A model that was only pretrained continues text; its chat answers will be rough.",
        "", "## Limits", "",
        "A small model trained on a small budget: it makes things up and knows little. Special-token strings "
        "inside text given to this tokenizer become special tokens; strip them from untrusted input.", "",
    ])


def export(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the HF directory for a checkpoint (trainer.checkpoint layout). Raises CheckpointError for a
    bad checkpoint and FileExistsError when ``out_dir`` exists and is not empty."""
    from safetensors.torch import save_file

    from trainer.checkpoint import load_model

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    model, tok, meta = load_model(checkpoint_dir, "cpu")
    cfg = model.config
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def write(name: str, obj: Any) -> None:
        (tmp / name).write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    save_file(hf_weights(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    write("config.json", hf_config(cfg, tok))
    stops = [tok.bos_id, tok.special_id(REPLY_END)]
    write("generation_config.json", {"bos_token_id": tok.bos_id, "eos_token_id": stops, "pad_token_id": tok.bos_id})
    write("tokenizer.json", tokenizer_json(tok))
    specials = sorted(tok._specials, key=tok._specials.get)
    write("tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "eos_token": REPLY_END, "pad_token": "<|bos|>",
        "additional_special_tokens": [s for s in specials if s not in ("<|bos|>", REPLY_END)],
        "add_bos_token": True, "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.sequence_len, "chat_template": JINJA,
    })
    write("special_tokens_map.json", {"bos_token": "<|bos|>", "eos_token": REPLY_END, "pad_token": "<|bos|>"})
    (tmp / "README.md").write_text(model_card(cfg, meta, model.num_params()), encoding="utf-8")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.export_hf", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint directory (trainer.checkpoint layout)")
    p.add_argument("out", help="directory to write (must not exist, or be empty)")
    args = p.parse_args(argv)
    from trainer.checkpoint import CheckpointError

    try:
        out = export(args.checkpoint, args.out)
    except (CheckpointError, FileExistsError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

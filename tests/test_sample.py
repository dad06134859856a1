"""trainer.sample: exact cached decoding, whole UTF-8 characters, sampling arguments, the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import sample, sizing
from trainer.model import GPT, GPTConfig
from trainer.sample import Generation, chat, complete, cut_at_stop_text, generate_tokens

pytestmark = pytest.mark.trainer  # the trainer alone: never opens the store

REPO = Path(__file__).resolve().parents[1]


class ByteTokenizer:
    """A stand-in with the real tokenizer's interface: id i < 256 is byte i, then the specials.
    One token per byte makes every multi-byte character span several tokens."""

    SPECIALS = sizing.SPECIAL_TOKENS

    def __init__(self):
        self.vocab_size = 256 + len(self.SPECIALS)
        self.bos_id = self.special_id("<|bos|>")

    def special_id(self, name):
        return 256 + self.SPECIALS.index(name)

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids):
        return b"".join(bytes([i]) if i < 256 else self.SPECIALS[i - 256].encode() for i in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def render_for_completion(self, messages):
        ids = [self.bos_id]
        for m in messages:
            ids += [self.special_id(f"<|{m['role']}_start|>"), *self.encode(m["content"]),
                    self.special_id(f"<|{m['role']}_end|>")]
        return ids + [self.special_id("<|assistant_start|>")]


TOK = ByteTokenizer()
DOC = "Ünïcode snow ☃, 日本, 🙂 ok"
CONVERSATION = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "héllo ✓ 🙂"}]


def train(model, sequences, steps, lr=3e-3):
    """Plain AdamW on whole sequences, padded with ignored targets."""
    width = max(len(s) for s in sequences) - 1
    x = torch.zeros(len(sequences), width, dtype=torch.long)
    y = torch.full((len(sequences), width), -1, dtype=torch.long)
    for i, s in enumerate(sequences):
        x[i, :len(s) - 1] = torch.tensor(s[:-1])
        y[i, :len(s) - 1] = torch.tensor(s[1:])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(steps):
        loss = model(x, targets=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


@pytest.fixture(scope="module")
def parrot():
    """A byte-level model that has memorised one document and one conversation."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_shape(sizing.shape_for(2, TOK.vocab_size, 64)))
    doc = [TOK.bos_id, *TOK.encode(DOC), TOK.bos_id]
    convo = TOK.render_for_completion(CONVERSATION[:1]) + TOK.encode(CONVERSATION[1]["content"]) \
        + [TOK.special_id("<|assistant_end|>")]
    assert train(model, [doc, convo], steps=150) < 0.05
    return model.eval()


@pytest.fixture(scope="module")
def noise():
    """A random byte-level model: it emits arbitrary bytes, broken UTF-8 included."""
    torch.manual_seed(1)
    model = GPT(GPTConfig.from_shape(sizing.shape_for(1, TOK.vocab_size, 32)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def test_complete_streams_whole_characters_of_the_memorised_text(parrot):
    gen = complete(parrot, TOK, "Ünï", temperature=0, max_tokens=100)
    deltas = list(gen)
    rest = DOC[len("Ünï"):]
    assert "".join(deltas) == rest
    assert all("\ufffd" not in d for d in deltas)  # no character was cut
    assert len(deltas) < len(rest.encode())  # multi-byte characters came out whole, not per byte
    assert gen.finish_reason == "stop"
    assert gen.prompt_tokens == 1 + len("Ünï".encode())
    assert gen.completion_tokens == len(rest.encode()) + 1  # the closing <|bos|> included


def test_chat_answers_and_stops_at_assistant_end(parrot):
    gen = chat(parrot, TOK, CONVERSATION[:1], temperature=0, max_tokens=100)
    assert "".join(gen) == CONVERSATION[1]["content"]
    assert gen.finish_reason == "stop"


def test_max_tokens_ends_with_length(parrot):
    gen = complete(parrot, TOK, "Ünï", temperature=0, max_tokens=5)
    text = "".join(gen)
    assert gen.finish_reason == "length" and gen.completion_tokens == 5
    assert text == DOC[len("Ünï"):][:len(text)]


def test_a_token_ending_mid_character_waits_for_the_next(monkeypatch):
    scripted = list("a😀é".encode()) + [TOK.special_id("<|assistant_end|>")]
    monkeypatch.setattr(sample, "generate_tokens", lambda *a, **k: iter(scripted))
    gen = Generation(None, TOK, [TOK.bos_id], stop_ids={TOK.special_id("<|assistant_end|>")}, max_tokens=10)
    assert list(gen) == ["a", "😀", "é"]
    assert gen.finish_reason == "stop" and gen.completion_tokens == len(scripted)


def test_an_unfinished_character_at_the_end_is_flushed_as_a_replacement(monkeypatch):
    monkeypatch.setattr(sample, "generate_tokens", lambda *a, **k: iter(list("x😀".encode())[:-1]))
    gen = Generation(None, TOK, [TOK.bos_id], max_tokens=4)
    assert list(gen) == ["x", "\ufffd"] and gen.finish_reason == "length"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_bytes_stream_as_valid_text_equal_to_decoding_all(noise, seed):
    tokens = list(generate_tokens(noise, [TOK.bos_id], max_tokens=60, temperature=1.0, seed=seed))
    deltas = list(Generation(noise, TOK, [TOK.bos_id], max_tokens=60, temperature=1.0, seed=seed))
    for d in deltas:
        d.encode("utf-8")  # no lone surrogates or half characters: every delta is valid on its own
    assert "".join(deltas) == TOK.decode(tokens)


def assert_same_greedy(model, prompt, got, expected, tie=1e-4):
    """Greedy decodes through other code paths agree token for token, except from a position where
    the best two logits are within float32 rounding of each other: there either token is right.
    Cached and uncached logits differ by at most ~2e-5 (tests/test_model.py), so only a gap below
    twice that can flip; 1e-4 leaves room, and a broken cache misses by far more."""
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            with torch.no_grad():
                best = model(torch.tensor([prompt + expected[:i]]))[0, -1].topk(2).values
            assert float(best[0] - best[1]) < tie, (i, a, b, best)
            return


@pytest.mark.parametrize("prompt_len", [1, 9])
def test_greedy_with_and_without_cache_agree(noise, parrot, prompt_len):
    for model in (noise, parrot):
        torch.manual_seed(prompt_len)
        prompt = torch.randint(0, 256, (prompt_len,)).tolist()
        cached = list(generate_tokens(model, prompt, max_tokens=20, temperature=0, use_cache=True))
        uncached = list(generate_tokens(model, prompt, max_tokens=20, temperature=0, use_cache=False))
        assert len(cached) == 20
        assert_same_greedy(model, prompt, cached, uncached)


def test_generation_runs_past_the_context_window(noise):
    window = noise.config.sequence_len
    for use_cache in (True, False):
        out = list(generate_tokens(noise, list(range(40)), max_tokens=2 * window + 3, temperature=1.0,
                                   seed=0, use_cache=use_cache))
        assert len(out) == 2 * window + 3


def test_seeded_sampling_is_reproducible(noise):
    def draw(seed, **kw):
        return list(generate_tokens(noise, [TOK.bos_id], max_tokens=30, seed=seed, **kw))

    assert draw(7) == draw(7)
    assert draw(7, top_k=20, top_p=0.9, temperature=0.7) == draw(7, top_k=20, top_p=0.9, temperature=0.7)
    assert draw(7) != draw(8)


def test_top_k_one_and_a_tiny_top_p_are_greedy(noise):
    greedy = list(generate_tokens(noise, [TOK.bos_id], max_tokens=15, temperature=0))
    assert list(generate_tokens(noise, [TOK.bos_id], max_tokens=15, top_k=1, seed=3)) == greedy
    assert list(generate_tokens(noise, [TOK.bos_id], max_tokens=15, top_p=1e-6, seed=3)) == greedy


def test_top_k_keeps_sampling_among_the_k_best(noise):
    prompt = [TOK.bos_id, 65]
    with torch.no_grad():
        best = set(torch.topk(noise(torch.tensor([prompt]))[0, -1], 3).indices.tolist())
    firsts = {next(iter(generate_tokens(noise, prompt, max_tokens=1, top_k=3, temperature=5.0, seed=s)))
              for s in range(40)}
    assert firsts <= best and len(firsts) > 1


@pytest.mark.parametrize("kwargs,word", [
    (dict(temperature=-1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(seed="x"), "seed"),
])
def test_bad_sampling_arguments_are_refused_before_generating(noise, kwargs, word):
    args = dict(max_tokens=5) | kwargs
    with pytest.raises(ValueError, match=word):
        generate_tokens(noise, [1, 2], **args)  # raises at the call, not at the first next()
    with pytest.raises(ValueError, match=word):
        complete(noise, TOK, "hi", **args)


def test_bad_prompts_are_refused(noise):
    with pytest.raises(ValueError, match="prompt_ids"):
        generate_tokens(noise, [], max_tokens=3)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate_tokens(noise, [TOK.vocab_size], max_tokens=3)


def test_stop_text_cuts_the_stream_even_across_deltas():
    assert "".join(cut_at_stop_text(["hel", "lo\nUs", "er: more"], ["\nUser:"])) == "hello"
    assert "".join(cut_at_stop_text(["abc", "def"], ["zz"])) == "abcdef"
    assert list(cut_at_stop_text(["ab", "c"], ["bd"])) == ["a", "bc"]  # "b" held until decided
    assert "".join(cut_at_stop_text(["STOP now"], ["STOP"])) == ""


def test_the_cli_streams_a_saved_checkpoint(tmp_path):
    from trainer.checkpoint import save_checkpoint
    from trainer.tokenizer import Tokenizer

    text = "The cat sat on the mat. Le café est chaud ☕. "
    tok = Tokenizer.train_from_iterator([text * 20], vocab_size=300)
    tok.save(tmp_path / "tok")
    ids = [tok.bos_id, *tok.encode(text), tok.bos_id]
    torch.manual_seed(0)
    cfg = GPTConfig.from_shape(sizing.shape_for(2, tok.vocab_size, 64))
    model = GPT(cfg)
    assert train(model, [ids], steps=120) < 0.05
    ckpt = save_checkpoint(tmp_path / "run", 120, model, [], {}, tmp_path / "tok", {"model": cfg.to_dict()})

    loaded, loaded_tok, meta = sample.load_for_inference(str(ckpt))
    assert meta["step"] == 120 and loaded_tok.vocab_size == tok.vocab_size
    out = subprocess.run([sys.executable, "-m", "trainer.sample", "--checkpoint", str(ckpt),
                          "--prompt", "The cat", "--temperature", "0", "--stop", "☕"],
                         capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == "The cat sat on the mat. Le café est chaud \n"
    assert "finish" in out.stderr

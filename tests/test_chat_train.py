"""The chat stage (issue 12): the template round trip, the assistant-only loss mask, bad conversation
files, resuming inside the chat stage, --init-from, the demo conversation set and `trainer.demo qa`.

Trainer runs are real `python -m trainer.train` subprocesses on tiny models (depth 1, seq 128)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_train import ENV, REPO, TINY, events_of, only, steps_losses  # noqa: E402

from trainer import chat_template, demo, demo_chat, progress  # noqa: E402
from trainer.chat_data import (ChatLoader, Conversation, check_messages, prepare_chat,  # noqa: E402
                               read_conversations, render_with_mask)
from trainer.sources import DataError  # noqa: E402

pytestmark = pytest.mark.trainer

CHAT_TINY = [*TINY, "--seq-len", "128", "--checkpoint-every", "1000"]
CONVERSATION = [{"role": "system", "content": "You tell stories."},
                {"role": "user", "content": "Hi! Who is <|assistant_end|> here?"},
                {"role": "assistant", "content": "Hello. I am a little model."},
                {"role": "user", "content": "Tell me a story."},
                {"role": "assistant", "content": "Once upon a time, there was a fox named Tom."}]


def chat_run(args, out, cache, timeout=300):
    argv = [sys.executable, "-m", "trainer.train", *CHAT_TINY, "--out", str(out), "--cache-dir", str(cache), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=timeout)
    return proc.returncode, events_of(proc.stdout), proc.stderr


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tokenizer():
    from trainer.tokenizer import Tokenizer
    return Tokenizer.train_from_iterator(demo.generate_stories(seed=1, n=300), vocab_size=512)


# --- the template and the mask -----------------------------------------------------------------------

def test_a_rendered_conversation_parses_back(tokenizer):
    plain = [m for m in CONVERSATION if "<|" not in m["content"]]
    assert chat_template.parse(chat_template.render(plain)) == plain
    # ids are never ambiguous, even for content that spells out a special token
    ids = tokenizer.render_chat(CONVERSATION)
    assert chat_template.parse_ids(tokenizer, ids) == CONVERSATION
    assert tokenizer.decode(ids) == chat_template.render(CONVERSATION)
    with pytest.raises(ValueError):
        chat_template.parse("<|bos|><|user_start|>unfinished")


def test_the_loss_mask_covers_exactly_the_assistant_content_and_its_end(tokenizer):
    ids, mask = render_with_mask(tokenizer, CONVERSATION)
    # the expected layout, built turn by turn from the template's tokens
    want_ids, want_mask = [tokenizer.bos_id], [0]
    for m in CONVERSATION:
        start, end = chat_template.ROLES[m["role"]]
        body = tokenizer.encode(m["content"])
        learn = int(m["role"] == "assistant")
        want_ids += [tokenizer.special_id(start), *body, tokenizer.special_id(end)]
        want_mask += [0, *[learn] * len(body), learn]
    assert ids == want_ids and mask == want_mask
    masked = [t for t, k in zip(ids, mask) if k]
    end = tokenizer.special_id("<|assistant_end|>")
    assert tokenizer.decode(masked) == "Hello. I am a little model.<|assistant_end|>" \
        "Once upon a time, there was a fox named Tom.<|assistant_end|>"
    assert masked.count(end) == 2

    # Packed rows: a target wherever the next token is the assistant's, -1 everywhere else.
    convs = [Conversation(CONVERSATION, f"c{i}") for i in range(40)]
    data = prepare_chat(convs, tokenizer, seq_len=128, seed=0)
    x, y = data.rows(0)
    assert x.shape == y.shape and x.shape[1] == 128
    assert int((y >= 0).sum()) == data.n_train_tokens == sum(mask) * len(data.train)
    # targets are the next tokens
    rows = np.concatenate([x, np.full((len(x), 1), -7)], axis=1)
    assert np.array_equal(y[y >= 0], rows[:, 1:][y >= 0])
    assert sorted(tokenizer.decode([t]) for t in y[y >= 0] if t == end) == ["<|assistant_end|>"] * (2 * len(data.train))


def test_the_loader_resumes_at_the_same_batch(tokenizer):
    convs = [Conversation(c, str(i)) for i, c in enumerate(demo_chat.conversations(0, 60))]
    data = prepare_chat(convs, tokenizer, seq_len=256, seed=3)
    a = ChatLoader(data, 4)
    seen = [a.next_batch() for _ in range(30)]  # past an epoch's end: the next epoch is another order
    assert a.epoch >= 1
    b = ChatLoader(data, 4)
    b.load_state({"epoch": 0, "row": 4 * 10})
    for x, y in seen[10:]:
        bx, by = b.next_batch()
        assert bool((bx == x).all()) and bool((by == y).all())


# --- bad conversation files ----------------------------------------------------------------------------

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
BAD = {
    "chat_not_json": ('{"messages": [', "line 2 is not valid JSON"),
    "chat_no_messages": ({"text": "hello"}, "line 2: no messages"),
    "chat_unknown_role": ({"messages": [{"role": "robot", "content": "x"}]}, "role 'robot'"),
    "chat_empty_turn": ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]},
                        "message 1 (user) has no text"),
    "chat_long_turn": ({"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "a"}]},
                       "longer than the model's context"),
    "chat_no_assistant": ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
    "chat_alternation": ({"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"},
                                       {"role": "assistant", "content": "a"}]}, "message 2 is user where a assistant"),
}


def _write(path, bad):
    lines = [json.dumps(GOOD), bad if isinstance(bad, str) else json.dumps(bad), json.dumps(GOOD)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("code", sorted(BAD))
def test_each_bad_conversation_is_named_with_its_line(tmp_path, tokenizer, code):
    bad, words = BAD[code]
    path = _write(tmp_path / "chats.jsonl", bad)
    with pytest.raises(DataError) as e:
        prepare_chat(read_conversations(str(path)), tokenizer, seq_len=128, seed=0)
    assert e.value.code == code and "chats.jsonl line 2" in e.value.message and words in e.value.message


def test_a_system_turn_only_first_and_gzip_and_directories_read(tmp_path):
    system_late = {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}
    with pytest.raises(DataError) as e:
        read_conversations(str(_write(tmp_path / "s.jsonl", system_late)))
    assert e.value.code == "chat_alternation"
    d = tmp_path / "dir"
    d.mkdir()
    with gzip.open(d / "a.jsonl.gz", "wt") as f:
        f.write(json.dumps(GOOD) + "\n\n")
    (d / "b.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    convs = read_conversations(str(d))
    assert [c.messages for c in convs] == [GOOD["messages"], CONVERSATION]
    assert read_conversations(f"file://{d}/b.jsonl")[0].where == "b.jsonl line 1"


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache):
    """A tiny pretrained checkpoint (20 steps), as --init-from takes it."""
    out = tmp_path_factory.mktemp("base")
    code, events, err = chat_run(["--max-steps", "20"], out, cache)
    assert code == 0, err
    return events[-1]["checkpoint"]


@pytest.mark.parametrize("code", ["chat_not_json", "chat_alternation", "chat_long_turn"])
def test_a_bad_conversation_file_exits_65_before_any_step(tmp_path, base, cache, code):
    path = _write(tmp_path / "chats.jsonl", BAD[code][0])
    for args in (["--init-from", base], ["--max-steps", "5"]):  # alone, and after pretraining
        rc, events, err = chat_run([*args, "--chat-data", str(path)], tmp_path / f"run{len(args)}", cache)
        assert rc == progress.EXIT_DATA, err
        assert not only(events, "step") and events[-1]["event"] == "error"
        assert events[-1]["code"] == code and "chats.jsonl line 2" in events[-1]["message"]


def test_a_diverging_chat_stage_stops_as_a_user_error_naming_its_flag(tmp_path, base, cache):
    rc, events, err = chat_run(["--init-from", base, "--chat-data", "demo", "--chat-steps", "20",
                                "--chat-lr-scale", "1e38", "--grad-clip", "0"], tmp_path / "run", cache)
    assert rc == progress.EXIT_DIVERGED, err
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "user" and events[-1]["code"] == "diverged"
    assert "chat-stage loss" in events[-1]["message"] and "--chat-lr-scale" in events[-1]["message"]


def test_init_from_needs_a_checkpoint_and_chat_data(tmp_path, cache):
    rc, events, _ = chat_run(["--init-from", str(tmp_path), "--chat-data", "demo"], tmp_path / "a", cache)
    assert rc == progress.EXIT_USAGE and "not a usable checkpoint" in events[-1]["message"]
    rc, events, _ = chat_run(["--init-from", str(tmp_path)], tmp_path / "b", cache)
    assert rc == progress.EXIT_USAGE and "init_from needs chat_data" in events[-1]["message"]


# --- the stage in a run: events, resume, init-from ------------------------------------------------------

PLAN = ["--max-steps", "10", "--chat-data", "demo", "--chat-steps", "10", "--eval-every", "5", "--sample-every", "10"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
    code, events, err = chat_run(PLAN, tmp_path_factory.mktemp("straight"), cache)
    assert code == 0, err
    return events


def test_a_run_pretrains_then_chat_tunes_with_stage_tagged_events(straight):
    start, done = straight[0], straight[-1]
    assert start["total_steps"] == 20 and start["stages"] == [{"stage": "pretrain", "steps": 10},
                                                                {"stage": "chat", "steps": 10}]
    stage = only(straight, "stage")
    assert len(stage) == 1 and stage[0]["step"] == 10 and stage[0]["steps"] == 10
    assert stage[0]["n_conversations"] > 0 and stage[0]["n_val_conversations"] > 0
    steps = only(straight, "step")
    assert [e["step"] for e in steps] == list(range(1, 21)) and all(e["total_steps"] == 20 for e in steps)
    assert {e["stage"] for e in steps if e["step"] <= 10} == {"pretrain"}
    assert {e["stage"] for e in steps if e["step"] > 10} == {"chat"}
    for name in ("eval", "sample", "checkpoint"):
        assert {e["stage"] for e in only(straight, name)} == {"pretrain", "chat"}, name
    assert len(only(straight, "done")) == 1 and done["chat_tuned"] is True and done["step"] == 20
    from trainer import checkpoint as ckpt
    base_ckpt, chat_ckpt = (e["path"] for e in only(straight, "checkpoint"))
    assert (ckpt.read_config(base_ckpt)["kind"], ckpt.read_config(base_ckpt)["chat_tuned"]) == ("base", False)
    assert (ckpt.read_config(chat_ckpt)["kind"], ckpt.read_config(chat_ckpt)["chat_tuned"]) == ("chat", True)


@pytest.mark.parametrize("stop_at", [10, 15])  # at the stage boundary, and inside the chat stage
def test_stopping_and_resuming_in_the_chat_stage_is_exact(tmp_path, cache, straight, stop_at):
    code, first, err = chat_run([*PLAN, "--stop-at-step", str(stop_at)], tmp_path, cache)
    assert code == 0, err
    assert not only(first, "done") and only(first, "checkpoint")[-1]["step"] == stop_at
    code, second, err = chat_run([*PLAN, "--resume"], tmp_path, cache)
    assert code == 0, err
    assert second[0]["resumed_from_step"] == stop_at
    a, b = steps_losses(straight), steps_losses(first) | steps_losses(second)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    assert only(straight, "eval")[-1]["val_loss"] == pytest.approx(only(second, "eval")[-1]["val_loss"], abs=1e-6)


def test_sigterm_in_the_chat_stage_checkpoints_exits_75_and_resume_finishes_exactly(tmp_path, cache, straight):
    import signal
    argv = [sys.executable, "-m", "trainer.train", *CHAT_TINY, "--out", str(tmp_path), "--cache-dir", str(cache), *PLAN]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        event = progress.parse_line(line)
        if event and event["event"] == "step" and event["step"] >= 12:
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=120)
    assert proc.returncode == progress.EXIT_PREEMPTED, err
    events = events_of("".join(lines) + rest)
    stopped = only(events, "checkpoint")[-1]
    assert stopped["stage"] == "chat" and 12 <= stopped["step"] < 20 and not only(events, "done")
    code, resumed, err = chat_run([*PLAN, "--resume"], tmp_path, cache)
    assert code == 0, err
    assert resumed[0]["resumed_from_step"] == stopped["step"] and resumed[-1]["step"] == 20
    assert abs(straight[-1]["final_loss"] - resumed[-1]["final_loss"]) <= 1e-6


def test_init_from_chat_tunes_a_checkpoint_as_the_same_run_would(tmp_path, cache, straight):
    base_ckpt = only(straight, "checkpoint")[0]["path"]  # pretraining's last step, 10
    code, events, err = chat_run(["--init-from", base_ckpt, "--chat-data", "demo", "--chat-steps", "10",
                                  "--eval-every", "5", "--depth", "3"], tmp_path, cache)
    assert code == 0, err
    start = events[0]
    assert start["stages"] == [{"stage": "chat", "steps": 10}] and start["total_steps"] == 10
    assert start["config"]["depth"] == 1  # the checkpoint's shape, whatever --depth says
    assert only(events, "stage")[0]["step"] == 0
    # The same weights, data, optimizers and schedule as the two-stage run's chat stage: the same losses.
    a = {s - 10: v for s, v in steps_losses(straight).items() if s > 10}
    b = steps_losses(events)
    assert sorted(b) == list(range(1, 11))
    for k in b:
        assert abs(a[k] - b[k]) <= 1e-6, (k, a[k], b[k])
    from trainer import checkpoint as ckpt
    config = ckpt.read_config(events[-1]["checkpoint"])
    assert config["kind"] == "chat" and config["init_from"] == base_ckpt
    assert (Path(events[-1]["checkpoint"]) / "tokenizer" / "tokenizer.json").is_file()


# --- the demo conversation set and `trainer.demo qa` -----------------------------------------------------

def test_the_demo_set_is_seeded_and_every_reply_is_checked_grammatical():
    assert demo_chat.conversations(5, 50) == demo_chat.conversations(5, 50)
    assert demo_chat.conversations(5, 50) != demo_chat.conversations(6, 50)
    convs = demo_chat.conversations(1, 400)
    kinds = {c[0]["content"] for c in convs}
    assert any(k.startswith("Tell me a story about") for k in kinds) and "Hello!" in kinds
    assert sum(len(c) > 2 for c in convs) > 100  # multi-turn follow-ups
    for c in convs:
        check_messages({"messages": c}, "demo")  # the same checks a file gets
        for m in c[1::2]:
            assert all(demo_chat.check_reply_sentence(s) for s in demo_chat.split_reply(m["content"])), m


def test_the_checker_scores_facts_not_just_words():
    item = demo_chat.qa_items(40, 7)
    home = next(i for i in item if i.kind == "home")
    assert demo_chat.score(home.reply, home) == (True, True)
    other = next(p for p in demo.PLACES if p != home.answer)
    wrong = home.reply.replace(home.answer, other)
    assert demo_chat.score(wrong, home) == (False, True)
    both = home.reply[:-1] + f" near the {other}."
    assert demo_chat.score(both, home)[0] is False  # two places: not an answer
    assert demo_chat.score(f"{home.answer} {home.answer} the lived.", home) == (True, False)
    assert demo_chat.score("", home) == (False, False)


def test_the_qa_command_prints_fresh_questions_for_any_seed():
    def qa(*args):
        out = subprocess.run([sys.executable, "-m", "trainer.demo", "qa", *args], capture_output=True, text=True,
                             env=ENV, cwd=REPO, timeout=60, check=True).stdout
        return [json.loads(line) for line in out.splitlines()]
    lines = qa("--n", "12", "--seed", "3")
    assert len(lines) == 12 and all(set(x) == {"story", "question", "answer"} for x in lines)
    assert lines == qa("--n", "12", "--seed", "3") and lines != qa("--n", "12", "--seed", "4")
    for x in lines:
        assert x["answer"].isalpha() and x["answer"] in x["story"]
    train_stories = {c[0]["content"] for c in demo_chat.conversations(42, 2000)}
    assert not any(demo_chat.prompt(x["story"], x["question"]) in train_stories for x in lines)
    assert subprocess.run([sys.executable, "-m", "trainer.demo", "qa", "--n", "-1"], capture_output=True,
                          env=ENV, cwd=REPO).returncode == 2


# --- the model server renders with the template and stops at the assistant's end -------------------------

def test_the_model_server_renders_chat_with_the_template_and_stops_at_assistant_end(tmp_path, monkeypatch):
    from chat_fixtures import cached_tiny_checkpoint

    from trainer import sample
    from trainer.batching import TorchBackend
    backend = TorchBackend(str(cached_tiny_checkpoint(tmp_path / "ck")), "cpu", max_active=2)
    tok = backend.tokenizer
    msgs = [{"role": "user", "content": "Who is the story about?"}]
    seq = backend.open("chat", msgs, {"max_tokens": 8, "temperature": 0})
    assert seq.todo == tok.render_chat(msgs) + [tok.special_id(chat_template.REPLY_START)]
    assert tok.decode(seq.todo) == chat_template.render(msgs, add_generation_prompt=True)
    word = tok.encode(" Tom")[0]
    picks = iter([word, tok.special_id(chat_template.REPLY_END), word])
    monkeypatch.setattr(sample, "_pick", lambda *a, **k: next(picks))
    text = ""
    while not seq.done:
        backend.step([seq])
        text += "".join(t for t, _, _ in seq.take_output())
    backend.release(seq)
    assert seq.finish_reason == "stop" and seq.completion_tokens == 2 and text == tok.decode([word])

"""Conversations for the chat stage: read, validate, tokenize with the chat template, mask and batch.

    convs = read_conversations("chats.jsonl.gz")      # or "demo", a directory, an fsspec URL
    data = prepare_chat(convs, tokenizer, seq_len=256, seed=42)
    loader = ChatLoader(data, batch_size=8)            # x, y with y = -1 where no loss is taken

A file holds one conversation per line, ``{"messages": [{"role": ..., "content": ...}, ...]}``. Every
line is checked before training; the first bad one raises :class:`~trainer.sources.DataError` naming
the file, the line and the problem (not JSON, no messages, unknown role, empty or over-long turn, no
assistant turn, turns that do not alternate).

Tokens come from ``Tokenizer.render_chat``, the one rendering of ``trainer/chat_template.py``. The loss
is taken on the assistant's tokens only: its content and its <|assistant_end|> (what the model must
learn to write, and to stop), never on the user's or system's turns nor the turn-start tokens, which
the prompt supplies at inference. Conversations are packed whole into rows of ``seq_len + 1`` tokens
(a conversation longer than a row is cut); the rest of a row is padding with no loss. Each epoch
packs the training conversations in a new order fixed by (seed, epoch), so the loader's position is
(epoch, row) and resuming is exact.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from trainer import chat_template
from trainer.sources import DataError, _open_source

VAL_EVERY = 20  # every 20th conversation is held out for validation (5%, as for text)
MAX_TURN_CHARS = 1 << 20  # a turn longer than this is refused before tokenizing


@dataclass
class Conversation:
    messages: list[dict]
    where: str  # "file.jsonl line 7", for error messages


def check_messages(record: Any, where: str) -> list[dict]:
    """The messages of one parsed record, or DataError naming ``where`` and the problem."""
    msgs = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise DataError("chat_no_messages", f"{where}: no messages (each line must be an object like "
                                            '{"messages": [{"role": "user", "content": "..."}, ...]})')
    expected = "user"
    for i, m in enumerate(msgs):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in chat_template.ROLES:
            raise DataError("chat_unknown_role", f"{where}: message {i + 1} has role {role!r}; "
                                                 "use system, user or assistant")
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            raise DataError("chat_empty_turn", f"{where}: message {i + 1} ({role}) has no text")
        if len(content) > MAX_TURN_CHARS:
            raise DataError("chat_long_turn", f"{where}: message {i + 1} ({role}) is {len(content):,} "
                                              f"characters, more than {MAX_TURN_CHARS:,}")
        if role == "system" and i == 0:
            continue
        if role != expected:
            raise DataError("chat_alternation", f"{where}: message {i + 1} is {role} where a {expected} turn "
                                                "must come (a system message may only be first, then turns "
                                                "alternate user, assistant, user, ...)")
        expected = "assistant" if role == "user" else "user"
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError("chat_no_assistant", f"{where}: no assistant turn, so nothing to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _lines(f, name: str) -> Iterator[tuple[int, bytes]]:
    for lineno, line in enumerate(f, start=1):
        if line.strip():
            yield lineno, line


def read_conversations(spec: str, storage_options: dict | None = None, seed: int = 0) -> list[Conversation]:
    """Every conversation of ``spec`` ("demo", a JSONL file (.gz too), a directory of them, an fsspec
    URL), validated. Raises DataError."""
    if spec == "demo":
        from trainer import demo_chat
        return [Conversation(c, f"demo conversation {i + 1}")
                for i, c in enumerate(demo_chat.conversations(seed, demo_chat.N_CONVERSATIONS))]
    fs, paths = _open_source(spec, storage_options)
    out: list[Conversation] = []
    for path in paths:
        name = path.rsplit("/", 1)[-1]
        with fs.open(path, "rb") as raw:
            f = gzip.GzipFile(fileobj=raw, mode="rb") if name.lower().endswith(".gz") else raw
            try:
                for lineno, line in _lines(f, name):
                    where = f"{name} line {lineno}"
                    try:
                        record = json.loads(line.decode("utf-8-sig" if lineno == 1 else "utf-8"))
                    except UnicodeDecodeError as e:
                        raise DataError("undecodable", f"{where} is not valid UTF-8 (column {e.start})") from None
                    except json.JSONDecodeError as e:
                        raise DataError("chat_not_json", f"{where} is not valid JSON: {e.msg}") from None
                    out.append(Conversation(check_messages(record, where), where))
            except (gzip.BadGzipFile, EOFError, zlib.error) as e:
                raise DataError("bad_format", f"{name} is not a valid gzip file: {e}") from None
    if not out:
        raise DataError("empty", f"{spec} holds no conversations")
    return out


# ---- tokens and the loss mask -------------------------------------------------------------------

def render_with_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, mask): mask[i] is 1 where token i is the assistant's (its content and its
    <|assistant_end|>), the tokens the chat stage takes a loss on. Content is encoded as ordinary text,
    so the only special tokens in the ids are the template's: the assistant spans are exactly the
    tokens after each <|assistant_start|> up to and including the next <|assistant_end|>."""
    ids = tokenizer.render_chat(messages)
    start = tokenizer.special_id(chat_template.REPLY_START)
    end = tokenizer.special_id(chat_template.REPLY_END)
    mask, inside = [], False
    for t in ids:
        if inside:
            mask.append(1)
            inside = t != end
        else:
            mask.append(0)
            inside = t == start
    return ids, mask


def pack(lengths: list[int], width: int) -> list[list[int]]:
    """Whole conversations a row, in the given order: for each row of ``width`` tokens, the indices of the
    conversations it holds (one longer than a row is cut to it and fills a row alone). The app's plan
    replays this on estimated lengths (nanochat_studio/chatplan.py)."""
    rows: list[list[int]] = []
    row: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        n = min(n, width)
        if used + n > width and row:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(row)
    return rows


@dataclass
class ChatData:
    """Tokenized conversations, split into training and validation."""
    train: list[tuple[np.ndarray, np.ndarray]]  # (ids, mask) per conversation
    val: list[tuple[np.ndarray, np.ndarray]]
    seq_len: int
    seed: int
    pad_id: int
    n_train_tokens: int  # assistant tokens with a loss, in one epoch
    n_val_tokens: int
    val_prompts: list[str]  # the first user turn of each held-out conversation, for samples

    def rows(self, epoch: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) int64 arrays of shape (rows, seq_len): the training split packed in epoch ``epoch``'s
        order, or the validation split in its own order (``epoch`` None)."""
        convs = self.val if epoch is None else [self.train[i] for i in
                                                np.random.default_rng([self.seed, epoch]).permutation(len(self.train))]
        width = self.seq_len + 1
        rows_ids, rows_mask = [], []
        for row in pack([len(c_ids) for c_ids, _ in convs], width):
            ids = [convs[i][0][:width] for i in row]
            mask = [convs[i][1][:width] for i in row]
            pad = width - sum(len(a) for a in ids)
            rows_ids.append(np.concatenate(ids + [np.full(pad, self.pad_id, np.int64)]))
            rows_mask.append(np.concatenate(mask + [np.zeros(pad, np.int64)]))
        tokens, m = np.stack(rows_ids), np.stack(rows_mask)
        y = np.where(m[:, 1:] == 1, tokens[:, 1:], -1)
        return tokens[:, :-1].copy(), y


def prepare_chat(convs: list[Conversation], tokenizer, seq_len: int, seed: int, drop_long: bool = False) -> ChatData:
    """Tokenize, check every turn fits the model's context, and hold out every VAL_EVERY-th
    conversation (at least one). Raises DataError. ``drop_long`` leaves out a conversation with a turn
    too long for the context instead (for the generated demo set at a small --seq-len)."""
    if len(convs) < 2:
        raise DataError("too_small", f"{len(convs)} conversation: the chat stage needs at least 2 "
                                     "(one is held out to measure a validation loss)")
    encoded, kept = [], []
    for c in convs:
        ids, mask = render_with_mask(tokenizer, c.messages)
        too_long = [(i, n) for i, m in enumerate(c.messages)
                    if (n := len(tokenizer.encode(m["content"])) + 2) > seq_len]
        if too_long and drop_long:
            continue
        if too_long:
            i, n = too_long[0]
            raise DataError("chat_long_turn", f"{c.where}: message {i + 1} ({c.messages[i]['role']}) is {n:,} "
                                              f"tokens, longer than the model's context of {seq_len}")
        encoded.append((np.array(ids, np.int64), np.array(mask, np.int64)))
        kept.append(c)
    convs = kept
    if len(convs) < 2:
        raise DataError("too_small", f"{len(convs)} conversation fits the context of {seq_len} tokens: "
                                     "the chat stage needs at least 2")
    val_idx = set(range(VAL_EVERY - 1, len(encoded), VAL_EVERY)) or {len(encoded) - 1}
    train = [e for i, e in enumerate(encoded) if i not in val_idx]
    val = [e for i, e in enumerate(encoded) if i in val_idx]
    count = lambda split: int(sum(int(m[: seq_len + 1].sum()) for _, m in split))  # noqa: E731
    prompts = [next(m["content"] for m in convs[i].messages if m["role"] == "user") for i in sorted(val_idx)]
    return ChatData(train, val, seq_len, seed, tokenizer.bos_id, count(train), count(val), prompts)


class ChatLoader:
    """Batches of packed rows, resumable by (epoch, row). ``batch_size`` is the global rows per call;
    rank r of world_size takes rows [r*B/W, (r+1)*B/W) of each, as trainer/data.TokenLoader does.
    An epoch's leftover rows that do not fill a batch are skipped."""

    def __init__(self, data: ChatData, batch_size: int, *, rank: int = 0, world_size: int = 1):
        self.data, self.batch_size, self.rank, self.world_size = data, batch_size, rank, world_size
        self.epoch, self.row = 0, 0
        self._rows: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None
        if len(self._epoch_rows()[0]) < batch_size:
            raise DataError("too_small", f"the training conversations fill {len(self._epoch_rows()[0])} rows of "
                                         f"{data.seq_len} tokens, fewer than one batch of {batch_size}")

    def _epoch_rows(self) -> tuple[np.ndarray, np.ndarray]:
        if self._rows is None or self._rows[0] != self.epoch:
            self._rows = (self.epoch, self.data.rows(self.epoch))
        return self._rows[1]

    def rows_per_epoch(self) -> int:
        return len(self._epoch_rows()[0])

    def next_batch(self, device="cpu"):
        import torch
        x, y = self._epoch_rows()
        if self.row + self.batch_size > len(x):
            self.epoch, self.row = self.epoch + 1, 0
            x, y = self._epoch_rows()
        per = self.batch_size // self.world_size
        lo = self.row + self.rank * per
        self.row += self.batch_size
        return torch.from_numpy(x[lo:lo + per]).to(device), torch.from_numpy(y[lo:lo + per]).to(device)

    def state(self) -> dict:
        return {"epoch": self.epoch, "row": self.row}

    def load_state(self, state: dict) -> None:
        self.epoch, self.row = int(state["epoch"]), int(state["row"])

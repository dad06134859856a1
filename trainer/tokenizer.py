"""Byte-level BPE: trained with rustbpe, encoded with tiktoken, saved in a small file of our own.

    tok = Tokenizer.train_from_iterator(texts, vocab_size=2048)
    tok.save("run/tokenizer"); tok = Tokenizer.load("run/tokenizer")
    ids = tok.encode("Once upon a time")

Token ids: 0..255 are the raw bytes, then the learned merges in the order rustbpe learned them, then
SPECIAL_TOKENS in the order listed below. ``vocab_size`` counts all of them. Nothing is downloaded:
tiktoken is given the ranks we trained and saved.

The saved form is one JSON file (``tokenizer.json``): a format name and version, the split pattern,
every token's bytes in rank order as base64, and the special tokens with their ids. Loading only parses
JSON, so a tokenizer file from a user can never run code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import tiktoken

from trainer import chat_template
from trainer.sizing import MIN_VOCAB_SIZE, SPECIAL_TOKENS, choose_vocab_size  # noqa: F401

FORMAT = "nanochat-studio-bpe"
FORMAT_VERSION = 1
FILENAME = "tokenizer.json"

# GPT-4's split pattern: contractions, words with one leading non-letter, numbers in groups of at most
# three digits, punctuation runs, newlines and other whitespace. BPE merges never cross these pieces.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# The special tokens and the vocabulary rule live in sizing.py (torch- and tiktoken-free) so the web
# app's estimates use the same numbers; they are re-exported here for the trainer's callers.
MAX_VOCAB_SIZE = 1 << 20  # far above anything useful; keeps token files and embeddings sane

class Tokenizer:
    """A trained BPE with our special tokens; immutable once built."""

    def __init__(self, ranks: Sequence[bytes], pattern: str = SPLIT_PATTERN,
                 special_tokens: Sequence[str] = SPECIAL_TOKENS):
        if len(ranks) < 256:
            raise ValueError("a byte-level BPE needs at least the 256 byte tokens")
        if len(set(ranks)) != len(ranks):
            raise ValueError("duplicate token bytes in ranks")
        self._ranks = [bytes(r) for r in ranks]
        self._pattern = pattern
        self._specials = {name: len(self._ranks) + i for i, name in enumerate(special_tokens)}
        self._enc = tiktoken.Encoding(
            "nanochat-studio",
            pat_str=pattern,
            mergeable_ranks={tok: i for i, tok in enumerate(self._ranks)},
            special_tokens=self._specials,
        )
        self._saved_form: bytes | None = None

    # ---- building -------------------------------------------------------------------------------
    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Train on ``texts``. ``vocab_size`` includes the special tokens.

        A corpus too small to supply that many merges yields a smaller vocabulary (read ``vocab_size``
        afterwards). Raises ValueError for a size outside [MIN_VOCAB_SIZE, MAX_VOCAB_SIZE].
        """
        import rustbpe  # only needed to train; loading a saved tokenizer works without it

        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
        if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size must be between {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} "
                f"special tokens) and {MAX_VOCAB_SIZE}, got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        pairs = sorted(trainer.get_mergeable_ranks(), key=lambda p: p[1])
        if [rank for _, rank in pairs] != list(range(len(pairs))):
            raise RuntimeError("rustbpe returned non-contiguous ranks")
        return cls([tok for tok, _ in pairs], SPLIT_PATTERN, SPECIAL_TOKENS)

    # ---- saving ---------------------------------------------------------------------------------
    def _serialize(self) -> bytes:
        if self._saved_form is None:
            doc = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "pattern": self._pattern,
                "ranks": [base64.b64encode(tok).decode("ascii") for tok in self._ranks],
                "special_tokens": self._specials,
            }
            self._saved_form = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return self._saved_form

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/tokenizer.json`` atomically (temp file + rename); returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / FILENAME
        tmp = directory / f".{FILENAME}.{os.getpid()}.tmp"
        tmp.write_bytes(self._serialize())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Read a tokenizer saved by :meth:`save`. Raises ValueError for a file that is not one."""
        path = Path(directory) / FILENAME
        try:
            doc = json.loads(path.read_bytes())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} tokenizer file")
        if doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} has format version {doc.get('version')!r}; "
                             f"this code reads version {FORMAT_VERSION}")
        ranks = [base64.b64decode(t, validate=True) for t in doc["ranks"]]
        specials = doc["special_tokens"]
        names = sorted(specials, key=specials.get)
        if [specials[n] for n in names] != list(range(len(ranks), len(ranks) + len(names))):
            raise ValueError(f"{path}: special token ids must follow the ranks contiguously")
        return cls(ranks, doc["pattern"], names)

    def fingerprint(self) -> str:
        """sha256 (hex) of the saved form: equal fingerprints mean identical encodings."""
        return hashlib.sha256(self._serialize()).hexdigest()

    # ---- encoding -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._ranks) + len(self._specials)

    @property
    def bos_id(self) -> int:
        return self._specials["<|bos|>"]

    @property
    def pattern(self) -> str:
        return self._pattern

    def special_id(self, name: str) -> int:
        """Id of a special token, by its full string ("<|user_start|>"). KeyError if unknown."""
        return self._specials[name]

    def encode(self, text: str) -> list[int]:
        """Encode ordinary text. Special-token strings inside it are encoded as the plain text they are,
        so a user cannot forge a turn boundary."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """Encode many texts at once (tiktoken releases the GIL and uses a thread pool)."""
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._enc.decode_bytes(list(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Decode to text; a cut through a multi-byte character shows as U+FFFD, never an error."""
        return self._enc.decode(list(ids), errors="replace")

    def token_byte_lengths(self) -> list[int]:
        """Bytes of text each token id stands for; 0 for special tokens (they are not text). Used to
        turn a loss in nats per token into bits per byte, which does not depend on the vocabulary."""
        return [len(tok) for tok in self._ranks] + [0] * len(self._specials)

    # ---- chat -----------------------------------------------------------------------------------
    def render_chat(self, messages: Sequence[dict]) -> list[int]:
        """<|bos|> then each message wrapped in its role's start/end tokens.

        ``messages`` is a list of {"role": "system"|"user"|"assistant", "content": str}. A system
        message may only come first and uses its own <|system_start|>/<|system_end|> pair. Raises
        ValueError as chat_template.turns (which holds the rules).
        """
        ids = [self.bos_id]
        for start, content, end in chat_template.turns(messages):
            ids.append(self._specials[start])
            ids.extend(self.encode(content))
            ids.append(self._specials[end])
        return ids

    def render_for_completion(self, messages: Sequence[dict]) -> list[int]:
        """The conversation followed by <|assistant_start|>, for the model to write the reply."""
        return self.render_chat(messages) + [self._specials[chat_template.REPLY_START]]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint()[:12]})"

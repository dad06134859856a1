"""The chat template: how a conversation becomes tokens, defined once for everything outside trainer/tokenizer.py.

    <|bos|><|user_start|>Hi!<|user_end|><|assistant_start|>Hello.<|assistant_end|><|user_start|>...

Built on the special tokens reserved in ``trainer/sizing.py``: a conversation starts with <|bos|>; each
message is wrapped in its role's start and end tokens; a system message may only come first; to ask
the model for the next reply the text ends with <|assistant_start|> and the model writes until
<|assistant_end|>. ``trainer/tokenizer.py``'s ``render_chat`` produces the same ids directly, walking
:func:`turns` as :func:`render` does (tests hold the two together); the Hugging Face export
(``trainer/export_hf.py``) ships :data:`JINJA` as the tokenizer's ``chat_template``. A chat-tuning
stage and the model server render through this module too.
"""

from __future__ import annotations

import re
from typing import Iterator, Sequence

BOS = "<|bos|>"
ROLES = {
    "system": ("<|system_start|>", "<|system_end|>"),
    "user": ("<|user_start|>", "<|user_end|>"),
    "assistant": ("<|assistant_start|>", "<|assistant_end|>"),
}
REPLY_START = ROLES["assistant"][0]
REPLY_END = ROLES["assistant"][1]

# The same rules as render() below, for transformers' apply_chat_template (Jinja, as HF runs it:
# raise_exception is provided by transformers).
JINJA = (
    "{{- '" + BOS + "' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown role ' ~ message['role'] ~ ' (use system, user or assistant)') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' and not loop.first -%}"
    "{{- raise_exception('a system message can only be the first') -}}"
    "{%- endif -%}"
    "{{- '<|' ~ message['role'] ~ '_start|>' ~ message['content'] ~ '<|' ~ message['role'] ~ '_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + REPLY_START + "' -}}{%- endif -%}"
)


def turns(messages: Sequence[dict]) -> Iterator[tuple[str, str, str]]:
    """(start token, content, end token) of each message, checked by the template's rules: the one
    place they are enforced (render() here and Tokenizer.render_chat both walk these). Raises ValueError
    for an unknown role, a misplaced system message or non-string content."""
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r} (use system, user or assistant)")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message can only be the first")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string")
        start, end = ROLES[role]
        yield start, content, end


def render(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text with the special tokens written out (what :data:`JINJA` renders).
    Raises ValueError as :func:`turns`."""
    out = [BOS] + [f"{start}{content}{end}" for start, content, end in turns(messages)]
    if add_generation_prompt:
        out.append(REPLY_START)
    return "".join(out)


_TURN = re.compile(r"<\|(system|user|assistant)_start\|>(.*?)<\|\1_end\|>", re.S)


def parse(text: str) -> list[dict]:
    """The messages of a rendered conversation (the inverse of :func:`render`, without a generation
    prompt). Raises ValueError for text that is not one."""
    if not text.startswith(BOS):
        raise ValueError("a rendered conversation starts with " + BOS)
    messages, pos = [], len(BOS)
    for m in _TURN.finditer(text, pos):
        if m.start() != pos:
            break
        messages.append({"role": m.group(1), "content": m.group(2)})
        pos = m.end()
    if pos != len(text):
        raise ValueError(f"not a rendered conversation from character {pos}: {text[pos:pos + 40]!r}")
    return messages


def parse_ids(tokenizer, ids: Sequence[int]) -> list[dict]:
    """The messages of ``tokenizer.render_chat``'s ids. Unlike text, ids are never ambiguous: content
    that spells out a special token was encoded as ordinary text, not as the token."""
    starts = {tokenizer.special_id(s): (role, tokenizer.special_id(e)) for role, (s, e) in ROLES.items()}
    if not ids or ids[0] != tokenizer.bos_id:
        raise ValueError("rendered ids start with " + BOS)
    messages, i = [], 1
    while i < len(ids):
        if ids[i] not in starts:
            raise ValueError(f"token {i} ({ids[i]}) does not start a turn")
        role, end = starts[ids[i]]
        try:
            j = list(ids).index(end, i + 1)
        except ValueError:
            raise ValueError(f"the {role} turn at token {i} never ends") from None
        messages.append({"role": role, "content": tokenizer.decode(ids[i + 1:j])})
        i = j + 1
    return messages

"""The chat template: how a conversation becomes tokens, defined once for everything outside trainer/tokenizer.py.

    <|bos|><|user_start|>Hi!<|user_end|><|assistant_start|>Hello.<|assistant_end|><|user_start|>...

Built on the special tokens reserved in ``trainer/sizing.py``: a conversation starts with <|bos|>; each
message is wrapped in its role's start and end tokens; a system message may only come first; to ask
the model for the next reply the text ends with <|assistant_start|> and the model writes until
<|assistant_end|>. ``trainer/tokenizer.py``'s ``render_chat`` produces the same ids directly (tests
hold the two together); the Hugging Face export (``trainer/export_hf.py``) ships :data:`JINJA` as the
tokenizer's ``chat_template``. A chat-tuning stage and the model server render through this module too.
"""

from __future__ import annotations

from typing import Sequence

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


def render(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text with the special tokens written out (what :data:`JINJA` renders).
    Raises ValueError for an unknown role, a misplaced system message or non-string content."""
    out = [BOS]
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r} (use system, user or assistant)")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message can only be the first")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string")
        start, end = ROLES[role]
        out.append(f"{start}{content}{end}")
    if add_generation_prompt:
        out.append(REPLY_START)
    return "".join(out)

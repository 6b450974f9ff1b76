"""A prompt as users give it, a string or a chat conversation, rendered to the text a model continues.

A conversation is a list of ``{"role": str, "content": str}`` messages (the TRL / OpenAI form); it is
rendered with the tokenizer's own chat template and the generation prompt of the assistant turn, so
a chat model is prompted the way it was trained. Errors name the file, line and field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tracealign_jax.records import RecordError


def check_messages(value: Any, path: str | Path, line: int, field: str) -> list[dict]:
    """``value`` as a non-empty list of ``{"role": str, "content": str}`` messages (other keys kept, Arrow's
    None fillers dropped); else RecordError."""
    if not value:
        raise RecordError(path, line, field, "empty conversation")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RecordError(path, line, f"{field}[{j}]", "expected {'role': str, 'content': str}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def render_conversation(tokenizer: Any, messages: list, path: str | Path, line: int, field: str = "prompt") -> str:
    """The chat-template text of ``messages`` followed by the assistant turn's generation prompt.

    Tokenize the result with ``add_special_tokens=False``: the template writes its own BOS."""
    msgs = check_messages(messages, path, line, field)
    if getattr(tokenizer, "chat_template", None) is None:
        raise RecordError(path, line, field, "a conversation needs a tokenizer with a chat template (this one has "
                                             "none): give the prompt as a string, or use the model's chat tokenizer")
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

"""Messages to token ids: through the tokenizer's chat template, or as raw text."""

from __future__ import annotations


def encode(tokenizer, messages: list[dict], chat: bool) -> list[int]:
    """Token ids for a conversation: through the chat template, or the raw text of its turns."""
    if chat:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    text = "".join(m["content"] for m in messages if m["role"] != "system")
    bos = tokenizer.bos_token
    return tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos))


def wants_chat(tokenizer, chat: bool | None) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat

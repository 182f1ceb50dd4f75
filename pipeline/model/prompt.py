"""Messages to token ids: through the tokenizer's chat template, or as raw text."""

from __future__ import annotations


def render(tokenizer, messages: list[dict], tools: list | None = None, **template_kwargs) -> str:
    """The chat template's text for a conversation, ending with the assistant's turn; `tools`
    and `template_kwargs` (e.g. enable_thinking) go to the template."""
    if tools:
        template_kwargs["tools"] = tools
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **template_kwargs)


def encode(tokenizer, messages: list[dict], chat: bool) -> list[int]:
    """Token ids for a conversation: through the chat template, or the raw text of its turns."""
    if chat:
        return tokenizer.encode(render(tokenizer, messages), add_special_tokens=False)
    text = "".join(m["content"] for m in messages if m["role"] != "system")
    bos = tokenizer.bos_token
    return tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos))


def wants_chat(tokenizer, chat: bool | None) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat

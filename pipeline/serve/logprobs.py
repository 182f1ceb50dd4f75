"""Token log-probabilities as OpenAI reports them: each token's text and UTF-8 bytes, its
log-probability and the top alternatives (chat's `logprobs.content`, and completions' legacy
`tokens` / `token_logprobs` / `top_logprobs` / `text_offset`)."""

from __future__ import annotations

import functools
import re

FLOOR = -9999.0  # OpenAI's stand-in for a log-probability of -inf (JSON has no infinity)
_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece's byte fallback pieces


@functools.lru_cache(maxsize=1)
def _byte_level() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character each byte is written as -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


class TokenText:
    """A token id -> (text, UTF-8 bytes) of that one token. A token may hold part of a
    character: its bytes are exact, its text shows the part as U+FFFD."""

    def __init__(self, tokenizer):
        from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

        detok = tokenizer.detokenizer
        self.tokenizer = tokenizer
        self.kind = ("bpe" if isinstance(detok, BPEStreamingDetokenizer) else
                     "spm" if isinstance(detok, SPMStreamingDetokenizer) else "text")
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def _bytes(self, token: int) -> bytes:
        if self.kind == "text":
            return self.tokenizer.decode([token]).encode()
        piece = self.tokenizer.convert_ids_to_tokens(token) or ""
        if self.kind == "spm":
            m = _BYTE.match(piece)
            return bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode()
        table = _byte_level()
        return b"".join(bytes([table[c]]) if c in table else c.encode() for c in piece)

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self._cache:
            raw = self._bytes(token)
            self._cache[token] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self._cache[token]

    def entry(self, token: int, logprob: float, top: list[tuple[int, float]]) -> dict:
        """One token of chat's `logprobs.content`."""
        text, raw = self(token)
        return {"token": text, "logprob": max(logprob, FLOOR), "bytes": raw,
                "top_logprobs": [{"token": self(t)[0], "logprob": max(lp, FLOOR),
                                  "bytes": self(t)[1]} for t, lp in top]}


def chat_logprobs(entries: list[dict]) -> dict:
    return {"content": entries, "refusal": None}


def completion_logprobs(entries: list[dict], offset: int) -> dict:
    """The legacy form; `offset`: where the first token's text starts in the completion."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [_by_text(e["top_logprobs"]) for e in entries],
            "text_offset": offsets}


def _by_text(top: list[dict]) -> dict:
    """{token text: logprob}; tokens with the same text (parts of characters) keep the largest."""
    out: dict = {}
    for t in top:
        out.setdefault(t["token"], t["logprob"])
    return out

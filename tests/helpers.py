"""Helpers shared by the tests (fixtures stay in conftest.py)."""

from __future__ import annotations


class NullTokenizer:
    """Just enough tokenizer for a Driver fed token ids: no EOS, a detokenizer that keeps
    nothing."""

    eos_token_ids: list[int] = []

    class detokenizer:
        last_segment = ""

        @staticmethod
        def reset():
            pass

        @staticmethod
        def add_token(t):
            pass

        @staticmethod
        def finalize():
            pass

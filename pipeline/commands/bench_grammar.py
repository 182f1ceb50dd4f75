"""`python -m pipeline bench --grammar`: what constrained decoding costs per token.

One chat prompt, greedy, --gen-tokens tokens (EOS ignored), through the engine at one
sequence: free, and under a grammar (llguidance, serve/grammar.py) that keeps the answer
going for every one of those tokens, a JSON array of at least that many integers. The runs
alternate free, constrained, free, ... (--repeats pairs, after --warmup) and the medians are
printed: decode tok/s (after the first token) of each, their ratio, and the grammar's own
time per token (the mask it computes before each step and the token it is told after), also
as a share of the constrained step. A constrained row is sampled from its full logits, so the
difference from free decoding also holds the head's work that greedy rows skip.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from pipeline.commands.bench import machine_info
from pipeline.exec.driver import Driver
from pipeline.exec.engine import Engine, Sequence
from pipeline.exec.sampling import SamplingParams
from pipeline.model.prompt import encode, wants_chat

PROMPT = "Write a long list of numbers as a JSON array."


class Timed:
    """A constraint whose calls are timed (seconds in `spent`)."""

    def __init__(self, inner):
        self.inner, self.spent = inner, 0.0

    def apply(self, logprobs):
        start = time.perf_counter()
        out = self.inner.apply(logprobs)
        self.spent += time.perf_counter() - start
        return out

    def accept(self, token: int) -> None:
        start = time.perf_counter()
        self.inner.accept(token)
        self.spent += time.perf_counter() - start


def _one(driver: Driver, ids: list[int], gen_tokens: int, constraint) -> tuple[float, Sequence]:
    seq = Sequence(id=0, prompt=ids, constraint=constraint, sampling=SamplingParams(
        temp=0.0, max_tokens=gen_tokens, ignore_eos=True))
    Engine(driver, 1).run([seq], lambda s: None)
    decode = seq.token_times[-1] - seq.token_times[0]
    return (len(seq.tokens) - 1) / decode if decode > 0 else 0.0, seq


def run_grammar_bench(driver: Driver, gen_tokens: int, repeats: int, warmup: int,
                      json_out: Path | None, label: str | None = None) -> dict:
    from pipeline.serve import grammar
    from pipeline.serve.families import Family

    tok = driver.tokenizer
    ids = encode(tok, [{"role": "user", "content": PROMPT}], wants_chat(tok, None))
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": gen_tokens}
    lark = grammar.json_grammar(Family("none"), False, schema, tok)
    figures: dict[str, list[float]] = {"free": [], "constrained": [], "grammar_ms": []}
    for r in range(warmup + repeats):
        free, _ = _one(driver, ids, gen_tokens, None)
        timed = Timed(grammar.Constraint(lark, tok, "response_format"))
        constrained, seq = _one(driver, ids, gen_tokens, timed)
        if r >= warmup:
            figures["free"].append(free)
            figures["constrained"].append(constrained)
            figures["grammar_ms"].append(1e3 * timed.spent / len(seq.tokens))
        print(f"bench: grammar pass {r + 1}/{warmup + repeats}: free {free:.1f} tok/s, "
              f"constrained {constrained:.1f} tok/s", file=sys.stderr, flush=True)
    text = tok.decode(seq.tokens)
    free, constrained = (statistics.median(figures[k]) for k in ("free", "constrained"))
    grammar_ms = statistics.median(figures["grammar_ms"])
    results = {"label": label, "machine": machine_info(driver), "gen_tokens": gen_tokens,
               "repeats": repeats, "vocab": len(tok.get_vocab()), "free_tps": free,
               "constrained_tps": constrained, "ratio": constrained / free if free else 0.0,
               "grammar_ms_per_token": grammar_ms,
               "grammar_share": grammar_ms / 1e3 * constrained, "sample": text[:200]}
    m = results["machine"]
    print(f"## bench --grammar: {gen_tokens} tokens, one sequence, {m['ranks']} rank(s), "
          f"vocabulary {results['vocab']}, medians of {repeats}\n\n"
          f"free decoding {free:.1f} tok/s, under a JSON-array grammar {constrained:.1f} tok/s "
          f"({results['ratio']:.2f}x); the grammar's own time {grammar_ms:.2f} ms a token "
          f"({100 * results['grammar_share']:.1f}% of a constrained step)\n"
          f"constrained text starts: {json.dumps(text[:80])}")
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))
    return results

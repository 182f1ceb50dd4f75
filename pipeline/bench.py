"""`python -m pipeline bench`: throughput of this job, at several concurrencies and prompt sizes.

Random prompts from a fixed seed; EOS ignored so every run generates the same count.
Per configuration, medians over repeats with min-max:
- TTFT: from a sequence's admission to its first token (its prefill, plus waiting for a slot);
- decode tok/s aggregate: tokens generated while every sequence of the run was decoding,
  over that window (C sequences x steps / time); per sequence: aggregate / C;
- prefill of one long prompt at several chunk sizes (pipelined across the stages), best kept.
"""

from __future__ import annotations

import json
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from . import blas
from .engine import Engine, Sequence
from .generate import Driver, Sampling


@dataclass
class Figure:
    values: list[float] = field(default_factory=list)

    def add(self, v: float) -> None:
        self.values.append(v)

    def summary(self) -> dict:
        return {"median": statistics.median(self.values), "min": min(self.values),
                "max": max(self.values)}


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


def run_decode(driver: Driver, concurrency: int, prompt_tokens: int, gen_tokens: int,
               vocab: int, seed: int) -> dict:
    """One run of `concurrency` sequences at once; returns its figures."""
    prompts = random_prompts(concurrency, prompt_tokens, vocab, seed)
    seqs = [Sequence(id=i, prompt=p, max_tokens=gen_tokens, ignore_eos=True)
            for i, p in enumerate(prompts)]
    done: list[Sequence] = []
    engine = Engine(driver, concurrency)
    start = time.perf_counter()
    engine.run(seqs, done.append)
    end = time.perf_counter()
    all_decoding = max(s.first_token for s in done)  # from here every sequence decodes
    last = max(s.finished for s in done)
    steps = sum(sum(1 for _ in range(len(s.tokens))) for s in done)  # tokens in total
    window_tokens = sum(len(s.tokens) - 1 - _steps_before(s, all_decoding) for s in done)
    return {
        "ttft_s": statistics.median(s.first_token - s.started for s in done),
        "decode_tps": window_tokens / (last - all_decoding) if last > all_decoding else 0.0,
        "total_tps": steps / (end - start),
        "wall_s": end - start,
    }


def _steps_before(seq: Sequence, t: float) -> int:
    # tokens are evenly spaced between first and last: estimate how many came before t
    if seq.finished <= seq.first_token or len(seq.tokens) < 2:
        return 0
    frac = (t - seq.first_token) / (seq.finished - seq.first_token)
    return min(len(seq.tokens) - 1, max(0, round(frac * (len(seq.tokens) - 1))))


def run_prefill(driver: Driver, length: int, chunk: int, vocab: int, seed: int) -> float:
    """Time to first token of one `length`-token prompt with `chunk`-token prefill chunks."""
    prompt = random_prompts(1, length, vocab, seed)[0]
    driver.prefill_chunk = chunk
    driver.reset()
    start = time.perf_counter()
    for _ in driver.generate(prompt, Sampling(max_tokens=1, ignore_eos=True)):
        pass
    return time.perf_counter() - start


def machine_info(driver: Driver) -> dict:
    ranks = driver.rank_stats()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    device, blas_name, _ = blas.describe()
    import mlx_lm

    return {"ranks": len(ranks), "hosts": sorted({r["host"] for r in ranks}),
            "layers": [r["layer_range"] for r in ranks], "device": device, "blas": blas_name,
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "git_commit": commit}


def run_bench(driver: Driver, prompt_tokens: list[int], gen_tokens: int, concurrency: list[int],
              repeats: int, warmup: int, prefill_tokens: int | None, prefill_chunks: list[int],
              json_out: Path | None) -> dict:
    vocab = driver.stage.embed_tokens.weight.shape[0]
    if hasattr(driver.stage.embed_tokens, "scales"):  # quantized: packed weight columns
        vocab = driver.stage.embed_tokens.scales.shape[0]
    results = {"machine": machine_info(driver), "gen_tokens": gen_tokens, "decode": [],
               "prefill": []}
    for p in prompt_tokens:
        for c in concurrency:
            figs = {k: Figure() for k in ("ttft_s", "decode_tps", "total_tps")}
            for r in range(warmup + repeats):
                run = run_decode(driver, c, p, gen_tokens, vocab, seed=r)
                if r >= warmup:
                    for k in figs:
                        figs[k].add(run[k])
                print(f"bench: prompt {p} concurrency {c} run {r + 1}/{warmup + repeats}: "
                      f"decode {run['decode_tps']:.1f} tok/s", file=sys.stderr, flush=True)
            row = {"prompt_tokens": p, "concurrency": c,
                   **{k: f.summary() for k, f in figs.items()}}
            row["decode_tps_per_seq"] = row["decode_tps"]["median"] / c
            results["decode"].append(row)
    if prefill_tokens:
        for chunk in prefill_chunks:
            fig = Figure()
            for r in range(warmup + repeats):
                t = run_prefill(driver, prefill_tokens, chunk, vocab, seed=100 + r)
                if r >= warmup:
                    fig.add(t)
            results["prefill"].append({"prompt_tokens": prefill_tokens, "chunk": chunk,
                                       "time_s": fig.summary()})
            print(f"bench: prefill {prefill_tokens} tokens, chunk {chunk}: "
                  f"{fig.summary()['median']:.3f} s", file=sys.stderr, flush=True)
    results["ranks"] = driver.rank_stats()
    print(markdown(results))
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))
    return results


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"ranks {m['ranks']} ({', '.join(m['hosts'])}), device {m['device']}, BLAS {m['blas']}",
             "", "| prompt | concurrency | TTFT s (min-max) | decode tok/s aggregate (min-max) "
             "| per sequence |", "|---|---|---|---|---|"]
    for r in results["decode"]:
        t, d = r["ttft_s"], r["decode_tps"]
        lines.append(f"| {r['prompt_tokens']} | {r['concurrency']} | {t['median']:.3f} "
                     f"({t['min']:.3f}-{t['max']:.3f}) | {d['median']:.1f} ({d['min']:.1f}-"
                     f"{d['max']:.1f}) | {r['decode_tps_per_seq']:.2f} |")
    if results["prefill"]:
        lines += ["", "| prefill tokens | chunk | time s (min-max) | tok/s |", "|---|---|---|---|"]
        for r in results["prefill"]:
            t = r["time_s"]
            lines.append(f"| {r['prompt_tokens']} | {r['chunk']} | {t['median']:.3f} "
                         f"({t['min']:.3f}-{t['max']:.3f}) | {r['prompt_tokens'] / t['median']:.0f} |")
    lines += ["", "| rank | host | layers | weights MiB | peak memory MiB | bytes sent |",
              "|---|---|---|---|---|---|"]
    for r in results["ranks"]:
        lines.append(f"| {r['rank']} | {r['host']} | {r['layer_range'][0]}-{r['layer_range'][1] - 1} "
                     f"| {r['weight_bytes'] / 2**20:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} "
                     f"| {r['bytes_sent']} |")
    return "\n".join(lines)

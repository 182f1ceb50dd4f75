"""`python -m pipeline bench`: throughput of this job, at several concurrencies and prompt sizes.

Random prompts from a fixed seed; EOS ignored so every run generates the same count.
Per configuration, medians over repeats with min-max:
- TTFT: from a sequence's admission to its first token (its prefill, plus waiting for a slot);
- decode tok/s aggregate: tokens generated while every sequence of the run was decoding,
  over that window (C sequences x steps / time); per sequence: aggregate / C;
- prefill of one long prompt at several chunk sizes (pipelined across the stages), best kept.
Per hop of the ring (rank r -> r+1, the last rank -> 0): the activation bytes the benchmark sent
over it, and the hop's achieved bandwidth, measured by a ping-pong of PROBE_BYTES messages over
that hop alone when the job starts, before the model loads (see probe_links); link_s = bytes
at that rate, the time the benchmark's bytes kept the link busy.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from pipeline.host import blas
from pipeline.place.cluster import measure_hops
from pipeline.exec.engine import Engine, Sequence
from pipeline.exec.driver import Driver
from pipeline.exec.sampling import SamplingParams


@dataclass
class Figure:
    values: list[float] = field(default_factory=list)

    def add(self, v: float) -> None:
        self.values.append(v)

    def summary(self) -> dict:
        return {"median": statistics.median(self.values), "min": min(self.values),
                "max": max(self.values)}


PROBE_BYTES = 4 * 2**20  # bulk: ~ one 1024-token prefill chunk at hidden 1024, float32
LATENCY_BYTES = 4 * 2**10  # ~ one decode token's hidden state (1024 x float32)


def probe_links(comm, reps: int = 10) -> list[dict] | None:
    """Collective, at job start: each ring link's bandwidth (ping-pong of PROBE_BYTES, one link
    at a time, the other ranks wait) and one-way latency (LATENCY_BYTES). Rank 0 gets one
    entry per link {"from", "to", "probe_bytes", "gbps", "latency_us"}; the others None."""
    if comm.Get_size() < 2:
        return [] if comm.Get_rank() == 0 else None
    bulk = measure_hops(comm, PROBE_BYTES, reps=reps, warmup=2)
    small = measure_hops(comm, LATENCY_BYTES, reps=20, warmup=3)
    if bulk is None:
        return None
    return [{"from": b.src, "to": b.dst, "probe_bytes": b.nbytes,
             "gbps": b.nbytes * 8 / b.one_way_s / 1e9, "latency_us": s.one_way_s * 1e6}
            for b, s in zip(bulk, small)]


def hop_figures(ranks: list[dict], links: list[dict]) -> list[dict]:
    """Per ring hop r -> r+1 (and the last -> 0): the bytes the benchmark sent over it and its
    probed link (with 2 ranks both directions share the one link probed)."""
    size = len(ranks)
    if size < 2 or not links:
        return []
    by_pair = {}
    for link in links:
        by_pair[(link["from"], link["to"])] = by_pair[(link["to"], link["from"])] = link
    hops = []
    for r in ranks:
        src, dst = r["rank"], (r["rank"] + 1) % size
        link = by_pair.get((src, dst))
        if link is None:
            continue
        gbps = link["gbps"]
        hops.append({"from": src, "to": dst, "bytes": r["bytes_sent"],
                     "link_s": r["bytes_sent"] * 8 / (gbps * 1e9) if gbps > 0 else 0.0,
                     "gbps": gbps, "latency_us": link["latency_us"],
                     "probe_bytes": link["probe_bytes"]})
    return hops


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(count)]


def run_decode(driver: Driver, concurrency: int, prompt_tokens: int, gen_tokens: int,
               vocab: int, seed: int) -> dict:
    """One run of `concurrency` sequences at once; returns its figures."""
    prompts = random_prompts(concurrency, prompt_tokens, vocab, seed)
    seqs = [Sequence(id=i, prompt=p,
                     sampling=SamplingParams(max_tokens=gen_tokens, ignore_eos=True))
            for i, p in enumerate(prompts)]
    done: list[Sequence] = []
    engine = Engine(driver, concurrency)
    start = time.perf_counter()
    engine.run(seqs, done.append)
    end = time.perf_counter()
    steps = sum(len(s.tokens) for s in done)  # tokens in total
    # The window in which every sequence is decoding: from the last first token to the first
    # finish (micro-batches finish a step apart; after that the pipe is no longer full).
    all_decoding = max(s.first_token for s in done)
    until = min(s.finished for s in done)
    window_tokens = sum(1 for s in done for t in s.token_times if all_decoding < t <= until)
    return {
        "ttft_s": statistics.median(s.first_token - s.started for s in done),
        "decode_tps": window_tokens / (until - all_decoding) if until > all_decoding else 0.0,
        "total_tps": steps / (end - start),
        "wall_s": end - start,
        "head_cut": engine.split.cut if engine.split is not None else None,
    }


def run_prefill(driver: Driver, length: int, chunk: int, vocab: int, seed: int) -> float:
    """Time to first token of one `length`-token prompt with `chunk`-token prefill chunks."""
    prompt = random_prompts(1, length, vocab, seed)[0]
    driver.prefill_chunk = chunk
    driver.reset()
    start = time.perf_counter()
    for _ in driver.generate(prompt, SamplingParams(max_tokens=1, ignore_eos=True)):
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

    # What one token puts on the wire: [1, 1, D]. Lazy, never evaluated (on a tensor-parallel
    # stage 0 the embedding is a collective the other ranks would not join).
    h = driver.stage.embed(mx.array([[1]]))
    return {"ranks": len(ranks), "hosts": sorted({r["host"] for r in ranks}),
            "hidden_size": h.shape[-1], "activation_dtype": str(h.dtype).split(".")[-1],
            "bytes_per_token": h.shape[-1] * h.dtype.size,
            "layers": [r["layer_range"] for r in ranks], "device": device, "blas": blas_name,
            "groups": driver.groups, "cpu": cpu_name(), "python": platform.python_version(),
            "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "git_commit": commit,
            "load_avg": _load_avg()}


def cpu_name() -> str:
    """The processor's model name (Linux /proc/cpuinfo, macOS sysctl), else the architecture."""
    try:
        if sys.platform == "darwin":
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True).stdout.strip() or platform.machine()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_avg() -> list[float] | None:
    """Rank 0's host's 1/5/15-minute load averages: other work on the box skews the figures."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def run_bench(driver: Driver, prompt_tokens: list[int], gen_tokens: int, concurrency: list[int],
              repeats: int, warmup: int, prefill_tokens: int | None, prefill_chunks: list[int],
              json_out: Path | None, plot_out: Path | None = None, label: str | None = None,
              links: list[dict] | None = None) -> dict:
    vocab = driver.stage.embed_tokens.weight.shape[0]
    if hasattr(driver.stage.embed_tokens, "scales"):  # quantized: packed weight columns
        vocab = driver.stage.embed_tokens.scales.shape[0]
    results = {"label": label, "machine": machine_info(driver), "gen_tokens": gen_tokens,
               "repeats": repeats, "warmup": warmup, "decode": [], "prefill": []}
    for p in prompt_tokens:
        for c in concurrency:
            figs = {k: Figure() for k in ("ttft_s", "decode_tps", "total_tps")}
            for r in range(warmup + repeats):
                run = run_decode(driver, c, p, gen_tokens, vocab, seed=r)
                if r >= warmup:
                    for k in figs:
                        figs[k].add(run[k])
                shared = (f" (last rank computed {run['head_cut']} of {vocab} logits)"
                          if run["head_cut"] is not None else "")
                print(f"bench: prompt {p} concurrency {c} run {r + 1}/{warmup + repeats}: "
                      f"decode {run['decode_tps']:.1f} tok/s{shared}", file=sys.stderr, flush=True)
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
    results["machine"]["load_avg_end"] = _load_avg()
    results["hops"] = hop_figures(results["ranks"], links or [])
    print(markdown(results))
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))
    if plot_out:
        from pipeline.commands.bench_plot import plot

        plot([results], plot_out)
        print(f"bench: plot written to {plot_out}", file=sys.stderr, flush=True)
    return results


def markdown(results: dict) -> str:
    m = results["machine"]
    load = m.get("load_avg_end") or m.get("load_avg")
    lines = [f"ranks {m['ranks']} ({', '.join(m['hosts'])}), device {m['device']}, BLAS {m['blas']}"
             + (f", load average {load[0]} (1 min, at the end)" if load else ""),
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
    lines += ["", "| rank | host | layers | weights MiB | peak memory MiB | compute s | waiting s "
              "| bytes sent |", "|---|---|---|---|---|---|---|---|"]
    for r in results["ranks"]:
        lines.append(f"| {r['rank']} | {r['host']} | {r['layer_range'][0]}-{r['layer_range'][1] - 1} "
                     f"| {r['weight_bytes'] / 2**20:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} "
                     f"| {r['compute_s']:.2f} | {r['wait_s']:.2f} | {r['bytes_sent']} |")
    if results.get("hops"):
        probe = results["hops"][0]["probe_bytes"] / 2**20
        lines += ["", f"| hop | bytes sent | link Gbit/s (ping-pong, {probe:g} MiB) | one-way latency "
                  "us (4 KiB) | link busy s (bytes at that rate) |", "|---|---|---|---|---|"]
        for h in results["hops"]:
            lines.append(f"| {h['from']} -> {h['to']} | {h['bytes']} | {h['gbps']:.2f} "
                         f"| {h['latency_us']:.0f} | {h['link_s']:.3f} |")
    return "\n".join(lines)


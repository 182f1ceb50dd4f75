"""`bench --plot`: tok/s against concurrency for one run, or against ranks/link for several.

matplotlib is imported only when a plot is asked for (the `bench` and `test` extras install it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def run_label(results: dict) -> str:
    """How a run is named in plots: its --label, else its rank count."""
    n = results["machine"]["ranks"]
    return results.get("label") or f"{n} rank{'s' if n != 1 else ''}"


def best_prefill_tps(results: dict) -> float | None:
    rows = results.get("prefill") or []
    if not rows:
        return None
    return max(r["prompt_tokens"] / r["time_s"]["median"] for r in rows)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'matplotlib>=3.7' (make install "
                           "does, with the test extra)") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _errorbar(ax, xs, figs, **kw) -> None:
    med = [f["median"] for f in figs]
    ax.errorbar(xs, med, yerr=[[m - f["min"] for m, f in zip(med, figs)],
                               [f["max"] - m for m, f in zip(med, figs)]],
                marker="o", capsize=3, **kw)


def plot(runs: list[dict], out: Path) -> None:
    """One run: tok/s against concurrency (a line per prompt length) and prefill tok/s against
    chunk size. Several runs (bench-compare, bench-links): tok/s and TTFT against the run's
    label (ranks or link), a line per concurrency. Error bars: min-max over the repeats."""
    plt = _pyplot()
    if len(runs) == 1:
        fig = _plot_one(plt, runs[0])
    else:
        fig = _plot_many(plt, runs)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _log2_ticks(ax, values: list[int]) -> None:
    """A log2 x axis labelled with the measured values as plain numbers."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(values, [str(v) for v in values])
    ax.minorticks_off()


def _machine(m: dict) -> str:
    blas_name = str(m.get("blas", "?")).split(" (")[0]  # without the library's path
    return f"{m.get('device', '?')}, BLAS {blas_name}, {m.get('cpu', '?')}"


def _title(r: dict) -> str:
    m = r["machine"]
    return (f"{run_label(r)}: {_machine(m)}, "
            f"{r['gen_tokens']} tokens generated, medians of {r.get('repeats', '?')} (bars: min-max)")


def _plot_one(plt, r: dict):
    panels = 3 if r["prefill"] else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    for p in sorted({d["prompt_tokens"] for d in r["decode"]}):
        rows = sorted((d for d in r["decode"] if d["prompt_tokens"] == p),
                      key=lambda d: d["concurrency"])
        cs = [d["concurrency"] for d in rows]
        _errorbar(axes[0], cs, [d["decode_tps"] for d in rows], label=f"prompt {p}")
        per_seq = [{k: v / d["concurrency"] for k, v in d["decode_tps"].items()} for d in rows]
        _errorbar(axes[1], cs, per_seq, label=f"prompt {p}")
    for ax, what in zip(axes, ("decode tok/s, aggregate", "decode tok/s per sequence")):
        ax.set(xlabel="concurrency (sequences at once)", ylabel=what, title=what)
        _log2_ticks(ax, sorted({d["concurrency"] for d in r["decode"]}))
        ax.set_ylim(bottom=0)
        ax.legend()
    if r["prefill"]:
        rows = sorted(r["prefill"], key=lambda x: x["chunk"])
        n = rows[0]["prompt_tokens"]
        tps = [{"median": n / x["time_s"]["median"], "min": n / x["time_s"]["max"],
                "max": n / x["time_s"]["min"]} for x in rows]
        _errorbar(axes[2], [x["chunk"] for x in rows], tps, color="tab:green")
        axes[2].set(xlabel="prefill chunk (tokens)", ylabel="prefill tok/s",
                    title=f"prefill of one {n}-token prompt")
        _log2_ticks(axes[2], [x["chunk"] for x in rows])
        axes[2].set_ylim(bottom=0)
    fig.suptitle(_title(r), fontsize=9)
    return fig


def _plot_many(plt, runs: list[dict]):
    labels = [run_label(r) for r in runs]
    xs = list(range(len(runs)))
    have_prefill = any(best_prefill_tps(r) for r in runs)
    have_links = any(r.get("hops") for r in runs)
    panels = 2 + have_prefill + have_links
    if panels == 4:
        fig, axes = plt.subplots(2, 2, figsize=(11, 8.4))
        axes = list(axes.flat)
    else:
        fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    keys = sorted({(d["prompt_tokens"], d["concurrency"]) for r in runs for d in r["decode"]})
    for p, c in keys:
        for ax, field in ((axes[0], "decode_tps"), (axes[1], "ttft_s")):
            pts = [(x, d[field]) for x, r in zip(xs, runs) for d in r["decode"]
                   if (d["prompt_tokens"], d["concurrency"]) == (p, c)]
            if pts:
                _errorbar(ax, [x for x, _ in pts], [f for _, f in pts],
                          label=f"concurrency {c}" + (f", prompt {p}" if len(
                              {k[0] for k in keys}) > 1 else ""))
    axes[0].set(ylabel="decode tok/s, aggregate", title="decode tok/s, aggregate")
    axes[1].set(ylabel="TTFT s", title="time to first token")
    if have_prefill:
        pts = [(x, best_prefill_tps(r)) for x, r in zip(xs, runs) if best_prefill_tps(r)]
        axes[2].plot([x for x, _ in pts], [t for _, t in pts], marker="o", color="tab:green")
        n = next(r["prefill"][0]["prompt_tokens"] for r in runs if r["prefill"])
        axes[2].set(ylabel="prefill tok/s (best chunk)", title=f"prefill of one {n}-token prompt")
    if have_links:
        hops = sorted({(h["from"], h["to"]) for r in runs for h in r.get("hops", [])})
        if hops == [(0, 1), (1, 0)]:  # two ranks: one link, probed once
            hops = [(0, 1)]
        for hop in hops:
            pts = [(x, h["gbps"]) for x, r in zip(xs, runs) for h in r.get("hops", [])
                   if (h["from"], h["to"]) == hop]
            name = "link 0 <-> 1" if hops == [(0, 1)] else f"hop {hop[0]} -> {hop[1]}"
            axes[-1].plot([x for x, _ in pts], [g for _, g in pts], marker="o", label=name)
            for x, g in pts:
                axes[-1].annotate(f"{g:.2f}", (x, g), textcoords="offset points", xytext=(0, 6),
                                  ha="center", fontsize=8)
        axes[-1].set(ylabel="Gbit/s (ping-pong at job start)", title="achieved link bandwidth")
    for ax in axes:
        ax.set_xticks(xs, labels)
        ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # room for the legend above the lines
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    m = runs[0]["machine"]
    fig.suptitle(f"{', '.join(labels)}: {_machine(m)}, medians (bars: min-max)", fontsize=9)
    return fig


def plot_files(paths: list[Path], out: Path) -> None:
    """`bench --from-json A.json,B.json --plot OUT.png`: plot runs saved with --json."""
    if not paths:
        raise ValueError("--from-json needs at least one JSON file from `bench --json`")
    runs = []
    for path in paths:
        try:
            run = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {path}: {e}") from None
        if not isinstance(run, dict) or not {"machine", "decode", "prefill"} <= run.keys():
            raise ValueError(f"{path} is not the JSON of `bench --json`")
        runs.append(run)
    try:
        plot(runs, out)
    except RuntimeError as e:
        raise ValueError(str(e)) from None
    print(f"bench: plot written to {out}", file=sys.stderr, flush=True)

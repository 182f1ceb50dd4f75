"""Batch prompt files: read PROMPTS, run them through the Engine, append results to OUT.

PROMPTS is .txt (one prompt per line) or .jsonl ({"id", "prompt" | "messages", "max_tokens",
"temperature", "top_p", "seed"}). Each finished result is appended to OUT as one JSON line,
flushed and fsynced, as soon as it is done; rerunning with the same OUT skips the ids it
already holds, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.exec.engine import Engine, Sequence
from pipeline.exec.driver import Driver, check_prompt
from pipeline.exec.sampling import SamplingParams
from pipeline.exec.job import INTERRUPTS
from pipeline.model.prompt import encode, wants_chat


class BatchFileError(ValueError):
    pass


@dataclass
class Defaults:
    sampling: SamplingParams
    system: str | None
    chat: bool | None


def check_output(out: Path) -> None:
    """Fail before any work if OUT cannot be written."""
    try:
        with open(out, "a"):
            pass
    except OSError as e:
        raise BatchFileError(f"cannot write output file {out}: {e.strerror}") from None


def read_prompts(path: Path) -> tuple[list[dict], list[str]]:
    """Prompt records (with `id` and `line`) and one message per malformed line."""
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise BatchFileError(f"cannot read prompts file {path}: {e.strerror}") from None
    records, problems = [], []
    is_jsonl = path.suffix.lower() == ".jsonl"
    for n, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            problems.append(f"{path}:{n}: not valid UTF-8, skipped")
            continue
        if not text.strip():
            continue
        if not is_jsonl:
            records.append({"id": n, "prompt": text, "line": n})
            continue
        try:
            rec = json.loads(text)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
            if not isinstance(rec.get("prompt"), str) and not isinstance(rec.get("messages"), list):
                raise ValueError('needs "prompt" (text) or "messages" (a list)')
        except ValueError as e:
            problems.append(f"{path}:{n}: {e}, skipped")
            continue
        rec.setdefault("id", n)
        rec["line"] = n
        records.append(rec)
    return records, problems


def done_ids(out: Path) -> set:
    """Ids already in OUT; a partial last line (a crash mid-write) is cut off first."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(out, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[: data.rfind(b"\n") + 1]
    ids = set()
    for line in data.splitlines():
        try:
            ids.add(json.dumps(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError):
            continue
    return ids


def sequences_at_once(prompts: Path, out: Path, concurrency: int) -> int:
    """How many sequences the run will decode at once: min(concurrency, prompts not yet in
    OUT), what the planner plans for. Reads only; an unreadable file counts as concurrency
    (the run itself then says what is wrong)."""
    try:
        records, _ = read_prompts(prompts)
        done = set()
        if out.exists():
            for line in out.read_bytes().splitlines():
                try:
                    done.add(json.dumps(json.loads(line)["id"]))
                except (ValueError, KeyError, TypeError):
                    continue
    except (BatchFileError, OSError):
        return concurrency
    todo = sum(json.dumps(r["id"]) not in done for r in records)
    return max(1, min(concurrency, todo))


def _sequence(rec: dict, tokenizer, d: Defaults, context: int | None) -> Sequence:
    chat = wants_chat(tokenizer, d.chat)
    if "messages" in rec:
        messages = rec["messages"]
        chat = True
    else:
        messages = ([{"role": "system", "content": d.system}] if d.system and chat else [])
        messages.append({"role": "user", "content": rec["prompt"]})
    s = SamplingParams(
        temp=float(rec.get("temperature", d.sampling.temp)),
        top_p=float(rec.get("top_p", d.sampling.top_p)),
        min_p=d.sampling.min_p,
        seed=_seed(rec, d.sampling.seed),
        max_tokens=int(rec.get("max_tokens", d.sampling.max_tokens)),
        ignore_eos=d.sampling.ignore_eos,
    )
    s.check()
    prompt = encode(tokenizer, messages, chat)
    check_prompt(prompt, context)
    shown = rec.get("prompt", messages[-1].get("content") if messages else "")
    return Sequence(id=rec["id"], prompt=prompt, sampling=s, extra={"prompt": shown})


def _seed(rec: dict, seed: int | None) -> int | None:
    """A line's own "seed", else --seed + (its line number - 1): each line its own stream,
    the first line's the same as a one-shot run with --seed."""
    if "seed" in rec:
        return rec["seed"]
    return None if seed is None else seed + rec["line"] - 1


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


EXIT_SKIPPED = 2  # like any other bad input (README: exit codes)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def run_batch(driver: Driver, prompts: Path, out: Path, defaults: Defaults, concurrency: int,
              progress: bool = True, prompt_cache_bytes: int = 0) -> int:
    """Run every prompt not yet in OUT. Returns the exit code: 0 when every line is done,
    EXIT_INTERRUPTED after Ctrl-C or SIGTERM (the rest is left for a rerun), EXIT_SKIPPED when
    malformed lines were skipped (the others are done)."""
    records, problems = read_prompts(prompts)
    for p in problems:
        print(f"pipeline: warning: {p}", file=sys.stderr)
    finished = done_ids(out)
    tokenizer = driver.tokenizer
    todo = []
    for rec in records:
        if json.dumps(rec["id"]) in finished:
            continue
        try:
            todo.append(_sequence(rec, tokenizer, defaults, driver.context))
        except (ValueError, TypeError) as e:
            problems.append(f"{prompts}:{rec['line']}: {e}")
            print(f"pipeline: warning: {prompts}:{rec['line']}: {e}, skipped", file=sys.stderr)
    skipped = len(records) - len(todo)
    if skipped and len(finished):
        print(f"pipeline: resuming: {len(finished)} results already in {out}", file=sys.stderr)

    engine = Engine(driver, concurrency, prompt_cache_bytes=prompt_cache_bytes)
    start, generated, ttfts, done = time.perf_counter(), 0, [], 0
    f = open(out, "a", encoding="utf-8")

    def on_done(seq: Sequence) -> None:
        nonlocal generated, done
        tokens = seq.tokens[:-1] if seq.finish_reason == "stop" else seq.tokens  # no EOS text
        decode_s = seq.finished - seq.first_token
        result = {
            "id": seq.id, "prompt": seq.extra["prompt"],
            "completion": tokenizer.decode(tokens), "finish_reason": seq.finish_reason,
            "prompt_tokens": len(seq.prompt), "cached_tokens": seq.cached_tokens,
            "completion_tokens": len(seq.tokens),
            "completion_ids": seq.tokens,  # every generated id, a final EOS included
            "ttft_s": round(seq.first_token - seq.started, 4),
            "tokens_per_s": round((len(seq.tokens) - 1) / decode_s, 2) if decode_s > 0 else 0.0,
        }
        if seq.finish_reason == "interrupted":
            return  # not written: the rerun does it again from the start
        f.write(json.dumps(result, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
        generated += len(seq.tokens)
        ttfts.append(result["ttft_s"])
        done += 1
        if progress:
            rate = generated / (time.perf_counter() - start)
            print(f"\r[{done}/{len(todo)}] {rate:.1f} tok/s", end="", file=sys.stderr, flush=True)

    def stop(*_):
        engine.interrupted = True  # the lines in progress finish writing, then we exit

    previous = {s: signal.signal(s, stop) for s in INTERRUPTS}
    try:
        engine.run(todo, on_done)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        f.close()
    elapsed = time.perf_counter() - start
    if progress and done:
        print(file=sys.stderr)
    print(f"pipeline: {done} done, {len(problems)} skipped, {generated} tokens in {elapsed:.1f} s "
          f"({generated / elapsed if elapsed else 0:.1f} tok/s), TTFT p50 "
          f"{_percentile(ttfts, 0.5):.3f} s p95 {_percentile(ttfts, 0.95):.3f} s", file=sys.stderr)
    if engine.interrupted:
        print("pipeline: interrupted: rerun the same command to finish the rest", file=sys.stderr)
        return EXIT_INTERRUPTED
    if problems:
        print(f"pipeline: error: {len(problems)} malformed line{'s' * (len(problems) > 1)} of "
              f"{prompts} skipped (warnings above): fix them and rerun the same command to run "
              f"just those", file=sys.stderr)
        return EXIT_SKIPPED
    return 0

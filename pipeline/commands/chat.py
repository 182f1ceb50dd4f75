"""Rank 0's front ends: one-shot generation and the interactive chat REPL. Only rank 0 prints."""

from __future__ import annotations

import json
import os
import select
import signal
import sys
from dataclasses import asdict

from pipeline.exec.draft import DraftOptions, load_draft_model
from pipeline.exec.driver import Driver, GenerationStats
from pipeline.exec.job import INTERRUPTS
from pipeline.exec.sampling import SamplingParams
from pipeline.model.prompt import encode, wants_chat

HELP = """commands:
  /reset   forget the conversation (and the cached keys/values on every rank)
  /stats   figures of the last answer, per rank
  /help    this text
  /quit    exit (Ctrl-D too); Ctrl-C stops the answer being written
End a line with \\ to continue the message on the next line; pasted lines stay together."""


def set_drafting(driver: Driver, prompt_lookup: bool, num_draft_tokens: int,
                 draft_model: str | None, opts, exact: bool = False) -> None:
    """Speculative decoding for one-shot and the REPL (exec/draft.py): proposals from
    --draft-model, else prompt lookup unless --no-prompt-lookup; exact: --draft-exact."""
    if draft_model is not None:
        model = load_draft_model(draft_model, driver.tokenizer, opts.dtype, opts.dequantize)
        driver.log(f"draft model {draft_model}: {len(model.stage.layers)} layers on rank 0")
        driver.drafting = DraftOptions(num_draft_tokens=num_draft_tokens, draft_model=model,
                                       exact=exact)
    elif prompt_lookup:
        driver.drafting = DraftOptions(num_draft_tokens=num_draft_tokens, exact=exact)


def format_stats(stats: GenerationStats, ranks: list[dict]) -> list[str]:
    lines = [
        f"prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.1f} tok/s"
        + (f" ({stats.cached_tokens} reused from cache)" if stats.cached_tokens else ""),
        f"generation: {stats.generation_tokens} tokens, {stats.generation_tps:.1f} tok/s"
        + (f" ({stats.accepted} of {stats.drafted} proposals accepted, "
           f"{stats.generation_tokens / stats.passes:.2f} tokens per pass)"
           if stats.drafted else ""),
        f"time to first token: {stats.ttft_s:.3f} s ({stats.finish_reason})",
    ]
    for r in ranks:
        start, end = r["layer_range"]
        lines.append(
            f"rank {r['rank']} ({r['host']}): layers {start}-{end - 1}, weights "
            f"{r['weight_bytes'] / 2**20:.1f} MiB, peak memory {r['peak_rss_bytes'] / 2**20:.0f} MiB"
        )
    return lines


def run_one_shot(driver: Driver, prompt: str, system: str | None, chat: bool | None,
                 sampling: SamplingParams, as_json: bool = False) -> None:
    """Print only the completion on stdout (newline at the end); figures on stderr."""
    chat = wants_chat(driver.tokenizer, chat)
    messages = ([{"role": "system", "content": system}] if system and chat else [])
    messages.append({"role": "user", "content": prompt})
    text, tokens = [], encode(driver.tokenizer, messages, chat)
    for _, segment in driver.generate(tokens, sampling):
        text.append(segment)
        if not as_json:
            sys.stdout.write(segment)
            sys.stdout.flush()
    ranks = driver.rank_stats()
    if as_json:
        print(json.dumps({"completion": "".join(text), "prompt_ids": tokens,
                          **asdict(driver.last_stats), "ranks": ranks}))
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
    for line in format_stats(driver.last_stats, ranks):
        print(line, file=sys.stderr)


# launch/mpirun's stand-in for end of input: OpenMPI 5's mpirun never passes the real one on.
EOT_LINE = "\x04"


READ_SLICE_S = 0.1


class InputReader:
    """Whole messages from a file descriptor, read as bytes so bad UTF-8 is caught, not fatal.

    A trailing backslash continues a message; on a terminal, lines that arrive together (a
    paste) form one message. A line holding only EOT (\\x04) ends the input like Ctrl-D.
    """

    def __init__(self, fd: int = 0):
        self.fd, self.buf, self.eof = fd, b"", False
        self.tty = os.isatty(fd)

    def _ready(self, timeout: float) -> bool:
        return bool(self.buf) or bool(select.select([self.fd], [], [], timeout)[0])

    def _line(self) -> bytes | None:
        while b"\n" not in self.buf and not self.eof:
            # Wait in short slices: a signal that another thread (MPI's, MLX's) takes does not
            # interrupt a blocking read, and Python runs its handler (Ctrl-C) only between
            # slices.
            while not select.select([self.fd], [], [], READ_SLICE_S)[0]:
                pass
            data = os.read(self.fd, 65536)
            self.eof = not data
            self.buf += data
        if b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            return line
        line, self.buf = self.buf, b""
        return line or None

    def read_message(self) -> str | None:
        """The next message, None at end of input. Raises UnicodeDecodeError on bad bytes."""
        lines, bad = [], None
        while True:
            raw = self._line()
            if raw is None:
                break
            try:
                line = raw.rstrip(b"\r").decode("utf-8")
            except UnicodeDecodeError as e:
                bad, line = e, ""
            if line == EOT_LINE:
                self.eof, self.buf = True, b""
                break
            if line.endswith("\\"):
                lines.append(line[:-1])
                continue
            lines.append(line)
            if self.tty and self._ready(0.03):
                continue
            break
        if bad is not None:
            raise bad
        return "\n".join(lines) if lines else None



class _CtrlC:
    """Ctrl-C at the prompt raises KeyboardInterrupt; anywhere else it only asks the current
    answer to stop (the driver checks the flag between tokens), so a Ctrl-C can never land in
    the middle of a message exchange with the other ranks."""

    def __init__(self, driver: Driver):
        self.driver, self.at_prompt = driver, False

    def __call__(self, *_) -> None:
        if self.at_prompt:
            raise KeyboardInterrupt
        self.driver.interrupted = True


def run_repl(driver: Driver, system: str | None, chat: bool | None, sampling: SamplingParams,
             reader: InputReader | None = None) -> None:
    reader = reader or InputReader()
    ctrl_c = _CtrlC(driver)
    previous = {s: signal.signal(s, ctrl_c) for s in INTERRUPTS}
    try:
        _repl_loop(driver, system, chat, sampling, reader, ctrl_c)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _repl_loop(driver: Driver, system: str | None, chat: bool | None, sampling: SamplingParams,
               reader: InputReader, ctrl_c: _CtrlC) -> None:
    chat = wants_chat(driver.tokenizer, chat)
    base = [{"role": "system", "content": system}] if system and chat else []
    messages = list(base)
    out = sys.stdout
    print("pipeline chat: type a message, /help for commands, /quit to exit", file=out, flush=True)
    interrupted_at_prompt = False
    while True:
        out.write("> ")
        out.flush()
        try:
            ctrl_c.at_prompt = True
            text = reader.read_message()
        except UnicodeDecodeError:
            print("input is not valid UTF-8: retype the message (check the terminal's encoding)",
                  file=out, flush=True)
            continue
        except KeyboardInterrupt:
            if interrupted_at_prompt:
                out.write("\n")
                return
            interrupted_at_prompt = True
            print("\n(Ctrl-C again, /quit or Ctrl-D to exit)", file=out, flush=True)
            continue
        finally:
            ctrl_c.at_prompt = False
        interrupted_at_prompt = False
        if text is None:
            out.write("\n")
            return
        command = text.strip()
        if command in ("/quit", "/exit"):
            return
        if command == "/help":
            print(HELP, file=out, flush=True)
            continue
        if command == "/reset":
            messages = list(base)
            driver.reset()
            print("(conversation cleared)", file=out, flush=True)
            continue
        if command == "/stats":
            if driver.last_stats is None:
                print("no answer yet", file=out, flush=True)
            else:
                print("\n".join(format_stats(driver.last_stats, driver.rank_stats())), file=out,
                      flush=True)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": text})
        try:
            answer = _stream_answer(driver, encode(driver.tokenizer, messages, chat), sampling, out)
        except ValueError as e:  # e.g. the conversation outgrew the context window
            messages.pop()
            print(f"error: {e}", file=out, flush=True)
            continue
        messages.append({"role": "assistant", "content": answer})


def _stream_answer(driver: Driver, tokens: list[int], sampling: SamplingParams, out) -> str:
    """Stream one answer; Ctrl-C stops it (every rank drops the rest) and returns the prompt."""
    parts = []
    for _, segment in driver.generate(tokens, sampling):
        parts.append(segment)
        out.write(segment)
        out.flush()
    out.write("\n")
    if driver.last_stats.finish_reason == "interrupted":
        out.write("(stopped)\n")
    out.flush()
    return "".join(parts)

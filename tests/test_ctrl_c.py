"""Ctrl-C from a real (pseudo-)terminal, through launch/mpirun, on a 2-rank job.

The job runs as a terminal's foreground job does: launch/mpirun is a session leader whose
controlling terminal is a pty, so writing b"\\x03" to the master makes the kernel send SIGINT
to the foreground process group, and b"\\x04" at the start of a line is Ctrl-D (end of input).
"""

import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import termios
import time

import pytest

from conftest import ROOT, mpi_env, run_pipeline
from helpers import processes

LAUNCH = str(ROOT / "launch" / "mpirun")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _take_terminal() -> None:
    """In the child, after setsid: make the pty on stdin the controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A command whose controlling terminal is a fresh pty; we hold the master side."""

    def __init__(self, args: list[str], stderr_path):
        self.master, slave = os.openpty()
        self.err = open(stderr_path, "wb")
        self.proc = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=self.err, env=mpi_env(), cwd=ROOT,
            start_new_session=True, preexec_fn=_take_terminal)
        os.close(slave)
        self.out = b""
        self.seen: dict[int, str | None] = {}  # every process of the job: pid -> start time

    def _track(self) -> None:
        procs = {p.pid: p for p in processes()}
        ppid = {pid: p.ppid for pid, p in procs.items()}
        family, grew = {self.proc.pid}, True
        while grew:
            kids = {p for p, pp in ppid.items() if pp in family} - family
            family |= kids
            grew = bool(kids)
        for pid in family - set(self.seen):
            p = procs.get(pid)
            self.seen[pid] = p.start if p and p.state != "Z" else None

    def expect(self, predicate, timeout: float = 60) -> bytes:
        """Read the terminal until predicate(output) holds; returns the output."""
        deadline = time.monotonic() + timeout
        while not predicate(self.out):
            self._track()
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; terminal shows: {self.out[-600:]!r}"
            if select.select([self.master], [], [], min(left, 0.2))[0]:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: every process closed the terminal
                    data = b""
                assert data, f"terminal closed; it shows: {self.out[-600:]!r}"
                self.out += data
        return self.out

    def prompt(self, timeout: float = 60) -> int:
        """Wait for the "> " prompt at the end of the output; returns the output length."""
        self.expect(lambda out: out.endswith(b"> "), timeout)
        return len(self.out)

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"still running; shows: {self.out[-600:]!r}"
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.out += os.read(self.master, 65536)
                except OSError:
                    pass
        return self.proc.returncode

    def leftovers(self) -> list[int]:
        """Processes of the job (launcher, mpirun, ranks) still alive."""
        now = {p.pid: p.start for p in processes() if p.state != "Z"}  # a zombie is gone
        return [p for p, start in self.seen.items() if start and now.get(p) == start]

    def close(self) -> None:
        """After a failure: end the whole job (mpirun runs in a session of its own)."""
        self._track()
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait()
        os.close(self.master)
        self.err.close()


def _answer(term: Terminal, start: int, nbytes: int = 300) -> bytes:
    """Wait until the answer that began at output offset `start` has streamed nbytes."""
    term.expect(lambda out: len(out) - start > nbytes, 60)
    return term.out[start:]


def _chat(model_dir, tmp_path) -> Terminal:
    return Terminal([LAUNCH, "-np", "2", sys.executable, "-m", "pipeline", "--model",
                     str(model_dir("tiny-llama")), "--max-tokens", "100000", "--ignore-eos",
                     "--no-chat"], tmp_path / "stderr")


def _ended_cleanly(term: Terminal, tmp_path) -> None:
    assert term.wait(30) == 0
    time.sleep(1)  # launch/mpirun's stdin relay checks for its end every 0.2 s
    assert term.leftovers() == []
    assert len(term.seen) >= 4  # launcher, mpirun, 2 ranks were all tracked
    assert b"Traceback" not in (tmp_path / "stderr").read_bytes()


def test_ctrl_c_stops_only_the_answer_and_twice_at_the_prompt_exits(model_dir, tmp_path):
    term = _chat(model_dir, tmp_path)
    try:
        start = term.prompt()
        term.send(b"hello\n")
        first = _answer(term, start + len(b"hello\r\n"))  # streaming: the prompt echo, then text
        term.send(b"\x03")
        term.expect(lambda out: b"(stopped)\r\n> " in out[start:], 30)
        assert term.proc.poll() is None  # the job goes on

        # rank 1 is back to waiting for requests: it answers /stats (that would hang if it
        # were still inside the interrupted request)
        start = term.prompt(5)
        term.send(b"/stats\n")
        term.expect(lambda out: b"rank 1 (" in out[start:] and out.endswith(b"> "), 30)
        assert b"(interrupted)" in term.out[start:]

        # every rank dropped the state: after /reset the same message gives the same answer
        term.send(b"/reset\n")
        term.expect(lambda out: out.endswith(b"(conversation cleared)\r\n> "), 10)
        start = len(term.out)
        term.send(b"hello\n")
        second = _answer(term, start + len(b"hello\r\n"))
        term.send(b"\x03")
        term.expect(lambda out: b"(stopped)\r\n> " in out[start:], 30)
        assert first[:250] == second[:250]

        term.prompt(5)
        term.send(b"\x03")
        term.expect(lambda out: out.endswith(b"(Ctrl-C again, /quit or Ctrl-D to exit)\r\n> "))
        term.send(b"\x03")
        _ended_cleanly(term, tmp_path)
    finally:
        term.close()


@pytest.mark.parametrize("key", [b"\x04", b"/quit\n"], ids=["ctrl-d", "quit"])
def test_ctrl_d_or_quit_exits(model_dir, tmp_path, key):
    # Ctrl-D: mpirun drops end-of-input; launch/mpirun relays it as an EOT line (README)
    term = _chat(model_dir, tmp_path)
    try:
        term.prompt()
        term.send(key)
        _ended_cleanly(term, tmp_path)
    finally:
        term.close()


def test_ctrl_c_in_batch_finishes_writing_then_rerun_resumes(model_dir, tmp_path):
    model = model_dir("tiny-llama")
    n = 24
    (tmp_path / "in.jsonl").write_text("".join(
        json.dumps({"id": i, "prompt": f"prompt number {i} says", "max_tokens": 24}) + "\n"
        for i in range(n)))
    out = tmp_path / "out.jsonl"
    args = ["batch", str(tmp_path / "in.jsonl"), "-o", str(out), "--model", str(model),
            "--no-chat", "--ignore-eos", "--concurrency", "2"]
    term = Terminal([LAUNCH, "-np", "2", sys.executable, "-m", "pipeline", *args],
                    tmp_path / "stderr")
    try:
        term.expect(lambda _: out.exists() and out.read_text().count("\n") >= 3, 120)
        term.send(b"\x03")
        code = term.wait(30)
        err = (tmp_path / "stderr").read_text()
        assert code == 130, err  # unfinished: scripts can tell
        assert "interrupted: rerun the same command" in err
        time.sleep(1)
        assert term.leftovers() == []
    finally:
        term.close()
    data = out.read_text()
    assert data.endswith("\n")  # no half-written line
    first = [json.loads(line)["id"] for line in data.splitlines()]
    assert 3 <= len(first) < n
    assert all(json.loads(line)["completion_tokens"] == 24 for line in data.splitlines())

    proc = run_pipeline(2, *args)
    assert proc.returncode == 0, proc.stderr
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == list(range(n))  # the rest done, nothing twice
    assert ids[: len(first)] == first


def test_sigterm_to_launch_mpirun_leaves_nothing(model_dir, tmp_path):
    term = _chat(model_dir, tmp_path)
    try:
        start = term.prompt()
        term.send(b"hello\n")
        _answer(term, start)
        term.proc.send_signal(signal.SIGTERM)
        assert term.wait(30) != 0
        time.sleep(1)
        assert term.leftovers() == []
    finally:
        term.close()

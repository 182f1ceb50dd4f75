"""Move model files once: rank 0 sends every rank the files its layers need, checked by sha256.

Once the split is known, rank 0 lists for each rank the files it needs (config, tokenizer and
generation files, the safetensors index, and the shards that hold that rank's tensors) with
size and sha256. Each rank compares its own copy. What is missing or differs is sent by rank 0
in chunks, written to a temporary file next to its final place, checked (size and sha256) and
renamed into place. A file that differs from rank 0's is never loaded: it is replaced, or with
--no-distribute the job stops with a message naming the rank, its host and the files.

Pairing rule (why this cannot deadlock): the whole list of transfers is broadcast first. Rank 0
works through it in order with non-blocking sends (two chunks in flight); each receiver posts
blocking receives for its own entries in the same order, and a receiver that cannot write keeps
receiving (and drops the bytes) so rank 0 never waits on it. Every other rank goes straight to
the closing gather.

Hashes are cached per folder in $PIPELINE_CACHE/sha256 (keyed by size, mtime and ctime), so a
40 GB model is hashed once, not on every run.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mpi4py import MPI

from pipeline.errors import EXIT_FAILURE, EXIT_USAGE, raise_together
from pipeline.model.load import tensor_index
from pipeline.model.spec import META_PATTERNS, ModelError, cache_root
from pipeline.place.split import layer_ranges

CHUNK = 16 * 2**20  # bytes per MPI message: large enough for full link speed, small in memory
TAG = 0x5EED
PROGRESS_EVERY_S = 1.0


@dataclass(frozen=True)
class Entry:
    name: str    # relative to the model folder
    size: int
    sha256: str


# ---------------------------------------------------------------- which files, and their hashes


def wanted_files(folder: Path, split: list[int], head_share: bool = False,
                 groups: list[int] | None = None) -> list[list[str]]:
    """Per rank: the files it needs from `folder` (metadata files, then its weight files).
    split: layers per stage; groups: ranks per stage (default one each; a tensor-parallel
    group's ranks all need their stage's files).
    head_share: the last stage also holds part of the head (the files of the norm and head)."""
    meta = sorted(p.name for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and any(fnmatch.fnmatch(p.name, pat) for pat in META_PATTERNS))
    if (folder / "model.safetensors.index.json").is_file() or any(folder.glob("*.safetensors")):
        index = tensor_index(folder, sizes=False)
        last = len(split) - 1
        weights = [sorted({index.file_of[n] for n in index.share(
                       rng, with_head=r == 0, head_share=head_share and 0 < r == last)})
                   for r, rng in enumerate(layer_ranges(split))]
    else:  # a hub repo without an index whose weights are not here yet: mlx-lm's one file
        weights = [["model.safetensors"] for _ in split]
    groups = groups or [1] * len(split)
    return [meta + w for w, g in zip(weights, groups) for _ in range(g)]


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class HashCache:
    """sha256 of a folder's files, remembered by (size, mtime, ctime) across runs."""

    def __init__(self, folder: Path):
        self.folder = folder
        real = str(folder.expanduser().resolve())
        self.file = (cache_root() / "sha256" /
                     f"{folder.name}-{hashlib.sha1(real.encode()).hexdigest()[:12]}.json")
        try:
            self.known = json.loads(self.file.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def sha256(self, name: str) -> str:
        path = self.folder / name
        key = _stat_key(path)
        hit = self.known.get(name)
        if isinstance(hit, list) and hit[:3] == key:
            return hit[3]
        digest = _hash_file(path)
        self.remember(name, digest)
        return digest

    def remember(self, name: str, digest: str) -> None:
        self.known[name] = [*_stat_key(self.folder / name), digest]
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        try:  # a lost update only costs one more hash next run
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}")
            tmp.write_text(json.dumps(self.known))
            os.replace(tmp, self.file)
        except OSError:
            pass


# ---------------------------------------------------------------- each rank's own copy


def _writable(folder: Path) -> bool:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def _identity(folder: Path | None) -> tuple[int, int] | None:
    try:
        st = folder.stat() if folder is not None else None
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if st else None


def check_folder(folder: Path, manifest: list[Entry]) -> list[tuple[str, str]]:
    """(name, what is wrong) for each manifest file this folder lacks or holds differently."""
    problems, cache = [], HashCache(folder)
    for e in manifest:
        path = folder / e.name
        if not path.is_file():
            problems.append((e.name, "missing"))
        elif path.stat().st_size != e.size:
            problems.append((e.name, f"{path.stat().st_size} bytes, rank 0 has {e.size}"))
        elif cache.sha256(e.name) != e.sha256:
            problems.append((e.name, "sha256 differs from rank 0's"))
    cache.save()
    return problems


def choose_folder(candidate: Path, manifest: list[Entry],
                  fallback: bool = True) -> tuple[Path, list[tuple[str, str]]]:
    """The folder this rank loads from, and what it still lacks there: `candidate` (its own
    --model path) when it is complete or can be written, else the cache folder."""
    problems = check_folder(candidate, manifest) if candidate.is_dir() else [
        (e.name, "missing") for e in manifest]
    if not problems or not fallback or _writable(candidate):
        return candidate, problems
    fallback = cache_root() / "models" / candidate.name
    return fallback, check_folder(fallback, manifest) if fallback.is_dir() else [
        (e.name, "missing") for e in manifest]


# ---------------------------------------------------------------- transfer


def fmt_mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


class Progress:
    """Rank 0's transfer line on stderr: rewritten in place on a terminal, else every few s."""

    def __init__(self, total: int, what: str):
        self.total, self.done, self.what = total, 0, what
        self.start = self.last = time.monotonic()
        self.tty = sys.stderr.isatty()

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.start, 1e-9)

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= (PROGRESS_EVERY_S if self.tty else 5 * PROGRESS_EVERY_S):
            self.last = now
            line = (f"pipeline: {self.what}: {fmt_mib(self.done)} of {fmt_mib(self.total)} "
                    f"({100 * self.done / max(self.total, 1):.0f}%), {self.rate() / 1e6:.0f} MB/s")
            print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
                  file=sys.stderr, flush=True)

    def finish(self, files: int, ranks: int) -> None:
        secs = time.monotonic() - self.start
        print(f"{chr(13) if self.tty else ''}pipeline: sent {files} file{'s' * (files != 1)} "
              f"({fmt_mib(self.done)}) to {ranks} rank{'s' * (ranks != 1)} in {secs:.1f} s "
              f"({self.rate() / 1e6:.0f} MB/s)", file=sys.stderr, flush=True)


def _send(comm, folder: Path, transfers: list[tuple[int, Entry]], progress: Progress) -> str | None:
    """Rank 0: every transfer's bytes, in order, two chunks in flight."""
    bufs, reqs, error = [bytearray(CHUNK), bytearray(CHUNK)], [None, None], None
    k = 0
    for dst, e in transfers:
        try:
            f = open(folder / e.name, "rb")
        except OSError as x:
            f, error = None, error or f"rank 0 cannot read {folder / e.name}: {x}"
        for offset in range(0, e.size, CHUNK):
            i, n = k % 2, min(CHUNK, e.size - offset)
            k += 1
            if reqs[i] is not None:
                reqs[i].Wait()
            view = memoryview(bufs[i])[:n]
            got = f.readinto(view) if f else 0
            if got < n:  # the file shrank: still send the promised bytes (sha256 will fail)
                view[got:] = bytes(n - got)
                error = error or f"{folder / e.name} changed on rank 0 while it was being sent"
            reqs[i] = comm.Isend([view, MPI.BYTE], dest=dst, tag=TAG)
            progress.add(n)
        if f:
            f.close()
    MPI.Request.Waitall([r for r in reqs if r is not None])
    return error


def _receive(comm, folder: Path, entries: list[Entry]) -> str | None:
    """Rank r: its entries, each into a temporary file, checked, then renamed into place."""
    rank, buf, errors = comm.Get_rank(), bytearray(CHUNK), []
    cache = HashCache(folder)
    for e in entries:
        final = folder / e.name
        tmp = final.with_name(f".{final.name}.{rank}.partial")
        digest, out, error = hashlib.sha256(), None, None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            out = open(tmp, "wb")
        except OSError as x:
            error = f"cannot write {tmp} ({x})"
        for offset in range(0, e.size, CHUNK):
            view = memoryview(buf)[:min(CHUNK, e.size - offset)]
            comm.Recv([view, MPI.BYTE], source=0, tag=TAG)
            digest.update(view)
            if out is not None and error is None:
                try:
                    out.write(view)
                except OSError as x:
                    error = f"cannot write {tmp} ({x})"
        if out is not None:
            try:
                out.flush()
                os.fsync(out.fileno())
                out.close()
            except OSError as x:
                error = error or f"cannot write {tmp} ({x})"
        if error is None and digest.hexdigest() != e.sha256:
            error = f"{e.name} arrived with sha256 {digest.hexdigest()[:12]}…, rank 0 has {e.sha256[:12]}…"
        if error is None and tmp.stat().st_size != e.size:
            error = f"{e.name} arrived with {tmp.stat().st_size} bytes, rank 0 has {e.size}"
        if error is None:
            os.replace(tmp, final)  # atomic: a reader sees the old file or the whole new one
            cache.remember(e.name, e.sha256)
        else:
            tmp.unlink(missing_ok=True)
            errors.append(error)
    cache.save()
    return "; ".join(errors) or None


# ---------------------------------------------------------------- the collective step


def _list(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _refusal(r: int, host: str, folder: str, problems: list[tuple[str, str]]) -> str:
    missing = [n for n, why in problems if why == "missing"]
    differ = [f"{n} ({why})" for n, why in problems if why != "missing"]
    parts = []
    if missing:
        parts.append(f"rank {r} ({host}) lacks model files ({_list(missing)}) under {folder}")
    if differ:
        parts.append(f"rank {r} ({host}) has model files that differ from rank 0's "
                     f"({_list(differ)}) under {folder}")
    return "; ".join(parts)


def distribute(comm, path: Path | None, candidate: Path | None, wanted: list[list[str]] | None,
               mode: bool | None, log) -> Path | None:
    """Collective. Rank 0 (`path`: its model folder; `wanted`: each rank's file names, None
    for a rank that needs no check) makes every other rank's copy match its own. Other ranks
    pass `candidate`, the folder they would load from (None: nothing to check). Returns the
    folder this rank loads from. mode: True/None distribute what is missing, False refuses."""
    rank, host = comm.Get_rank(), socket.gethostname()
    ident = _identity(path if rank == 0 else candidate)
    idents = comm.gather((host, ident), root=0)

    manifests, error = None, None
    if rank == 0:
        manifests = [None] * comm.Get_size()
        try:
            cache = HashCache(path)
            for r in range(1, comm.Get_size()):
                if wanted[r] is None or idents[r] == (host, ident):
                    continue  # nothing to check, or the very folder rank 0 loads from
                for name in wanted[r]:
                    if not (path / name).is_file():
                        raise ModelError(f"rank 0 ({host}) lacks model file {name} under {path}: "
                                         f"rank {r} needs it; re-download the model on rank 0")
                manifests[r] = [Entry(n, (path / n).stat().st_size, cache.sha256(n))
                                for n in wanted[r]]
            cache.save()
        except (OSError, ModelError) as e:
            error = str(e)
    raise_together(comm, error, EXIT_USAGE)

    manifest = comm.scatter(manifests, root=0)
    folder, problems, error = candidate, [], None
    if manifest is not None:
        try:
            folder, problems = choose_folder(candidate, manifest, fallback=mode is not False)
        except OSError as e:
            error = f"cannot check the model files under {candidate}: {e}"
    reports = comm.gather((host, str(folder), problems, error), root=0)

    transfers, message, code = [], None, EXIT_USAGE
    if rank == 0:
        refusals = [f"rank {r} ({h}): {err}" for r, (h, _, _, err) in enumerate(reports) if err]
        if mode is False:
            refusals += [_refusal(r, h, f, p) for r, (h, f, p, _) in enumerate(reports) if p]
            if refusals:
                message = "; ".join(refusals) + "; copy them there or drop --no-distribute"
        elif refusals:
            message = "; ".join(refusals)
        by_name = {r: {e.name: e for e in m} for r, m in enumerate(manifests) if m}
        transfers = [(r, by_name[r][n]) for r, (_, _, p, _) in enumerate(reports) for n, _ in p]
    raise_together(comm, message, code)
    transfers = comm.bcast(transfers, root=0)
    if not transfers:
        if rank == 0:
            log("model files verified on every rank: nothing to send")
        return path if rank == 0 else folder

    error = None
    if rank == 0:
        for r, (h, f, p, _) in enumerate(reports):
            for name, why in p:
                if why != "missing":
                    print(f"pipeline: rank {r} ({h}): {name} under {f}: {why}; replacing it",
                          file=sys.stderr, flush=True)
        dsts = sorted({r for r, _ in transfers})
        total = sum(e.size for _, e in transfers)
        for r in dsts:
            mine = [e for d, e in transfers if d == r]
            print(f"pipeline: sending {len(mine)} model file{'s' * (len(mine) != 1)} "
                  f"({fmt_mib(sum(e.size for e in mine))}) to rank {r} ({reports[r][0]}) under "
                  f"{reports[r][1]}", file=sys.stderr, flush=True)
        progress = Progress(total, "sending model files")
        error = _send(comm, path, transfers, progress)
        progress.finish(len(transfers), len(dsts))
    else:
        mine = [e for d, e in transfers if d == rank]
        if mine:
            error = _receive(comm, folder, mine)
    raise_together(comm, error, EXIT_FAILURE, any_rank=True)
    return path if rank == 0 else folder

"""Hugging Face repos: each rank downloads only the files its layers need; rank 0 shows them all.

Every rank already holds the repo's small files (config, index, tokenizer: load.resolve_model).
After the split is known, rank 0 tells each rank which files it needs at rank 0's commit, and
each rank fetches them with huggingface_hub's hf_hub_download in a background thread. The main
thread gathers every rank's byte count twice a second (all MPI stays on the main thread, and
every rank takes part in every gather until all are done), so rank 0 prints one progress line
for the whole cluster.

Shared filesystems: huggingface_hub takes a file lock per blob (<cache>/.locks/<repo>/<etag>.lock)
around each download and skips a blob that exists once it holds the lock, so two ranks that
share a cache never download the same file twice (where the filesystem has no flock it falls
back to a lock file; if even that is not honoured, each process writes its own temporary file
and renames it, so the cache stays correct and only bandwidth is lost). A broken transfer is
retried and resumed within the run; files finished before an interrupted run stay in the cache.

A rank that cannot reach the hub (resolve_model failed there) or every rank with --distribute
instead receives its files from rank 0 over MPI (distribute.py): rank 0 downloads them on its
behalf first.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from pipeline.errors import EXIT_FAILURE, EXIT_USAGE, raise_together
from pipeline.files.distribute import distribute, fmt_mib, wanted_files
from pipeline.model.spec import ModelError, cache_root

POLL_S = 0.5
PRINT_EVERY_S = 2.0


class _Counter:
    def __init__(self, names: list[str]):
        self.names, self.bytes, self.files = names, 0, 0
        self.done, self.error, self.root = not names, None, None


def _counting_tqdm(counter: _Counter):
    class Counting(tqdm):  # hf_hub_download reports its bytes here; nothing is drawn
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            counter.bytes += n or 0
            return super().update(n)

    return Counting


def _download(repo: str, commit: str, counter: _Counter) -> None:
    from huggingface_hub import hf_hub_download

    name = None
    try:
        for name in counter.names:
            local = Path(hf_hub_download(repo, name, revision=commit,
                                         tqdm_class=_counting_tqdm(counter)))
            counter.root = local.parents[len(Path(name).parts) - 1]
            counter.files += 1
    except Exception as e:  # reported by rank 0 for this rank, after every rank is done
        counter.error = f"cannot download {name} of {repo} from the hub ({type(e).__name__}: {e})"
    finally:
        counter.done = True


def download_all(comm, repo: str, commit: str, names: list[str]) -> Path | None:
    """Collective: this rank fetches `names` at `commit`; rank 0 prints every rank's bytes.
    Returns this rank's snapshot folder (None when it fetched nothing)."""
    rank, counter = comm.Get_rank(), _Counter(names)
    thread = threading.Thread(target=_download, args=(repo, commit, counter), daemon=True)
    if names:
        thread.start()
    start = last = time.monotonic()
    tty = sys.stderr.isatty()
    while True:
        if names:
            thread.join(POLL_S)
        states = comm.gather((counter.bytes, counter.files, len(names), counter.done), root=0)
        finished = None
        if rank == 0:
            finished = all(s[3] for s in states)
            moved = sum(s[0] for s in states)
            now = time.monotonic()
            if moved and (finished or now - last >= PRINT_EVERY_S):
                last = now
                per_rank = ", ".join(f"rank {r} {f}/{n} files {fmt_mib(b)}"
                                     for r, (b, f, n, _) in enumerate(states) if n)
                line = (f"pipeline: {'downloaded' if finished else 'downloading'} {repo}: "
                        f"{per_rank}, {moved / max(now - start, 1e-9) / 1e6:.0f} MB/s")
                end = "\n" if finished or not tty else ""
                print(("\r" if tty else "") + line, end=end, file=sys.stderr, flush=True)
        if comm.bcast(finished, root=0):
            break
    raise_together(comm, counter.error, EXIT_FAILURE, any_rank=True,
                   suffix=": check the network (HF_ENDPOINT, HF_TOKEN) or run with "
                   "--distribute so rank 0 fetches and sends the files")
    return counter.root


def prepare_hub(comm, repo: str, path: Path | None, split: list[int], mode: bool | None,
                log, head_share: bool = False, groups: list[int] | None = None) -> Path:
    """Collective: every rank ends with its files of `repo` and returns the folder holding
    them. Ranks with hub access (and without --distribute) download their own; the others
    receive theirs from rank 0 into $PIPELINE_CACHE/models/<org>--<name>."""
    rank = comm.Get_rank()
    receives = comm.gather(rank != 0 and (path is None or mode is True), root=0)
    plan, error = None, None
    if rank == 0:
        try:
            wanted = wanted_files(path, split, head_share, groups)
            mine = list(wanted[0])
            for r, names in enumerate(wanted):
                mine += [n for n in names if receives[r] and n not in mine]
            lists = [mine] + [[] if receives[r] else names for r, names in enumerate(wanted)][1:]
            plan = (path.name, lists, [names if receives[r] else None
                                       for r, names in enumerate(wanted)])
        except (OSError, ModelError) as e:
            error = str(e)
    raise_together(comm, error, EXIT_USAGE)
    plan = comm.bcast(plan, root=0)
    commit, lists, wanted = plan
    log(f"fetching {len(lists[rank])} files of {repo} at {commit[:12]}")
    root = download_all(comm, repo, commit, lists[rank])
    own = root or path
    candidate = cache_root() / "models" / repo.replace("/", "--") if wanted[rank] else None
    folder = distribute(comm, own if rank == 0 else None, candidate,
                        wanted if rank == 0 else None, mode, log)
    return folder if rank == 0 or wanted[rank] else own

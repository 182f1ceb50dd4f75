"""Collective, once the split is known: every rank ends up with verified copies of the model
files its layers need, from the hub (hub.py) or from rank 0 over MPI (distribute.py)."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import EXIT_USAGE, raise_together
from pipeline.files.distribute import distribute, wanted_files
from pipeline.files.hub import prepare_hub
from pipeline.model.spec import ModelError


def prepare(comm, spec: str | None, kind: str, path: Path | None, split: list[int],
            mode: bool | None, log, head_share: bool = False,
            groups: list[int] | None = None) -> Path:
    """Collective, after the plan: make sure every rank holds verified copies of the files its
    layers need, fetching (hub) or receiving them (from rank 0) when not. Returns the folder
    this rank loads from. GGUF files and the embedded model are imported by each rank itself."""
    if kind in ("default", "file"):
        return path
    rank = comm.Get_rank()
    if kind == "hub":
        return prepare_hub(comm, spec, path, split, mode, log, head_share, groups)
    wanted, error = None, None
    if rank == 0:
        try:
            wanted = wanted_files(path, split, head_share, groups)
        except (OSError, ModelError) as e:
            error = str(e)
    raise_together(comm, error, EXIT_USAGE)
    candidate = None if rank == 0 else Path(spec).expanduser()
    return distribute(comm, path, candidate, wanted, mode, log)

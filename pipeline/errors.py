"""Exit codes, and the one way a job ends on every rank together.

A rank that finds a problem must not leave the others waiting in a collective: every rank
takes part in the same collective (raise_together), and all raise JobError or none does.
The command line prints rank 0's message and exits with the code on every rank.
"""

from __future__ import annotations

import socket

EXIT_FAILURE = 1  # something failed while running (a rank, a transfer)
EXIT_USAGE = 2  # bad input: a flag, a file, a model that does not fit


class JobError(Exception):
    """Ends the job on every rank with `exit_code`; rank 0 prints `message` (if any)."""

    def __init__(self, message: str | None, exit_code: int):
        super().__init__(message)
        self.message, self.exit_code = message, exit_code


def raise_together(comm, error: str | None, exit_code: int, *, any_rank: bool = False,
                   suffix: str = "") -> None:
    """Collective: raise JobError on every rank when there is an error, else return.

    any_rank=False: only rank 0's `error` counts (the others pass None and take rank 0's word).
    any_rank=True: every rank's counts; rank 0's message names the others by rank and host,
    joined with "; ". `suffix` is appended to the message (what to do about it)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if any_rank and size > 1:
        errors = comm.gather((error, socket.gethostname()), root=0)
        if rank == 0:
            error = "; ".join(e if r == 0 else f"rank {r} ({host}): {e}"
                              for r, (e, host) in enumerate(errors) if e) or None
    if size > 1:
        error = comm.bcast(error if rank == 0 else None, root=0)
    if error:
        raise JobError(error + suffix if rank == 0 else None, exit_code)

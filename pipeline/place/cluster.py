"""Who am I: host, memory, device, measured memory bandwidth and disk, gathered once at start.

Memory comes from /proc/meminfo (and a cgroup limit) on Linux, `sysctl hw.memsize` and
`vm_stat` on macOS. Bandwidth is timed on a matrix-vector product with mlx, which reads the
whole matrix once, as decoding does with the weights (about 0.3 s). Ranks that share a host
take turns, so they do not measure each other. `measure_hops` times a ping-pong between ring
neighbours with buffers (Isend/Recv), on a duplicate of the communicator.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.model.spec import cache_root

PROBE_SECONDS = 0.3
PROBE_BYTES_CPU = 128 * 2**20  # well past the last-level cache
PROBE_BYTES_GPU = 256 * 2**20  # x PROBE_GPU_BATCH products per timed evaluation
PROBE_GPU_BATCH = 8
FLOPS_PROBE_SECONDS = 0.15
FLOPS_PROBE_ROWS = 256  # a micro-batch's rows (a prefill chunk's are more: it is faster still)
FLOPS_PROBE_DIM = 2048


@dataclass
class Capacity:
    """One rank's measured resources."""

    rank: int
    host: str
    total_memory: int                # bytes (the lower of the machine's and a cgroup limit)
    available_memory: int | None     # bytes free for new allocations now
    device: str                      # "gpu" or "cpu"
    device_name: str
    memory_limit: int | None         # GPU: Metal's recommended working set; else None
    bandwidth: float | None          # bytes/s of a matrix-vector product; None: probe failed
    disk_free: int | None            # bytes free where the model lives
    disk_path: str
    local_ranks: int = 1             # ranks of this job on this host
    flops: float | None = None       # FLOP/s of a batched matrix product; None: not measured

    def to_json(self) -> dict:
        return asdict(self)


def _meminfo() -> tuple[int | None, int | None]:
    fields = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None, None
    return fields.get("MemTotal"), fields.get("MemAvailable")


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" or a huge number: no limit
            return int(text)
    return None


def parse_vm_stat(text: str) -> int | None:
    """Bytes free for new allocations from macOS `vm_stat` output (free + inactive +
    speculative pages: the kernel hands inactive pages out without swapping)."""
    m = re.search(r"page size of (\d+) bytes", text)
    if not m:
        return None
    pages = {}
    for key, value in re.findall(r"^Pages ([\w -]+):\s+(\d+)\.", text, re.MULTILINE):
        pages[key.strip()] = int(value)
    return int(m.group(1)) * sum(pages.get(k, 0) for k in ("free", "inactive", "speculative"))


def _run(*cmd: str) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def memory() -> tuple[int, int | None]:
    """(total, available) bytes of this machine."""
    if sys.platform == "darwin":
        total = _run("sysctl", "-n", "hw.memsize")
        vm = _run("vm_stat")
        return int(total) if total and total.strip().isdigit() else 0, parse_vm_stat(vm or "")
    total, available = _meminfo()
    limit = _cgroup_limit()
    if limit is not None:
        total = min(total or limit, limit)
        available = min(available or limit, limit)
    return total or 0, available


def _model_dir(model_path: str | Path | None) -> Path:
    """Where the model lives (or would): the nearest existing folder."""
    if model_path is None:
        return cache_root()
    path = Path(model_path).expanduser()
    if not path.exists() and not str(model_path).startswith((".", "/", "~")):
        path = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return path


def disk_free(model_path: str | Path | None) -> tuple[int | None, str]:
    path = _model_dir(model_path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free, str(path)
    except OSError:
        return None, str(path)


def probe_bandwidth(seconds: float = PROBE_SECONDS) -> float:
    """Bytes/s read by a matrix-vector product on mlx's default device (median of runs)."""
    import mlx.core as mx

    gpu = mx.default_device() == mx.gpu
    dtype, nbytes = (mx.float16, PROBE_BYTES_GPU) if gpu else (mx.float32, PROBE_BYTES_CPU)
    batch = PROBE_GPU_BATCH if gpu else 1
    cols = 4096
    rows = nbytes // (cols * dtype.size)
    w = mx.ones((rows, cols), dtype=dtype)  # w: [rows, cols]
    xs = [mx.full((cols,), float(i + 1), dtype=dtype) for i in range(batch)]
    mx.eval(w, *xs)
    mx.eval([w @ x for x in xs])  # warm-up: kernels, pages
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 100):
        t0 = time.perf_counter()
        mx.eval([w @ x for x in xs])
        times.append(time.perf_counter() - t0)
    read = w.nbytes * batch
    del w, xs
    mx.clear_cache()
    return read / statistics.median(times)


def probe_flops(seconds: float = FLOPS_PROBE_SECONDS) -> float:
    """FLOP/s of a decode micro-batch's product (FLOPS_PROBE_ROWS rows against a weight
    matrix) on mlx's default device, in its fast dtype (median of runs)."""
    import mlx.core as mx

    dtype = mx.float16 if mx.default_device() == mx.gpu else mx.float32
    w = mx.random.normal((FLOPS_PROBE_DIM, FLOPS_PROBE_DIM)).astype(dtype)
    x = mx.random.normal((FLOPS_PROBE_ROWS, FLOPS_PROBE_DIM)).astype(dtype)
    mx.eval(w, x)
    mx.eval(x @ w.T)  # warm-up
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        mx.eval(x @ w.T)
        times.append(time.perf_counter() - t0)
    del w, x
    mx.clear_cache()
    return 2 * FLOPS_PROBE_ROWS * FLOPS_PROBE_DIM**2 / statistics.median(times)


def _device() -> tuple[str, str, int | None]:
    import mlx.core as mx

    # mx.device_info() is newer; older mlx on macOS keeps it under mx.metal
    get_info = getattr(mx, "device_info", None) or getattr(mx.metal, "device_info", None)
    info = get_info() if get_info is not None else {}
    if mx.default_device() == mx.gpu:
        limit = info.get("max_recommended_working_set_size")
        return "gpu", str(info.get("device_name", "gpu")), int(limit) if limit else None
    name = str(info.get("device_name") or platform.processor() or platform.machine())
    return "cpu", name, None


def measure_capacity(rank: int, model_path: str | Path | None = None,
                     bandwidth: bool = True) -> Capacity:
    """This process's capacity; the bandwidth probe takes about PROBE_SECONDS."""
    total, available = memory()
    device, device_name, limit = _device()
    free, where = disk_free(model_path)
    return Capacity(rank=rank, host=socket.gethostname(), total_memory=total,
                    available_memory=available, device=device, device_name=device_name,
                    memory_limit=limit, bandwidth=probe_bandwidth() if bandwidth else None,
                    disk_free=free, disk_path=where,
                    flops=probe_flops() if bandwidth else None)


class CapacityError(RuntimeError):
    """A rank could not measure itself; the message names the rank and host."""


def gather_capacities(comm, model_path: str | Path | None = None) -> list[Capacity] | None:
    """Every rank measures itself (ranks on one host in turn); rank 0 gets the list in rank
    order, the other ranks get None. Collective: every rank of `comm` must call it. A rank
    whose measurement fails still takes part; rank 0 then raises CapacityError."""
    from mpi4py import MPI

    rank = comm.Get_rank()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    try:
        cap: Capacity | str = "not measured"
        for turn in range(local.Get_size()):
            if local.Get_rank() == turn:
                try:
                    cap = measure_capacity(rank, model_path)
                    cap.local_ranks = local.Get_size()
                except Exception as e:  # reported by rank 0 below; no rank is left waiting
                    cap = f"rank {rank} ({socket.gethostname()}): {type(e).__name__}: {e}"
            local.Barrier()
    finally:
        local.Free()
    caps = comm.gather(cap, root=0)
    if caps is not None:
        failed = [c for c in caps if isinstance(c, str)]
        if failed:
            raise CapacityError("measuring capacity failed on " + "; ".join(failed))
    return caps


@dataclass
class Hop:
    """One ring link measured from `src`: one-way time of a message of `nbytes`."""

    src: int
    dst: int
    nbytes: int
    one_way_s: float

    @property
    def bandwidth(self) -> float:
        return self.nbytes / self.one_way_s if self.one_way_s > 0 else float("inf")


def ring_hops(size: int) -> list[tuple[int, int]]:
    """The ring's links 0->1->...->N-1->0 (two ranks share one link)."""
    if size < 2:
        return []
    if size == 2:
        return [(0, 1)]
    return [(r, (r + 1) % size) for r in range(size)]


def measure_hops(comm, nbytes: int, reps: int = 20, warmup: int = 3) -> list[Hop] | None:
    """Ping-pong of `nbytes` over every ring link, one link at a time (the others wait).

    One-way time = median round trip / 2. Rank 0 gets the hops, the others None.
    Collective: every rank of `comm` must call it with the same arguments.
    """
    import numpy as np

    comm = comm.Dup()  # our messages cannot meet anyone else's
    try:
        rank = comm.Get_rank()
        out, back = np.zeros(max(nbytes, 1), np.uint8), np.empty(max(nbytes, 1), np.uint8)
        mine = []
        for src, dst in ring_hops(comm.Get_size()):
            if rank == src:
                times = []
                for _ in range(warmup + reps):
                    t0 = time.perf_counter()
                    req = comm.Isend(out, dst, tag=1)
                    comm.Recv(back, dst, tag=2)
                    req.Wait()
                    times.append(time.perf_counter() - t0)
                mine.append(Hop(src, dst, nbytes, statistics.median(times[warmup:]) / 2))
            elif rank == dst:
                for _ in range(warmup + reps):
                    comm.Recv(back, src, tag=1)
                    comm.Isend(out, src, tag=2).Wait()
            comm.Barrier()
        gathered = comm.gather(mine, root=0)
    finally:
        comm.Free()
    return None if gathered is None else [h for hops in gathered for h in hops]

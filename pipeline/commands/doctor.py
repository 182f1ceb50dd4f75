"""`mpirun ... python -m pipeline doctor [--model M] [--hostfile H]`: is this cluster ready?

Every rank reports its host, Python and package versions, device and BLAS, memory, memory
bandwidth and disk, the network interface its route to the next rank leaves by (routes.py),
on a Mac the GPU wired limit (`iogpu.wired_limit_mb`), and (with --model) the size and
sha256 of config.json and of every weights file the model would load. Rank 0 compares them
with its own, plans the model's layers as a run would (each rank's share of the weights),
times a ping-pong over every ring link (a small and a 4 MiB message), prints one table and
lists every problem; the exit code is 1 when there is any. Warnings (a slow BLAS, a slow
link, a hop over Wi-Fi or another interface than the hostfile's `iface=`, weights near the
wired limit) do not fail it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import socket
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from pipeline.host import blas, wired
from pipeline.host import hugepages
from pipeline.place import routes
from pipeline.place.cluster import Capacity, CapacityError, gather_capacities, measure_hops
from pipeline.place.hostfile import HostEntry, HostfileError, rank_entries, read_hostfile
from pipeline.model.spec import hub_repo
from pipeline.place.planner import fmt_bytes

PACKAGES = ("mlx", "mlx-lm", "mpi4py", "numpy")
SMALL_MESSAGE, LARGE_MESSAGE = 8, 4 * 2**20
SLOW_LINK = 100e6  # bytes/s: below 1 GbE, MPI probably uses the wrong interface
EXIT_PROBLEMS = 1


@dataclass
class FileCheck:
    name: str                 # relative to the model folder
    size: int | None          # None: missing
    sha256: str | None = None


@dataclass
class RankReport:
    rank: int
    host: str
    python: str
    packages: dict[str, str]
    mpi_library: str
    device: str
    blas: str
    reference_blas: bool
    model_path: str | None = None
    files: list[FileCheck] = field(default_factory=list)
    model_problem: str | None = None
    huge_pages: str | None = None  # Linux transparent huge page mode (see hugepages.py)
    route: routes.HopRoute | None = None  # how this rank reaches the next one
    wired_limit_mb: int | None = None     # macOS: sysctl iogpu.wired_limit_mb (0: default)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def model_files(path: Path) -> list[str]:
    """config.json and the weights files a rank would load from this folder."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weights = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            weights = []
        return ["config.json", index.name, *weights]
    return ["config.json", *sorted(p.name for p in path.glob("*.safetensors"))]


def check_model(spec: str, expected: list[str] = ()) -> tuple[str, list[FileCheck], str | None]:
    """(path, files with size and sha256, problem) of the model as this rank sees it.
    `expected`: rank 0's file names, checked here too (a file rank 1 lacks is missing)."""
    path = Path(spec).expanduser()
    if hub_repo(spec):
        return spec, [], None  # each rank fetches only its own files when it loads
    if path.is_file():  # a .gguf file
        return str(path), [FileCheck(path.name, path.stat().st_size, _sha256(path))], None
    if not path.is_dir():
        return str(path), [], f"model folder {path} does not exist"
    checks = []
    names = list(expected) + [n for n in model_files(path) if n not in expected]
    for name in names:
        f = path / name
        checks.append(FileCheck(name, f.stat().st_size, _sha256(f)) if f.is_file()
                      else FileCheck(name, None))
    return str(path), checks, None


def collect(rank: int, model: str | None, expected: list[str] = (),
            next_hop: tuple[int, str, bool] | None = None) -> RankReport:
    """This rank's report; `next_hop`: (rank, host, same host as this one) of the next rank."""
    from mpi4py import MPI

    device, blas_name, reference = blas.describe()
    report = RankReport(rank, socket.gethostname(), platform.python_version(),
                        package_versions(), MPI.Get_library_version().splitlines()[0].strip(),
                        device, blas_name, reference)
    if sys.platform == "linux":
        report.huge_pages = hugepages.thp_mode()
    report.wired_limit_mb = wired.read_wired_limit_mb()
    if next_hop is not None:
        report.route = routes.route_to(rank, *next_hop)
    if model is not None:
        try:
            report.model_path, report.files, report.model_problem = check_model(model, expected)
        except OSError as e:
            report.model_problem = f"cannot read the model files ({e})"
    return report


def find_problems(reports: list[RankReport], caps: list[Capacity] | None, hops_large,
                  planned: list[int] | None = None,
                  hosts: list[HostEntry] | None = None) -> tuple[list[str], list[str]]:
    """(problems, warnings), each naming the rank and host. `planned`: each rank's weight
    bytes as a run would place them; `hosts`: each rank's hostfile line."""
    problems, warnings = [], []
    ref = reports[0]
    ref_files = {f.name: f for f in ref.files}
    for r in reports:
        who = f"rank {r.rank} ({r.host})"
        if r.rank != 0:
            if r.python != ref.python:
                problems.append(f"{who}: Python {r.python} differs from rank 0's {ref.python}")
            for name, version in r.packages.items():
                if version != ref.packages.get(name):
                    problems.append(f"{who}: {name} {version} differs from rank 0's "
                                    f"{ref.packages.get(name)}")
            if r.mpi_library != ref.mpi_library:
                problems.append(f"{who}: MPI library '{r.mpi_library}' differs from rank 0's "
                                f"'{ref.mpi_library}'")
        if r.reference_blas:
            warnings.append(f"{who}: uses the {r.blas} (~30x slower): "
                            f"apt-get install libopenblas0-pthread")
        if r.huge_pages == "never" and r.device == "cpu":
            warnings.append(f"{who}: transparent huge pages are off (one-sequence decode ~8% "
                            f"slower on CPU): echo madvise > "
                            f"/sys/kernel/mm/transparent_hugepage/enabled")
        cap = caps[r.rank] if caps else None
        if planned and cap is not None and cap.device == "gpu":
            note = wired.wired_limit_warning(planned[r.rank], r.wired_limit_mb,
                                             cap.memory_limit, cap.total_memory)
            if note:
                warnings.append(f"{who}: {note}")
        if r.model_problem:
            problems.append(f"{who}: {r.model_problem}")
        for f in r.files:
            if f.size is None:
                problems.append(f"{who}: {r.model_path}/{f.name} is missing")
                continue
            mine = ref_files.get(f.name)
            if r.rank == 0 or mine is None or mine.size is None:
                continue
            if (f.size, f.sha256) != (mine.size, mine.sha256):
                problems.append(f"{who}: {r.model_path}/{f.name} differs from rank 0's "
                                f"({f.size} bytes, sha256 {f.sha256[:12]} vs {mine.size} "
                                f"bytes, sha256 {mine.sha256[:12]})")
        if r.rank != 0 and ref.files and not r.files and not r.model_problem:
            problems.append(f"{who}: no model files where rank 0 has {len(ref.files)}")
    warnings += routes.route_warnings(
        [r.route for r in reports if r.route is not None],
        {i: e.iface for i, e in enumerate(hosts or [])},
        {i: e.line for i, e in enumerate(hosts or [])})
    for h in hops_large or []:
        if h.bandwidth < SLOW_LINK:
            warnings.append(f"link {h.src} -> {h.dst}: {h.bandwidth / 1e6:.3g} MB/s for 4 MiB "
                            f"messages, slower than 1 GbE: is MPI on the fast interface "
                            f"(PIPELINE_IFACE)?")
    return problems, warnings


def _fmt_seconds(s: float) -> str:
    return f"{s * 1e6:.3g} us" if s < 1e-3 else f"{s * 1e3:.3g} ms"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def tensor_parallel_line() -> str:
    """Whether this job could make tensor-parallel groups (MLX started MPI: wire/mpi.py)."""
    from pipeline.wire import mpi

    why = mpi.unavailable()
    if why is None:
        return "tensor parallel: available (MLX's MPI backend started; groups all-reduce in the graph)"
    return f"tensor parallel: unavailable ({why})"


def format_report(reports, caps, hops_small, hops_large, problems, warnings) -> str:
    hosts = {r.host for r in reports}
    lines = [f"pipeline doctor: {len(reports)} rank(s) on {len(hosts)} host(s); "
             f"MPI: {reports[0].mpi_library.split(',')[0]}", tensor_parallel_line(), ""]
    rows = [("rank", "host", "python", *PACKAGES, "device", "BLAS", "memory free/total",
             "bandwidth", "disk free", "model files")]
    for r, c in zip(reports, caps or [None] * len(reports)):
        memory = bw = disk = "?"
        if c is not None:
            free = fmt_bytes(c.available_memory) if c.available_memory is not None else "?"
            memory = f"{free} / {fmt_bytes(c.total_memory)}"
            bw = f"{c.bandwidth / 1e9:.3g} GB/s" if c.bandwidth else "?"
            disk = fmt_bytes(c.disk_free) if c.disk_free is not None else "?"
        present = [f for f in r.files if f.size is not None]
        files = "-" if r.model_path is None else (
            f"{len(present)}/{len(r.files)} ({fmt_bytes(sum(f.size for f in present))})"
            if r.files else "not checked" if not r.model_problem else "missing")
        rows.append((str(r.rank), r.host, r.python, *(r.packages.get(p, "?") for p in PACKAGES),
                     f"{r.device} {c.device_name}" if c else r.device,
                     r.blas.split(" (")[0], memory, bw, disk, files))
    lines += _table(rows)
    if hops_small:
        lines.append("")
        large = {(h.src, h.dst): h for h in hops_large or []}
        route = {(r.route.src, r.route.dst): r.route for r in reports if r.route is not None}
        rows = [("link", f"latency ({SMALL_MESSAGE} B, one way)",
                 f"bandwidth ({LARGE_MESSAGE // 2**20} MiB)", "interface")]
        for h in hops_small:
            big = large.get((h.src, h.dst))
            via = route.get((h.src, h.dst))
            rows.append((f"{h.src} -> {h.dst}", _fmt_seconds(h.one_way_s),
                         f"{big.bandwidth / 1e9:.3g} GB/s" if big else "?",
                         via.label if via else "?"))
        lines += _table(rows)
    model = reports[0].model_path
    if model is not None:
        lines.append("")
        lines.append(f"model: {model} ({', '.join(f.name for f in reports[0].files) or 'no files'};"
                     f" sizes and sha256 compared with rank 0's)" if reports[0].files
                     else f"model: {model} (files not compared: "
                     + ("fetched per rank from the hub)" if hub_repo(model) else "none found)"))
    else:
        lines += ["", "model: not checked (give --model)"]
    for title, items in (("warnings", warnings), ("problems", problems)):
        if items:
            lines += ["", f"{title}:", *(f"  - {x}" for x in items)]
    lines += ["", f"doctor: {len(problems)} problem(s)" if problems else "doctor: no problems"]
    return "\n".join(lines)


def rank_hosts(hostfile: str | None, size: int) -> tuple[list[HostEntry] | None, str | None]:
    """Each rank's hostfile line (mpirun's mapping by slot), or why there is none."""
    if hostfile is None:
        return None, None
    try:
        slots = rank_entries(read_hostfile(hostfile))
    except HostfileError as e:
        return None, str(e)
    if len(slots) < size:
        return None, (f"{hostfile} has {len(slots)} slots but the job has {size} ranks: "
                      f"is it the hostfile mpirun was given?")
    return slots[:size], None


def planned_weights(model: str | None, caps: list[Capacity] | None,
                    hostfile: str | None) -> tuple[list[int] | None, str | None]:
    """Rank 0: each rank's weight bytes as a run would place the model (a folder here), or
    why the run would refuse to place it."""
    if model is None or caps is None or not Path(model).expanduser().is_dir():
        return None, None
    from pipeline.model.load import default_dtype, read_config
    from pipeline.model.spec import resolve_model
    from pipeline.commands.plan import PLAN_ERRORS
    from pipeline.place.preflight import preflight_plan

    try:
        path = resolve_model(model)
        plan = preflight_plan(path, read_config(path), caps, hostfile=hostfile,
                              dtype=default_dtype())
    except PLAN_ERRORS as e:  # PlanError is a SplitError
        return None, f"a run would not start: {e}"
    return [r.weight_bytes for r in plan.ranks], None


def run_doctor(model: str | None, comm, out=None, hostfile: str | None = None) -> int:
    """Check every rank of `comm` (collective); rank 0 prints. Returns the exit code,
    the same on every rank: 0, or 1 when there is a problem. `hostfile`: the one mpirun was
    given, for the hosts' names and their `iface=` (without it: the ranks' hostnames)."""
    out = out or sys.stdout
    rank, size = comm.Get_rank(), comm.Get_size()
    caps, cap_error = None, None
    try:
        caps = gather_capacities(comm, model)
    except CapacityError as e:
        cap_error = str(e)
    expected, hosts, host_error = None, None, None
    if rank == 0:
        if model is not None and Path(model).expanduser().is_dir():
            expected = model_files(Path(model).expanduser())
        hosts, host_error = rank_hosts(hostfile, size)
    expected, hosts = comm.bcast((expected, hosts), root=0)
    hostnames = comm.allgather(socket.gethostname())
    next_hop = None
    if size > 1:
        dst = (rank + 1) % size
        next_hop = (dst, hosts[dst].host if hosts else hostnames[dst],
                    hostnames[dst] == hostnames[rank])
    try:
        report = collect(rank, model, expected or [], next_hop)
    except Exception as e:  # reported as this rank's problem; no rank is left waiting
        report = RankReport(rank, socket.gethostname(), platform.python_version(), {}, "?",
                            "?", "?", False, model_problem=f"doctor failed here: "
                            f"{type(e).__name__}: {e}")
    reports = comm.gather(report, root=0)
    hops_small = measure_hops(comm, SMALL_MESSAGE, reps=50)
    hops_large = measure_hops(comm, LARGE_MESSAGE, reps=10)
    code = 0
    if rank == 0:
        planned, plan_error = planned_weights(model, caps, hostfile if hosts else None)
        problems, warnings = find_problems(reports, caps, hops_large, planned, hosts)
        problems += [e for e in (cap_error, host_error, plan_error) if e]
        print(format_report(reports, caps, hops_small, hops_large, problems, warnings),
              file=out, flush=True)
        code = EXIT_PROBLEMS if problems else 0
    return comm.bcast(code, root=0)

"""OpenMPI hostfiles, plus what each host brings to the planner.

A line is `host [slots=N] [max_slots=M]`, `#` starts a comment, blank lines are skipped
(OpenMPI's own syntax, so the same file goes to `mpirun -hostfile`). Our additions live in
a trailing comment that mpirun ignores:

    192.168.1.20 slots=1   # pipeline: mem=128G bw=546G iface=bridge0 chip="M4 Max" name="MacBook Pro"

- `mem`: the host's memory, or a lower cap for headroom. K/M/G/T are binary (64G = 64 GiB:
  Apple's "64 GB" Macs have 64 GiB). The ranks on one line share it equally.
- `bw`: memory bandwidth in bytes per second; K/M/G/T are decimal here (273G = 273 GB/s,
  as Apple publishes it). A trailing `B/s` is allowed.
- `iface`: the network interface the other hosts should reach this one by (`bridge0` for a
  Thunderbolt bridge): `doctor` warns when the route from the previous rank leaves by
  another, e.g. Wi-Fi on the same subnet.
- `lat`: the one-way latency of this host's network link, with a unit: `lat=8us`,
  `lat=0.3ms`, `lat=1e-4s`. The planner reads a link between two hosts as the slower end's;
  ranks of one host talk through shared memory (place/groups.py SAME_HOST_LATENCY_S). It
  decides whether tensor parallel pays across that link; measured hops (mpirun) replace it.
- `flops`: the rate of its matrix products in FLOP/s, decimal units (`flops=18T`): with it the
  planner counts a batched step's arithmetic, which past some sequences takes longer than
  reading the weights (where a pipeline's micro-batches pay); measured under mpirun.
- `chip`, `name`: free text for tables.

Ranks map to lines in slot order (mpirun's default `--map-by slot`): rank 0 takes the first
line's first slot. A line without `slots=` counts as one slot: mpirun accepts a host listed
once per slot that way (one line per rank, each with its own `mem=`), but not a host on
several lines with `slots=`. Values with spaces go in double quotes.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ANNOTATION = "pipeline:"
_OMPI_KEYS = {"slots", "max_slots", "max-slots", "slots_max"}
_ANNOTATION_KEYS = {"mem", "bw", "lat", "flops", "iface", "chip", "name"}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?$", re.IGNORECASE)
_EXPONENT = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
_DURATION = re.compile(r"^(\d+(?:\.\d*)?(?:e[-+]?\d+)?)\s*(us|µs|ms|s)$", re.IGNORECASE)
_SECONDS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}


class HostfileError(ValueError):
    """A hostfile line that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class HostEntry:
    """One hostfile line."""

    host: str
    slots: int | None = None           # None: not given (mpirun then uses the host's cores)
    memory_bytes: int | None = None    # `mem=`: the host's memory (shared by its slots)
    bandwidth: float | None = None     # `bw=`: memory bandwidth, bytes/s
    latency_s: float | None = None     # `lat=`: one-way latency of its link, seconds
    flops: float | None = None         # `flops=`: matrix-product rate, FLOP/s
    iface: str | None = None           # `iface=`: the interface this host is reached by
    chip: str | None = None
    name: str | None = None
    line: int = 0

    @property
    def label(self) -> str:
        """`host (name, chip)` for tables."""
        extra = ", ".join(x for x in (self.name, self.chip) if x)
        return f"{self.host} ({extra})" if extra else self.host


def parse_size(text: str, binary: bool = True) -> int:
    """'64G' -> 64 * 2**30 (binary) or 64e9 (decimal); '512M', '1.5T', '1024' also work."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"'{text}' is not a size such as 64G, 512M or 1.5T")
    value, unit = float(m.group(1)), m.group(2).lower()
    return int(round(value * (1024 if binary else 1000) ** _EXPONENT[unit]))


def parse_bandwidth(text: str, what: str = "bandwidth") -> float:
    """'273G', '273GB/s' or '273e9' -> bytes per second (decimal units); the same for a
    FLOP rate ('18T')."""
    body = text.strip()
    if body.lower().endswith("/s"):
        body = body[:-2]
    try:
        value = float(body)
    except ValueError:
        value = float(parse_size(body, binary=False))
    if value <= 0:
        raise ValueError(f"'{text}' is not a positive {what}")
    return value


def parse_latency(text: str) -> float:
    """'8us', '0.3ms' or '1e-4s' -> seconds; a unit is required (a bare 8 is ambiguous)."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"'{text}' is not a latency such as 8us, 0.3ms or 0.001s")
    seconds = float(m.group(1)) * _SECONDS[m.group(2).lower()]
    if seconds <= 0:
        raise ValueError(f"'{text}' is not a positive latency")
    return seconds


def _parse_annotation(text: str) -> dict:
    try:
        words = shlex.split(text)
    except ValueError as e:  # an unclosed quote
        raise ValueError(f"cannot read '{text.strip()}' ({e})") from None
    fields = {}
    for word in words:
        key, eq, value = word.partition("=")
        if not eq or not value:
            raise ValueError(f"'{word}' is not key=value")
        if key not in _ANNOTATION_KEYS:
            raise ValueError(f"unknown key '{key}' (use {', '.join(sorted(_ANNOTATION_KEYS))})")
        if key == "mem":
            fields["memory_bytes"] = parse_size(value)
            if fields["memory_bytes"] <= 0:
                raise ValueError(f"mem={value} must be positive")
        elif key == "bw":
            fields["bandwidth"] = parse_bandwidth(value)
        elif key == "lat":
            fields["latency_s"] = parse_latency(value)
        elif key == "flops":
            fields["flops"] = parse_bandwidth(value, "rate")
        else:
            fields[key] = value
    return fields


def _parse_line(raw: str, number: int) -> HostEntry | None:
    body, hash_, comment = raw.partition("#")
    words = body.split()
    if not words:
        return None
    fields: dict = {"host": words[0], "line": number}
    for word in words[1:]:
        key, eq, value = word.partition("=")
        if not eq or key not in _OMPI_KEYS:
            raise ValueError(f"'{word}' is not slots=N or max_slots=N")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"'{word}': {key} must be a positive integer")
        if key == "slots":
            fields["slots"] = int(value)
    comment = comment.strip()
    if hash_ and comment.startswith(ANNOTATION):
        fields.update(_parse_annotation(comment[len(ANNOTATION):]))
    return HostEntry(**fields)


def parse_hostfile_text(text: str, source: str = "<hostfile>") -> list[HostEntry]:
    """Parse hostfile text; errors read `SOURCE:LINE: why`."""
    entries: list[HostEntry] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        try:
            entry = _parse_line(raw, number)
        except ValueError as e:
            raise HostfileError(f"{source}:{number}: {e}") from None
        if entry is None:
            continue
        first = next((e for e in entries if e.host == entry.host), None)
        if first is not None and (first.slots or entry.slots):
            raise HostfileError(
                f"{source}:{number}: {entry.host} is already on line {first.line}: give a host "
                f"one line with slots=N, or one line per slot without slots= (as mpirun wants)")
        entries.append(entry)
    if not entries:
        raise HostfileError(f"{source}: no hosts (one `host slots=N` line per machine)")
    return entries


def read_hostfile(path: str | Path) -> list[HostEntry]:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise HostfileError(f"cannot read hostfile {path} ({e})") from None
    return parse_hostfile_text(text, str(path))


def rank_entries(entries: list[HostEntry]) -> list[HostEntry]:
    """The entry of every slot, in rank order (mpirun's default mapping by slot).

    A line without `slots=` counts as one slot here (mpirun would use the host's cores).
    """
    return [e for e in entries for _ in range(e.slots or 1)]

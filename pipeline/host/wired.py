"""Metal's wired memory: a Mac's GPU keeps weights resident only up to a wired limit.

MLX wires nothing by default; mlx-lm raises MLX's wired limit to the device's recommended
working set while it generates (generate.py `wired_limit`) and warns when the model is over
90% of that size. A rank here does the same once its stage is loaded, for the whole job
(`set_wired_limit`). macOS itself caps wired GPU memory with the `iogpu.wired_limit_mb` sysctl
(0: its default, e.g. 107.5 GiB of 128; the recommended working set follows it), which
`doctor` reads on each Mac and compares with the rank's planned share of the weights. The
decisions are pure functions over numbers and command output, tested on Linux.
"""

from __future__ import annotations

import subprocess
import sys

from pipeline.place.planner import fmt_bytes

NEAR_LIMIT = 0.9  # mlx-lm's threshold: weights above this share of the wired limit run slow
MiB = 2**20


def suggested_wired_limit_mb(total_memory: int) -> int:
    """A value for `iogpu.wired_limit_mb` that leaves macOS 1/8 of the memory (at least
    4 GiB): 114688 on a 128 GiB Mac, 57344 on 64 GiB."""
    total_mb = total_memory // MiB
    return total_mb - max(4096, total_mb // 8)


def _advice(weight_bytes: int, total_memory: int | None) -> str:
    if not total_memory:
        return ("raise macOS's GPU wired limit above the weights (sudo sysctl "
                "iogpu.wired_limit_mb=N, in MiB, below the Mac's memory) or give this rank "
                "fewer layers (--split)")
    n = suggested_wired_limit_mb(total_memory)
    if weight_bytes >= NEAR_LIMIT * n * MiB:
        return (f"the weights need nearly all of its {fmt_bytes(total_memory)}: give this rank "
                f"fewer layers (--split) or use a smaller quantization")
    return (f"raise macOS's GPU wired limit: sudo sysctl iogpu.wired_limit_mb={n} (leaves "
            f"macOS {fmt_bytes(total_memory - n * MiB)}; reset at reboot) or give this rank "
            f"fewer layers (--split)")


def working_set_warning(weight_bytes: int, recommended: int,
                        total_memory: int | None = None) -> str | None:
    """After load, as mlx-lm warns: None, or why this rank's weights may decode slowly."""
    if weight_bytes <= NEAR_LIMIT * recommended:
        return None
    return (f"its weights ({fmt_bytes(weight_bytes)}) are over {NEAR_LIMIT:.0%} of Metal's "
            f"recommended working set ({fmt_bytes(recommended)}), so decoding may be slow: "
            + _advice(weight_bytes, total_memory))


def parse_wired_limit_mb(text: str | None) -> int | None:
    """`sysctl -n iogpu.wired_limit_mb` output -> MiB (0: macOS's default); None when the
    sysctl is missing (macOS before 14) or the output is not a number."""
    text = (text or "").strip()
    return int(text) if text.isdigit() else None


def wired_limit_bytes(wired_limit_mb: int | None, recommended: int | None) -> int | None:
    """The GPU's wired limit: the sysctl when set, else Metal's recommended working set
    (macOS's default, which the sysctl also moves); None when neither is known."""
    if wired_limit_mb:
        return wired_limit_mb * MiB
    return recommended or None


def wired_limit_warning(weight_bytes: int, wired_limit_mb: int | None, recommended: int | None,
                        total_memory: int | None) -> str | None:
    """doctor, per GPU rank: None, or why its planned weights will not stay wired."""
    limit = wired_limit_bytes(wired_limit_mb, recommended)
    if limit is None or weight_bytes <= NEAR_LIMIT * limit:
        return None
    setting = (f"iogpu.wired_limit_mb={wired_limit_mb}" if wired_limit_mb
               else "macOS's default, iogpu.wired_limit_mb=0")
    return (f"its planned weights ({fmt_bytes(weight_bytes)}) are over {NEAR_LIMIT:.0%} of the "
            f"GPU wired limit ({fmt_bytes(limit)}, {setting}): "
            + _advice(weight_bytes, total_memory))


def read_wired_limit_mb() -> int | None:
    """This Mac's `iogpu.wired_limit_mb`; None elsewhere or when it cannot be read."""
    if sys.platform != "darwin":
        return None
    try:
        out = subprocess.run(["sysctl", "-n", "iogpu.wired_limit_mb"], capture_output=True,
                             text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_wired_limit_mb(out)


def set_wired_limit(weight_bytes: int) -> str | None:
    """On Metal, wire up to the recommended working set (mlx-lm's `wired_limit`, kept for
    the job's life) and return a warning when this rank's weights are near it. Elsewhere
    (a CPU: nothing to wire) do nothing and return None."""
    import mlx.core as mx

    if not mx.metal.is_available():
        return None
    get_info = getattr(mx, "device_info", None) or mx.metal.device_info
    info = get_info()
    recommended = info.get("max_recommended_working_set_size")
    if not recommended:
        return None
    mx.set_wired_limit(int(recommended))
    return working_set_warning(weight_bytes, int(recommended), info.get("memory_size"))

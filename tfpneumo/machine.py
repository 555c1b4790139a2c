"""This machine's CPU as Linux's /proc/cpuinfo describes it (nothing known elsewhere)."""

from __future__ import annotations

import contextlib
from pathlib import Path

# CPU flags of bfloat16 arithmetic units (Intel AMX, AVX-512 BF16); without one, TensorFlow
# emulates bfloat16 on a CPU, and it runs slower than float32.
BFLOAT16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_info(path: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str]]:
    """(model name, flags) of the first CPU listed; ``("", set())`` where there is no such
    file."""
    model, flags = "", set()
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return model, flags


def bfloat16_emulated(flags: set[str], gpus: int) -> bool:
    """Whether bfloat16 would run without hardware for it: no GPU and none of
    :data:`BFLOAT16_FLAGS` (an unknown CPU, no flags at all, counts as having them)."""
    return gpus == 0 and bool(flags) and not any(f in flags for f in BFLOAT16_FLAGS)

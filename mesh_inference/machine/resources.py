"""How much memory this node offers the mesh.

Measured once at start (or taken from ``--max-vram``): the engine's own use
of memory must not make the mesh re-plan itself.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import psutil

GIB = 1 << 30


@dataclass(frozen=True)
class MemoryOffer:
    bytes: int
    kind: str  # "vram" | "ram" | "override" | "none"
    detail: str


def gb_to_bytes(gb: float) -> int:
    if not gb >= 0 or gb > 1 << 20:  # also rejects NaN
        raise ValueError(f"memory must be between 0 and 1048576 GB, got {gb}")
    return int(gb * GIB)


def _nvidia_free_bytes() -> int | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        mib = sum(int(line.strip()) for line in out.splitlines() if line.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return mib * (1 << 20) if mib > 0 else None


def detect_memory(max_vram_gb: float | None, client: bool) -> MemoryOffer:
    """Memory this node contributes: override, free VRAM, else available RAM."""
    if client:
        return MemoryOffer(0, "none", "client nodes contribute nothing")
    if max_vram_gb is not None:
        return MemoryOffer(gb_to_bytes(max_vram_gb), "override", f"--max-vram {max_vram_gb:g}")
    vram = _nvidia_free_bytes()
    if vram is not None:
        return MemoryOffer(vram, "vram", "free VRAM (nvidia-smi)")
    avail = int(psutil.virtual_memory().available)
    # Leave headroom for the OS and the sidecar itself on CPU-only nodes.
    usable = max(0, avail - GIB // 2)
    return MemoryOffer(usable, "ram", "available RAM minus 0.5 GiB")

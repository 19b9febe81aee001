"""Where compiled kernels are kept between runs: one on-disk cache per user, outside /tmp.

TorchInductor writes the C++ (or Triton) code it generates, and the compiler's output, to
TORCHINDUCTOR_CACHE_DIR, by default a directory under /tmp that many machines empty at every
boot. A worker whose kernels are not in the cache spends seconds per kernel in the compiler
(about 50 s for every preset scheme on a 2-core CPU, `quantfleet compile-kernels`), and a
conversion's first unit waits for it. quantfleet keeps that cache under the user's cache
directory instead, so `setup.sh` compiles once and every later process, run and boot reuses it.

A TORCHINDUCTOR_CACHE_DIR set by the user is kept. Inductor keys its entries by torch version,
device and the code of each kernel, so one directory serves several installs.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["kernel_cache_dir", "use_kernel_cache"]

_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"


def kernel_cache_dir() -> Path | None:
    """The cache directory processes of this user compile into; None when there is no home
    directory to put it in (Inductor's default under /tmp is used then)."""
    configured = os.environ.get(_VARIABLE)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no HOME and no passwd entry (some containers)
            return None
    return Path(base) / "quantfleet" / "inductor"


def use_kernel_cache() -> Path | None:
    """Point this process's Inductor at quantfleet's cache and return it; call before the first
    compile (Inductor reads the variable at each cache access, so a worker may call it per task).
    A directory that cannot be created (a read-only home) leaves Inductor's default in place:
    compiling into it must never be the reason a conversion fails."""
    directory = kernel_cache_dir()
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    os.environ[_VARIABLE] = str(directory)
    return directory

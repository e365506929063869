"""The CPU noise kernel (``_noise.c``): built once per machine with the system C compiler,
cached on disk, loaded with ``ctypes``.

Why a kernel of our own: PyTorch's CPU generator keeps 32 bits of a seed and must be reseeded
per segment from Python (some 7 µs each), while a model's noise is one segment per (node,
sample). The kernel is counter-based (Philox-4x32-10 keyed by the whole 64-bit key), derives
the segment keys itself and writes ``mu + sigma * eps``: one call per draw, no per-segment
Python. ``ctypes`` releases the GIL during the call, so ``_noise`` spreads a call over threads.

The build takes about half a second, once: the library is cached under
``$TBFUNC_CACHE_DIR`` (default ``$XDG_CACHE_HOME/tbfunc`` or ``~/.cache/tbfunc``), named by a
hash of the source, the compiler, the flags and the CPU's feature flags (the build targets
the CPU it runs on), so a shared home directory on mixed machines keeps one build per kind.
Without a C compiler, or with ``TBFUNC_NATIVE=0``, ``kernel()`` is None and ``_noise`` uses
``tbfunc._philox``, the same algorithm in tensor ops: the same bits, several times slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

__all__ = ["kernel"]

_SOURCE = Path(__file__).with_name("_noise.c")
# -ffp-contract=off: no FMA contraction, so the vectorised and scalar code and tbfunc._philox
# round alike. -fno-trapping-math lets the compiler vectorise the selects (it only drops the
# promise about floating-point exception flags); no -ffast-math, which would reorder.
_FLAGS = [
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fPIC",
    "-shared",
]
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_I32 = ctypes.c_int32


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The loaded library, or None (no compiler, a failed build, or ``TBFUNC_NATIVE=0``)."""
    if os.environ.get("TBFUNC_NATIVE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _unavailable("no C compiler (cc, gcc or $CC) was found")
        return None
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as error:
        _unavailable(f"building it failed: {error}")
        return None
    library.tb_fill.argtypes = [_I32, _I32, _P, _P, _I64, _I64, _I64, _P, _I64, _P, _P, _P, _P]
    library.tb_fill.restype = None
    library.tb_fold_in.argtypes = [_I64, _P, _P]
    library.tb_fold_in.restype = None
    library.tb_split.argtypes = [_I64, _I64, _I64, _P]
    library.tb_split.restype = None
    library.tb_philox.argtypes = [_I64, _I64, _I64, _P]
    library.tb_philox.restype = None
    return library


def _build(compiler: str) -> Path:
    """The cached library, built first if need be; without ``-march=native`` where the
    compiler refuses it (older clang on ARM), with the same bits (no FMA contraction either
    way), only less vectorised."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    failure: subprocess.SubprocessError | None = None
    for flags in (_FLAGS, [flag for flag in _FLAGS if flag != "-march=native"]):
        try:
            return _built(compiler, version, flags)
        except subprocess.CalledProcessError as error:
            failure = error
    assert failure is not None
    raise failure


def _built(compiler: str, version: str, flags: list[str]) -> Path:
    digest = hashlib.sha256()
    for part in (_SOURCE.read_text(), compiler, version, " ".join(flags), _cpu_fingerprint()):
        digest.update(part.encode())
    folder = _cache_dir()
    target = folder / f"noise-{digest.hexdigest()[:20]}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    # build beside the target, then rename: concurrent processes never load a half-written file
    handle, partial = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(handle)
    try:
        subprocess.run(
            [compiler, *flags, str(_SOURCE), "-o", partial],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _cache_dir() -> Path:
    explicit = os.environ.get("TBFUNC_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tbfunc"


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the machine and its instruction-set flags."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as info:
            parts += [
                line for line in info if line.startswith(("flags", "Features", "model name"))
            ][:3]
    except OSError:
        pass
    return "\n".join(parts)


def _unavailable(reason: str) -> None:
    warnings.warn(
        f"tbfunc's CPU noise kernel is unavailable ({reason}); drawing with the tensor-op "
        "version of the same generator instead: the same numbers, several times slower. "
        "Install a C compiler (or set CC) to get the fast kernel.",
        RuntimeWarning,
        stacklevel=4,
    )

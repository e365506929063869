"""The CPU kernels (noise: ``_noise.c``; training steps: ``_train.c``): built once per machine
with the system C compiler, cached on disk, loaded with ``ctypes``.

Why a kernel of our own: PyTorch's CPU generator keeps 32 bits of a seed and must be reseeded
per segment from Python (some 7 µs each), while a model's noise is one segment per (node,
sample). The kernel is counter-based (Philox-4x32-10 keyed by the whole 64-bit key), derives
the segment keys itself and writes ``mu + sigma * eps``: one call per draw, no per-segment
Python. ``ctypes`` releases the GIL during the call, so ``_noise`` spreads a call over threads.

Threads: where torch runs on the GNU OpenMP runtime (``libgomp.so.1``, as its Linux wheels do),
the library is built with ``-fopenmp`` and so shares that runtime: its ``*_parts`` functions
run a call's parts on torch's own team of threads (``_parts.h``; ``team()`` says whether they
do). Elsewhere ``tbfunc._parallel`` runs the parts on a pool of tbfunc's own threads.

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
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

__all__ = ["kernel"]

# the noise kernel, the training kernels and the polynomials both use: one library
_SOURCES = [Path(__file__).with_name(name) for name in ("_noise.c", "_train.c")]
_HEADERS = [Path(__file__).with_name(name) for name in ("_cephes.h", "_parts.h")]
# -ffp-contract=off: no FMA contraction, so the noise kernel's vectorised and scalar code and
# tbfunc._philox round alike (_train.c turns contraction back on for the training kernels,
# which need agree with tensor ops only to rounding). -fno-trapping-math lets the compiler
# vectorise the selects (it only drops the promise about floating-point exception flags); no
# -ffast-math, which would reorder.
_FLAGS = [
    "-O3",
    "-march=native",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fPIC",
    "-shared",
]
# added where torch's OpenMP runtime is one the library can share (``_flag_choices``)
_OPENMP = "-fopenmp"
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_I32 = ctypes.c_int32


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The loaded library, or None (no compiler, a failed build, or ``TBFUNC_NATIVE=0``)."""
    if os.environ.get("TBFUNC_NATIVE", "1") == "0":
        return None
    command, origin = _compiler()
    if not command:
        _unavailable(
            "no C compiler was found (looked for $CC, cc and gcc)", "Install one (or set CC)"
        )
        return None
    if shutil.which(command[0]) is None:
        _unavailable(
            f"the compiler {command[0]!r} ({origin}) was not found",
            "Fix CC or install it" if origin == "from $CC" else "Install one (or set CC)",
        )
        return None
    try:
        version = subprocess.run(
            [*command, "--version"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
        path, note = _cached(command, version)
        library = _load(path)
        if library is None:  # a whole file that is no build of this source: build it again
            path.unlink(missing_ok=True)
            path, note = _cached(command, version)
            library = _load_fresh(path)
    except (OSError, subprocess.SubprocessError) as error:
        _unavailable(f"building it with {' '.join(command)!r} failed: {_short(error)}", "")
        return None
    if library is None:
        _unavailable(f"the library built at {path} lacks the kernel's functions", "")
        return None
    if note:
        _warn(note)
    return library


_SYMBOLS = (
    "tb_fill",
    "tb_fold_in",
    "tb_split",
    "tb_philox",
    "tb_draw_grad",
    "tb_kl",
    "tb_kl_grad",
    "tb_adam",
    "tb_von",
)
# the same kernels over a call's parts, on torch's OpenMP team (_parts.h); optional, like
# tb_finite, so that benchmarks.kernel_ab can load older builds
_PART_SYMBOLS = (
    "tb_fill_parts",
    "tb_draw_grad_parts",
    "tb_kl_parts",
    "tb_kl_grad_parts",
    "tb_adam_parts",
    "tb_von_parts",
    "tb_finite_parts",
)


def _load(path: Path) -> ctypes.CDLL | None:
    """The library with its signatures set, or None if it lacks a function (then it is no
    build of this source, whatever its name says)."""
    library = ctypes.CDLL(str(path))
    if not all(hasattr(library, name) for name in _SYMBOLS):
        return None
    library.tb_fill.argtypes = [_I32, _I32, _P, _P, _I64, _I64, _I64, _P, _I64, _P, _P, _P, _P, _P]
    library.tb_fill.restype = None
    library.tb_fold_in.argtypes = [_I64, _P, _P]
    library.tb_fold_in.restype = None
    library.tb_split.argtypes = [_I64, _I64, _I64, _P]
    library.tb_split.restype = None
    library.tb_philox.argtypes = [_I64, _I64, _I64, _P]
    library.tb_philox.restype = None
    library.tb_draw_grad.argtypes = [
        *(_I32, _I64, _P, _I64, _P, _P, _P, _P, _P, ctypes.c_double, _P, _P, _P, _P, _P, _P),
        *(_I64, _I64),
    ]
    library.tb_kl.argtypes = [_I32, _I64, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _P]
    library.tb_kl_grad.argtypes = [
        *(_I32, _I64, _P, ctypes.c_double, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64)
    ]
    library.tb_adam.argtypes = [_I32, _I64, _P, _P, _P, _P, _P, _P, _P, _I64, _I64]
    library.tb_von.argtypes = [_I32, _I64, *([_P] * 11), _I64, _I64, _P]
    for name in ("tb_draw_grad", "tb_kl", "tb_kl_grad", "tb_adam", "tb_von"):
        getattr(library, name).restype = None
    if hasattr(library, "tb_finite"):  # optional: benchmarks.kernel_ab loads older builds
        library.tb_finite.argtypes = [_I64, _P, _P, _P, _I64, _I64, _P]
        library.tb_finite.restype = None
    if hasattr(library, "tb_bbb_adam"):  # optional, as tb_finite
        library.tb_bbb_adam.argtypes = [_I32, _I64, *([_P] * 16), _I64, _I64, _P]
        library.tb_bbb_adam.restype = None
    if all(hasattr(library, name) for name in (*_PART_SYMBOLS, "tb_openmp")):
        _set_part_signatures(library)
    return library


def _set_part_signatures(library: ctypes.CDLL) -> None:
    """Each ``*_parts`` function takes its kernel's arguments with ``(begin, end)`` replaced by
    ``(total, parts)``, two int64 in the same place (``tb_fill_parts``: moved to the end);
    ``tb_kl_parts`` and ``tb_finite_parts`` write one result per part."""
    fill = library.tb_fill.argtypes
    library.tb_fill_parts.argtypes = [*fill[:4], *fill[6:], _I64, _I64]
    for name in ("tb_draw_grad", "tb_kl", "tb_kl_grad", "tb_adam", "tb_von", "tb_finite"):
        getattr(library, name + "_parts").argtypes = getattr(library, name).argtypes
    if hasattr(library, "tb_bbb_adam_parts"):
        library.tb_bbb_adam_parts.argtypes = library.tb_bbb_adam.argtypes
        library.tb_bbb_adam_parts.restype = None
    for name in _PART_SYMBOLS:
        getattr(library, name).restype = None
    library.tb_openmp.argtypes = []
    library.tb_openmp.restype = _P


def team(library: ctypes.CDLL) -> bool:
    """Whether ``library``'s ``*_parts`` functions run on torch's own OpenMP team: the library
    was built with OpenMP, its OpenMP calls reach torch's runtime (``_shares_openmp``), and
    this is no forked child. ``TBFUNC_OPENMP=0`` (read at every
    call: the benchmarks compare both) sends the parts to tbfunc's thread pool instead.

    A forked child keeps the pool route: GNU OpenMP is not fork-safe, and a child whose parent
    had started a team waits forever for that team's threads in its first parallel region
    (torch's own parallel ops hang there too; tbfunc's pool makes new threads in the child)."""
    if _forked or os.environ.get("TBFUNC_OPENMP", "1") == "0":
        return False
    return _shares_openmp(library)


_forked = False


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


@functools.cache
def _shares_openmp(library: ctypes.CDLL) -> bool:
    """The library's OpenMP calls reach torch's runtime: the same function address (a second
    runtime loaded for the library, or a build without OpenMP, fails)."""
    reached = library.tb_openmp() if hasattr(library, "tb_openmp") else None
    runtime = _openmp_runtime()
    if not reached or runtime is None:
        return False
    own = ctypes.CDLL(runtime).omp_get_max_threads  # already loaded: the same handle
    return bool(reached == ctypes.cast(own, ctypes.c_void_p).value)


@functools.cache
def _openmp_runtime() -> str | None:
    """The path of torch's OpenMP runtime where the library can share it: torch runs its
    intra-op threads on OpenMP, on GNU's runtime under its usual name (``libgomp.so.1``, the
    name a ``-fopenmp`` build asks the loader for, which then hands it the copy already
    loaded). None elsewhere (another runtime, a renamed copy, no ``/proc``). Other packages'
    renamed copies (scikit-learn ships ``libgomp-<hash>.so.1``) do not count."""
    import torch  # already imported by the time a kernel builds; not at this module's import

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    found = {path for path in _openmp_libraries() if Path(path).name == "libgomp.so.1"}
    return next(iter(found)) if len(found) == 1 else None


def _openmp_libraries() -> set[str]:
    """The OpenMP runtimes mapped into this process (Linux), by path."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return set()
    names = ("libgomp", "libiomp", "libomp")
    return {path for path in paths if Path(path).name.startswith(names)}


def _load_fresh(path: Path) -> ctypes.CDLL | None:
    """``_load`` through a private copy: the dynamic loader hands back the library already
    loaded under a path, so the rebuilt file must be opened under another name."""
    handle, copy = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(handle)
    try:
        shutil.copyfile(path, copy)
        return _load(Path(copy))
    finally:
        os.unlink(copy)  # the mapping outlives the name


def _compiler() -> tuple[list[str], str]:
    """The compiler command, split as a shell splits ``$CC`` (``CC="ccache gcc"``)."""
    explicit = os.environ.get("CC")
    if explicit:
        return shlex.split(explicit), "from $CC"
    found = shutil.which("cc") or shutil.which("gcc")
    return ([found], "found on PATH") if found else ([], "")


def _cached(command: list[str], version: str) -> tuple[Path, str]:
    """The verified cached library, built first if need be; without ``-march=native`` where
    the compiler refuses it (older clang on ARM), with the same noise (no FMA contraction either
    way), only less vectorised; the training kernels then lose their FMAs (to rounding). Also a
    note to warn with, or ""."""
    failure: subprocess.SubprocessError | None = None
    for flags in _flag_choices():
        try:
            return _built(command, version, flags)
        except subprocess.CalledProcessError as error:
            failure = error
    assert failure is not None
    raise failure


def _flag_choices() -> list[list[str]]:
    """The builds to try, best first: with torch's OpenMP threads where they can be shared
    (``_openmp_runtime``), then without ``-march=native``, as before."""
    portable = [flag for flag in _FLAGS if flag != "-march=native"]
    choices = [_FLAGS, portable]
    if _openmp_runtime() is not None:
        choices = [[*_FLAGS, _OPENMP], [*portable, _OPENMP], *choices]
    return choices


def preferred_flags() -> list[str]:
    """The flags of the first build tried here (``benchmarks.kernel_ab`` builds with them)."""
    return _flag_choices()[0]


def library_name(command: list[str], version: str, flags: list[str]) -> str:
    """The cached library's file name: a hash of everything the build depends on (every source
    and header, the compiler command and its version, the flags, the CPU's feature flags), each
    part length-prefixed so no two different sets of parts hash alike."""
    digest = hashlib.sha256()
    sources = [path.read_text() for path in (*_SOURCES, *_HEADERS)]
    for part in (*sources, " ".join(command), version, " ".join(flags), _cpu_fingerprint()):
        data = part.encode()
        digest.update(len(data).to_bytes(8, "little") + data)
    return f"noise-{digest.hexdigest()[:20]}.so"


def _built(command: list[str], version: str, flags: list[str]) -> tuple[Path, str]:
    name = library_name(command, version, flags)
    folder, note = _writable(_cache_dir())
    target = folder / name
    if _verified(target):
        return target, note
    if target.exists() and _sidecar(target).exists():
        # truncated (a copy or sync cut short, a full disk), or changed: never load it (a short
        # ELF kills Python with SIGBUS); build it again. (Without a checksum beside it the
        # file predates checksums, or its build was cut short: rebuilt without a word.)
        note = note or f"the cached kernel {target} did not match its checksum and was rebuilt"
    # build beside the target, then rename: concurrent processes never load a half-written file
    handle, partial = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(handle)
    try:
        subprocess.run(
            [*command, *flags, *map(str, _SOURCES), "-o", partial],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        checksum = _checksum(Path(partial))
        _write_atomically(_sidecar(target), checksum, folder)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target, note


def _verified(target: Path) -> bool:
    """The library and the checksum written beside it at build time agree."""
    try:
        expected = _sidecar(target).read_text().strip()
        return bool(expected) and _checksum(target) == expected
    except OSError:
        return False


def _sidecar(target: Path) -> Path:
    return target.with_suffix(".sha256")


def _checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomically(path: Path, text: str, folder: Path) -> None:
    handle, partial = tempfile.mkstemp(suffix=".tmp", dir=folder)
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(partial, path)


def _writable(folder: Path) -> tuple[Path, str]:
    """``folder``, created if need be, or, where it cannot be written, a private temporary
    folder for this process (the build then runs once per process) and a note saying so."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
        return folder, ""
    except OSError as error:
        private = Path(_private_folder())
        return private, (
            f"the cache folder {folder} cannot be written ({_short(error)}); the kernel was "
            f"built in {private} for this process only. Set TBFUNC_CACHE_DIR to a writable "
            "folder to build it once"
        )


@functools.cache
def _private_folder() -> str:
    return tempfile.mkdtemp(prefix="tbfunc-kernel-")


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


def _unavailable(reason: str, fix: str) -> None:
    advice = f" {fix} to get the fast kernel." if fix else ""
    _warn(
        f"tbfunc's CPU noise kernel is unavailable: {reason}. Drawing with the tensor-op "
        f"version of the same generator instead: the same numbers, about 28x slower.{advice}"
    )


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=_outside_tbfunc())


def _outside_tbfunc() -> int:
    """The stack level of the first frame outside tbfunc and torch (whose custom-op dispatch
    sits between a draw and this kernel): the user's call."""
    inside = (str(Path(__file__).parent), str(Path(_torch_file()).parent))
    frame: Any = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _torch_file() -> str:
    import torch  # already imported by the time a kernel loads; not at this module's import

    return torch.__file__ or ""


def _short(error: BaseException) -> str:
    detail = getattr(error, "stderr", None) or str(error)
    return " ".join(str(detail).split())[:300]

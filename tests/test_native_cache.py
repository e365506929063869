"""The CPU kernel's build cache: a damaged, empty, foreign or unwritable cache never crashes
Python nor silently costs the fast path; ``CC`` is split as a shell splits it; the warnings
say what happened and point at the user's call. Each case runs in a fresh interpreter (a
regression that loaded a truncated library would kill it with SIGBUS, not the suite)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tbfunc import _native

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler"
)

# a draw, whether the fast kernel served it, and every warning with the file it points at
CHILD = """
import warnings, torch, tbfunc as tb
from tbfunc import _native
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    value = float(tb.random.normal(tb.random.key(0), (1,)))
print(value, _native.kernel() is not None)
for w in caught:
    print("WARNING", w.filename, "|", w.message)
"""


def _run(cache: Path, **env: str) -> tuple[str, bool, list[str]]:
    environ = {**os.environ, "TBFUNC_CACHE_DIR": str(cache), **env}
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, env=environ, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    value, fast = lines[0].split()
    return value, fast == "True", [line for line in lines[1:] if line.startswith("WARNING")]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A cache with one good build, and the value a draw gives."""
    cache = tmp_path_factory.mktemp("cache")
    value, fast, warned = _run(cache)
    assert fast and not warned
    (library,) = cache.glob("noise-*.so")
    return cache, library, value


def _copy(built, tmp_path) -> tuple[Path, Path]:
    cache, library, _ = built
    target = tmp_path / "cache"
    shutil.copytree(cache, target)
    return target, target / library.name


def test_a_truncated_library_is_rebuilt_with_a_warning_not_loaded(built, tmp_path):
    cache, library = _copy(built, tmp_path)
    data = library.read_bytes()
    library.write_bytes(data[: len(data) // 2])  # a copy cut short
    value, fast, warned = _run(cache)
    assert fast and value == built[2]
    assert len(warned) == 1 and "did not match its checksum and was rebuilt" in warned[0]
    assert _native._verified(library)
    again = _run(cache)
    assert again[1] and not again[2]  # rebuilt for good


def test_an_empty_library_is_rebuilt_not_a_slow_path_for_good(built, tmp_path):
    cache, library = _copy(built, tmp_path)
    library.write_bytes(b"")
    value, fast, warned = _run(cache)
    assert fast and value == built[2] and len(warned) == 1
    assert library.stat().st_size > 0


def test_a_foreign_library_under_the_name_is_replaced(built, tmp_path):
    cache, library = _copy(built, tmp_path)
    source = tmp_path / "other.c"
    source.write_text("int unrelated(void) { return 1; }\n")
    compiler = shutil.which("cc") or shutil.which("gcc")
    subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    # with a matching checksum beside it, as a sync of both files would leave them
    library.with_suffix(".sha256").write_text(_native._checksum(library))
    value, fast, warned = _run(cache)
    assert fast and value == built[2] and not warned  # rebuilt, silently: nothing was lost


def test_a_cache_folder_that_cannot_be_written_builds_privately_and_says_so(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _, fast, warned = _run(blocker / "cache")  # mkdir under a file fails, even as root
    assert fast
    assert len(warned) == 1
    assert "cannot be written" in warned[0] and "TBFUNC_CACHE_DIR" in warned[0]
    assert "Install a C compiler" not in warned[0]
    assert warned[0].split()[1] == "<string>"  # the user's call, not a tbfunc file


def test_cc_is_split_as_a_shell_splits_it(tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc")
    _, fast, warned = _run(tmp_path / "cache", CC=f"env {compiler}")  # like "ccache gcc"
    assert fast and not warned


def test_a_missing_compiler_is_named_and_the_warning_points_at_the_caller(tmp_path):
    _, fast, warned = _run(tmp_path / "cache", CC="no-such-cc --flag")
    assert not fast and len(warned) == 1
    assert "the compiler 'no-such-cc' (from $CC) was not found" in warned[0]
    assert "Fix CC or install it" in warned[0] and "about 28x slower" in warned[0]
    assert warned[0].split()[1] == "<string>"

"""The CPU kernel's build cache: a damaged, empty, foreign or unwritable cache never crashes
Python nor silently costs the fast path; ``CC`` is split as a shell splits it; the warnings
say what happened and point at the user's call. The scenarios run in one fresh interpreter (a
regression that loaded a truncated library would kill it with SIGBUS, not the suite), each
against its own cache folder with the kernel loaded afresh."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler"
)

CHILD = r"""
import json, os, shutil, subprocess, sys, warnings
from pathlib import Path
import torch, tbfunc as tb
from tbfunc import _native

root = Path(sys.argv[1])
compiler = shutil.which("cc") or shutil.which("gcc")
results = {}

def draw(name, cache, **env):
    saved = {k: os.environ.get(k) for k in ("TBFUNC_CACHE_DIR", "CC", *env)}
    os.environ["TBFUNC_CACHE_DIR"] = str(cache)
    os.environ.pop("CC", None)
    os.environ.update(env)
    _native.kernel.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(tb.random.normal(tb.random.key(0), (1,)))
    results[name] = {
        "value": value,
        "fast": _native.kernel() is not None,
        "warnings": [[w.filename, str(w.message)] for w in caught],
    }
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v

def fresh(name):
    target = root / name
    shutil.copytree(root / "good", target)
    return target, next(target.glob("noise-*.so"))

draw("good", root / "good")
cache, library = fresh("truncated")
data = library.read_bytes()
library.write_bytes(data[: len(data) // 2])  # a copy cut short
draw("truncated", cache)
results["truncated"]["verified_after"] = _native._verified(library)
draw("truncated_again", cache)
cache, library = fresh("empty")
library.write_bytes(b"")
draw("empty", cache)
results["empty"]["size_after"] = library.stat().st_size
cache, library = fresh("foreign")
source = root / "other.c"
source.write_text("int unrelated(void) { return 1; }\n")
subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
library.with_suffix(".sha256").write_text(_native._checksum(library))  # as a sync leaves both
draw("foreign", cache)
(root / "a-file").write_text("")
draw("unwritable", root / "a-file" / "cache")  # mkdir under a file fails, even as root
draw("cc_split", root / "split", CC=f"env {compiler}")  # like CC="ccache gcc"
draw("missing_cc", root / "missing", CC="no-such-cc --flag")
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(root)],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "TBFUNC_NATIVE"},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert results["good"]["fast"] and not results["good"]["warnings"]
    return results


def test_a_truncated_library_is_rebuilt_with_a_warning_not_loaded(scenarios):
    got = scenarios["truncated"]
    assert got["fast"] and got["value"] == scenarios["good"]["value"]
    assert len(got["warnings"]) == 1
    assert "did not match its checksum and was rebuilt" in got["warnings"][0][1]
    assert got["verified_after"]
    again = scenarios["truncated_again"]
    assert again["fast"] and not again["warnings"]  # rebuilt for good


def test_an_empty_library_is_rebuilt_not_a_slow_path_for_good(scenarios):
    got = scenarios["empty"]
    assert got["fast"] and got["value"] == scenarios["good"]["value"]
    assert len(got["warnings"]) == 1 and got["size_after"] > 0


def test_a_foreign_library_under_the_name_is_replaced(scenarios):
    got = scenarios["foreign"]
    assert got["fast"] and got["value"] == scenarios["good"]["value"]
    assert not got["warnings"]  # rebuilt, silently: nothing was lost


def test_a_cache_folder_that_cannot_be_written_builds_privately_and_says_so(scenarios):
    got = scenarios["unwritable"]
    assert got["fast"] and len(got["warnings"]) == 1
    filename, message = got["warnings"][0]
    assert "cannot be written" in message and "TBFUNC_CACHE_DIR" in message
    assert "Install" not in message
    assert filename == "<string>"  # the user's call, not a tbfunc (or torch) file


def test_cc_is_split_as_a_shell_splits_it(scenarios):
    got = scenarios["cc_split"]
    assert got["fast"] and not got["warnings"]


def test_a_missing_compiler_is_named_and_the_warning_points_at_the_caller(scenarios):
    got = scenarios["missing_cc"]
    assert not got["fast"] and len(got["warnings"]) == 1
    filename, message = got["warnings"][0]
    assert "the compiler 'no-such-cc' (from $CC) was not found" in message
    assert "Fix CC or install it" in message and "about 28x slower" in message
    assert filename == "<string>"
    assert got["value"] == scenarios["good"]["value"]  # the fallback: the same numbers


def test_every_kernel_source_ships_in_the_package():
    """A source or header missing from package-data builds in a checkout but not from a
    wheel, where every draw would then fall back to the slow path."""
    from pathlib import Path

    import tomllib

    from tbfunc import _native

    root = Path(__file__).resolve().parents[1]
    shipped = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["tbfunc"]
    needed = {path.name for path in (*_native._SOURCES, *_native._HEADERS)}
    assert needed == {"_noise.c", "_train.c", "_cephes.h", "_parts.h"}
    assert needed <= set(shipped)


def test_each_part_of_the_cache_key_changes_the_library_name(monkeypatch, tmp_path):
    """A part left out of the key would load a build made for another source, compiler, flag
    set or CPU (a shared home on mixed machines: instructions this CPU lacks)."""
    from tbfunc import _native

    command, version, flags = ["cc"], "cc 1.0", ["-O3", "-march=native"]
    base = _native.library_name(command, version, flags)
    assert base == _native.library_name(list(command), version, list(flags))  # deterministic
    names = {
        "command": _native.library_name(["clang"], version, flags),
        "version": _native.library_name(command, "cc 1.1", flags),
        "flags": _native.library_name(command, version, ["-O3"]),
        # the parts' boundaries count: "cc" + "1.0" is not "cc1" + ".0"
        "boundary": _native.library_name(["cc 1.0"], "", flags),
    }
    monkeypatch.setattr(_native, "_cpu_fingerprint", lambda: "another CPU")
    names["cpu"] = _native.library_name(command, version, flags)
    monkeypatch.undo()
    for index, source in enumerate((*_native._SOURCES, *_native._HEADERS)):
        copy = tmp_path / source.name
        copy.write_text(source.read_text() + "\n/* changed */\n")
        changed = [*_native._SOURCES, *_native._HEADERS]
        changed[index] = copy
        monkeypatch.setattr(_native, "_SOURCES", changed[: len(_native._SOURCES)])
        monkeypatch.setattr(_native, "_HEADERS", changed[len(_native._SOURCES) :])
        names[source.name] = _native.library_name(command, version, flags)
        monkeypatch.undo()
    assert all(name != base for name in names.values()), names
    assert len(set(names.values())) == len(names)

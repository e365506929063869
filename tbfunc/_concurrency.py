"""What makes tbfunc safe in servers and forked workers.

- A module is an object that every forward mutates: the weights of a draw are swapped into its
  parameter tables, and MC dropout flips its layers' training flags, for the duration of the
  call. So every call on one module is serialised by that module's lock (re-entrant: an entry
  point may call another); calls on different modules run concurrently.
- Some switches are process-wide (the MHA fast path and the SDPA backends that vmap needs): they
  are reference-counted, saved by the first thread that turns them and restored by the last.
- A forked child inherits the locks in whatever state the parent's threads held them, and no
  threads: ``os.register_at_fork`` gives it fresh ones.
Under ``torch.compile`` nothing is locked (a lock cannot be traced; the compiled code runs on
the compiler's own copy of the call).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["SharedSwitch", "exclusive"]

_TABLE = threading.Lock()
_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()


class exclusive:
    """``with exclusive(module):`` holds the module's lock (created on first use)."""

    __slots__ = ("lock",)

    def __init__(self, module: nn.Module) -> None:
        self.lock: Any = None
        if torch.compiler.is_compiling():
            return
        lock = _LOCKS.get(module)
        if lock is None:
            with _TABLE:
                lock = _LOCKS.setdefault(module, threading.RLock())
        self.lock = lock

    def __enter__(self) -> None:
        if self.lock is not None:
            self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        if self.lock is not None:
            self.lock.release()


class SharedSwitch:
    """A process-wide setting turned while any thread needs it: ``turn`` saves the setting
    (``read()``) and applies ``apply()`` on the first hold; ``release`` restores it on the last."""

    def __init__(
        self, read: Callable[[], Any], apply: Callable[[], None], restore: Callable[[Any], None]
    ) -> None:
        self._read, self._apply, self._restore = read, apply, restore
        self._lock = threading.Lock()
        self._holders = 0
        self._saved: Any = None
        _SWITCHES.add(self)

    def turn(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._saved = self._read()
                self._apply()
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                self._restore(self._saved)

    def _after_fork(self) -> None:
        # the threads that held it do not exist in the child: put the setting back
        self._lock = threading.Lock()
        if self._holders:
            self._holders = 0
            self._restore(self._saved)


_SWITCHES: weakref.WeakSet[SharedSwitch] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _TABLE, _LOCKS
    _TABLE = threading.Lock()
    _LOCKS = weakref.WeakKeyDictionary()
    for switch in list(_SWITCHES):
        switch._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)

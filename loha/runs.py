"""What keeps a training run honest about its folder and its flags: one run per output folder (a lock no
crash leaves stuck), a graceful stop on Ctrl-C/SIGTERM, and flags checked against the run being resumed."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from .layer import LoHaError

LOCK_FILE = ".loha-run.lock"


class OutputLock:
    """An exclusive ``flock`` on ``<output_dir>/.loha-run.lock`` for as long as the run lives. The kernel
    drops it when the process ends, however it ends, so a crashed or killed run never leaves it stuck.
    A second run on the same folder is refused with the first one's pid, host and start time."""

    def __init__(self, output_dir):
        self.path = Path(output_dir) / LOCK_FILE
        self.fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise LoHaError(f"--output_dir {self.path.parent} is in use by another training run ({self.holder()}); "
                            "wait for it to finish, or give this run another --output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode())
        self.fd = fd
        return self

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return f"pid {info['pid']} on {info['host']}, started {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not written its pid yet"

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the flock; the file stays (deleting it would race a waiting run)
            self.fd = None


class StopNow(SystemExit):
    """A second stop signal: unwinds at once (cleanups still run), carrying the one line to print."""

    def __init__(self, status: int, message: str):
        super().__init__(status)
        self.message = message


class GracefulStop:
    """While active, the first SIGINT or SIGTERM only sets ``requested`` (the loop finishes its update and
    saves a checkpoint); a second one raises StopNow at once, with one line and the signal's exit status."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_second=None):
        self.requested = None  # the signal's name, once one arrived
        self.on_second = on_second or (lambda name: f"{name} again: stopped at once")
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is not None:
            raise StopNow(128 + signum, self.on_second(name))
        self.requested = name
        print(f"{name}: finishing this update, then saving a checkpoint (send it again to stop at once)",
              file=sys.stderr, flush=True)

    @property
    def exit_status(self) -> int:
        return 128 + signal.Signals[self.requested].value


def reconcile_flags(saved: dict, args, explicit: set, fixed: set, adjustable: set, step: int, source: str):
    """Make ``args`` agree with the run saved in ``saved`` (its flags). A flag not given on this command
    line takes the saved value; one given with a new value is refused if it is in ``fixed`` (it defines
    what the saved steps already did), or applied from ``step`` on and returned in the history if it is in
    ``adjustable``. Returns (adopted {flag: value}, new history entries)."""
    adopted, history = {}, []
    for flag in sorted((fixed | adjustable) & set(saved)):
        old, new = saved[flag], getattr(args, flag)
        if _same(old, new):
            continue
        if flag not in explicit:
            setattr(args, flag, old)
            adopted[flag] = old
        elif flag in fixed:
            raise LoHaError(f"--{flag} {_show(new)} differs from {_show(old)}, the value {source} was trained with; "
                            f"a resumed run must keep it: drop --{flag}, or start a new run in another --output_dir")
        else:
            history.append({"from_step": step, "flag": flag, "value": new, "was": old})
    return adopted, history


def _same(a, b) -> bool:
    with contextlib.suppress(TypeError, ValueError):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
            return float(a) == float(b)
    return (sorted(a) if isinstance(a, (set, frozenset)) else a) == (sorted(b) if isinstance(b, (set, frozenset))
                                                                      else b)


def _show(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value

"""One writer per folder: :func:`exclusive` holds an advisory lock (``fcntl.flock``) on ``.<name>.lock`` beside a
run or comparison folder while a process writes into it.

A second ``tokenmdp train`` or ``compare`` into the same folder refuses at once with one error that names the folder
and the process holding it (its pid, host and command, read from the lock file). The operating system releases the
lock when its process dies, however it dies (``kill -9`` included), so a lock file left by a killed process is
simply taken over: nothing to clean up by hand. In a run of several processes (``torchrun`` / ``accelerate
launch``) only rank 0 takes the lock, and a process that holds it may enter it again. On a platform without
``fcntl`` (Windows) it is a no-op.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

from tokenmdp.errors import TokenMDPError


_HELD: set[Path] = set()  # locks this process holds: a nested writer in the same process goes on


def lock_path(folder: str | Path) -> Path:
    folder = Path(folder)
    return folder.parent / f".{folder.name}.lock"


def _holder(file: Path) -> str:
    try:
        info = json.loads(file.read_text())
        return f"process {info['pid']} on {info['host']} ({info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def exclusive(folder: str | Path, *, what: str = "run folder") -> Iterator[None]:
    """Hold the writer's lock of ``folder`` for the ``with`` block; :class:`TokenMDPError` naming the folder and
    the holder when another live process has it."""
    try:
        import fcntl
    except ImportError:  # no advisory locks here
        yield
        return
    if int(os.environ.get("RANK", "0") or 0) != 0:
        yield
        return
    file = lock_path(folder)
    if file.resolve() in _HELD:  # this process holds it already (re-entrant)
        yield
        return
    file.parent.mkdir(parents=True, exist_ok=True)
    handle = open(file, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TokenMDPError(f"{what} {folder} is in use by {_holder(file)}; wait for it to finish or stop it "
                                "(a killed process's lock is taken over by the next run)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "command": " ".join(sys.argv[:6])[:200]}))
        handle.flush()
        _HELD.add(file.resolve())
        try:
            yield
        finally:
            _HELD.discard(file.resolve())
    finally:
        handle.close()  # releases the lock


__all__ = ["exclusive", "lock_path"]

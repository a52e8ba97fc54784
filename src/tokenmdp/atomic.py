"""One way to write a folder so that nobody ever reads half of it: :func:`write_folder`.

Every writer of a folder that another process (or a later run) may read goes through it: checkpoints
(``checkpoints/step-N``), a run's ``final/`` model, and the base models built by ``tokenmdp pretrain``.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from pathlib import Path
from collections.abc import Callable

from tokenmdp.errors import TokenMDPError, WriteError

#: Prefixes of the temporary folders :func:`write_folder` leaves beside ``out`` only if the process is killed;
#: :func:`remove_leftovers` clears them.
TMP_MARK, OLD_MARK = ".tmp-", ".old-"
#: Seconds to wait between writing a folder and renaming it into place; 0 except in the kill tests
#: (tests/faults/test_kill.py sets $TOKENMDP_TEST_WRITE_PAUSE so that kills land inside checkpoint writes).
PAUSE_S = float(os.environ.get("TOKENMDP_TEST_WRITE_PAUSE", "0") or 0)


def write_folder(out: str | Path, write: Callable[[Path], None], *, replace: bool = False) -> Path:
    """Run ``write(tmp)`` on a fresh temporary folder beside ``out``, then rename it to ``out``.

    On any failure (or interrupt) the temporary folder is removed, so ``out`` is either absent, the old folder,
    or complete (an ``OSError``, such as a full disk, becomes one :class:`~tokenmdp.errors.WriteError` naming
    ``out`` and the file); a kill -9 leaves at worst a hidden ``.<name>.tmp-*`` folder that :func:`remove_leftovers`
    clears. An existing ``out`` is replaced only when ``replace`` (else :class:`TokenMDPError`).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARK}", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only; the folder gets the usual permissions
    try:
        write(tmp)
        if PAUSE_S:  # fault-injection tests only: widen the window in which a kill lands inside a write
            time.sleep(PAUSE_S)
        if out.exists():
            if not replace:
                raise TokenMDPError(f"output folder {out} already exists (pass --overwrite to replace it)")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}{OLD_MARK}", dir=out.parent))
            os.rename(out, old / "x")
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old / "x", out)  # put the previous folder back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as exc:  # the disk is full, a quota, a read-only file system ...: one clear error
        shutil.rmtree(tmp, ignore_errors=True)
        raise _folder_error(out, exc.errno, exc.strerror or str(exc), exc.filename) from exc
    except Exception as exc:
        # a writer that wraps the OS error in its own (torch.save's RuntimeError, safetensors' SafetensorError): a
        # file system left without space is the cause, measured before the partial folder is freed
        full = _out_of_space(out.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise _folder_error(out, errno.ENOSPC, os.strerror(errno.ENOSPC), None) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_error(target: str, code: int | None, reason: str, kept: str, hint: str) -> WriteError:
    """The one clear error of a failed write: what (``target``), why (``reason`` and the errno's name), what is
    left (``kept``), what to do (``hint``)."""
    name = errno.errorcode.get(code, "OSError") if code else "OSError"
    return WriteError(f"cannot write {target}: {reason} ({name}); {kept}; {hint}")


def _folder_error(out: Path, code: int | None, reason: str, filename) -> WriteError:
    kept = "the previous one is intact" if out.exists() else "nothing was left behind"
    where = f" ({filename})" if filename else ""
    hint = "free space and run again" if code in (errno.ENOSPC, errno.EDQUOT) else "fix that and run again"
    return write_error(f"{out}{where}", code, reason, kept, f"{hint} (--resume continues a run)")


def _out_of_space(path: Path, *, below: int = 1 << 20) -> bool:
    """Whether the file system of ``path`` has less than ``below`` bytes left for an unprivileged writer."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < below


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_leftover(path: Path) -> bool:
    """A hidden temporary folder of a :func:`write_folder` call that was killed."""
    return path.name.startswith(".") and (TMP_MARK in path.name or OLD_MARK in path.name) and path.is_dir()


def remove_leftovers(folder: str | Path) -> None:
    """Delete the temporary folders that :func:`write_folder` calls killed mid-way left in ``folder``; a previous
    folder that a kill between the two renames of a replacement left aside (``.<name>.old-*/x`` with ``<name>``
    missing) is put back instead."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if not is_leftover(child):
            continue
        if OLD_MARK in child.name and (child / "x").is_dir():
            name = child.name[1:].split(OLD_MARK)[0]
            if not (folder / name).exists():
                os.rename(child / "x", folder / name)
        shutil.rmtree(child, ignore_errors=True)


__all__ = ["remove_leftovers", "write_folder"]

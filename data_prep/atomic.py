"""Files that appear complete or not at all.

Every file is written under a temporary name, ``NAME.tmp-...``, and renamed over
``NAME`` when complete, so a reader, or a rerun after a kill, never sees a partial file.
A run that starts in a DATA_DIR removes the ``.tmp-`` files a killed run left behind
(:func:`data_prep.state.prepare_output`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import BinaryIO

TMP_MARK = ".tmp-"  # in every temporary name, and in no final one


@contextlib.contextmanager
def atomic_file(path: str, *, sync: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through. It has a temporary name until the block
    ends without an error; then it is synced to disk (unless ``sync=False``, for work
    files that the run deletes when it ends) and renamed to ``path``. On an error the
    temporary file is removed and ``path`` is left as it was."""
    tmp = f"{path}{TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            yield f
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_atomic(path: str, data, *, sync: bool = True) -> None:
    """Write ``data`` (bytes or any buffer) to ``path`` through :func:`atomic_file`."""
    with atomic_file(path, sync=sync) as f:
        f.write(data)


def create_once(path: str, data: bytes) -> bool:
    """Write ``data`` to ``path`` unless the file exists. When processes race (array
    tasks sharing a directory, on one node or several), exactly one's bytes end up there,
    complete: the file appears through a hard link, which fails if the name is taken.
    Returns whether this call created the file."""
    tmp = f"{path}{TMP_MARK}{os.uname().nodename}-{os.getpid()}"
    try:
        write_atomic(tmp, data)
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def replace_directory(new: str, target: str) -> None:
    """Put the complete directory ``new`` at ``target``, replacing what is there: an old
    ``target`` is renamed aside first and deleted only once ``new`` is in place, so a kill
    leaves either directory whole (and a ``TMP_MARK`` sibling to clean up)."""
    if not os.path.exists(target):
        os.replace(new, target)
        return
    old = f"{target}{TMP_MARK}old-{os.getpid()}"
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old)

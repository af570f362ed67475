"""Atomic directory writes for exports: readers see the old directory or the complete new one, never a mix."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces ``directory`` by renames.

    On an exception the temporary directory is removed and an existing ``directory`` is left untouched.

    Example::

        with atomic_directory("exports/sst2") as tmp:
            model.save_pretrained(tmp)
    """
    target = Path(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; give it the permissions a plain mkdir would
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if target.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        backup.rmdir()
        target.rename(backup)
    tmp.rename(target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)

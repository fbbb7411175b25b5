"""Atomic output files: write to a temporary file beside the target, then rename.

A run that fails or is cancelled leaves nothing half-written, and an input file is never overwritten.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import InputError


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overwriting_inputs(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Raise if ``out`` is (or would replace) one of ``inputs``."""
    out_p = Path(out).resolve()
    for inp in inputs:
        if inp is None:
            continue
        in_p = Path(inp).resolve()
        if out_p == in_p or _same_file(out_p, in_p):
            raise InputError(f"refusing to write the output over an input file: {out}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None, private: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success rename it onto ``target``.

    ``suffix`` defaults to the target's full suffix (``.nii.gz`` stays ``.nii.gz``) so that writers that
    choose a format from the file name keep working.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=parent)
    os.close(fd)
    tmp_p = Path(tmp)
    try:
        yield tmp_p
        # mkstemp makes owner-only files: keep that for secrets (keys), give others the usual permissions
        os.chmod(tmp_p, 0o600 if private else 0o666 & ~_umask())
        os.replace(tmp_p, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_p.unlink()
        raise


def write_bytes_atomic(target: str | os.PathLike, data: bytes, private: bool = False) -> Path:
    with atomic_path(target, private=private) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text_atomic(target: str | os.PathLike, text: str, private: bool = False) -> Path:
    """Write ``text`` (UTF-8) atomically; ``private`` keeps the file readable by its owner only."""
    return write_bytes_atomic(target, text.encode("utf-8"), private=private)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success its files are moved into ``target`` (created if needed).

    Existing files in ``target`` with other names are left alone; files of the same name are replaced.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        target.mkdir(parents=True, exist_ok=True)
        for item in sorted(tmp.rglob("*")):
            if item.is_file():
                dest = target / item.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(item, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

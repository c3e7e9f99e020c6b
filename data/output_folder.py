"""Writing an output folder whole, and replacing only a folder this code wrote.

A run builds its output in `.NAME.partial-PID` beside the folder NAME (`work_folder`) and
moves it into place when it is complete (`swap_in`), so a failed run leaves an earlier
NAME as it was. An earlier NAME is replaced only if it holds nothing but the paths its own
record lists (`listing`, kept by the caller, e.g. in NAME/meta.json); anything else is
refused with the path that is not ours (`check_replaceable`), and nothing is deleted.

The work folder is locked (flock) while its run lives; the kernel frees the lock however
the run ends, SIGKILL included. A run killed before it could clean up leaves its work folder
behind, and the next run on NAME removes it (`remove_abandoned`): only folders of that
name pattern, and only while no process holds their lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

_HELD: set[int] = set()  # descriptors of the work-folder locks this process holds


def listing(folder: Path, leave_out: tuple[str, ...] = ()) -> dict[str, int | str]:
    """Every path under folder, relative: file -> size, folder -> "dir", anything else
    (links, ...) -> "other"; without the top-level names in `leave_out`."""
    entries: dict[str, int | str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                entries[rel] = "other"
            else:
                entries[rel] = "dir" if path.is_dir() else path.stat().st_size
    for name in leave_out:
        entries.pop(name, None)
    return dict(sorted(entries.items()))


def _kind(entry: int | str) -> str:
    return "file" if isinstance(entry, int) else entry


def check_replaceable(out: Path, found: dict, written: dict | None, record: str) -> None:
    """Refuses (FileExistsError) to replace out unless it is absent or empty, or every path
    `found` in it is one of the paths that its `record` file lists as `written` (same kind;
    a size may differ: a damaged file of ours is still ours)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; give a folder")
    if not found and not (out / record).exists():
        return
    if written is None:
        raise FileExistsError(
            f"refusing to replace {out}: it has no {record} listing what was written there "
            "(not ours, or an older version's); choose another folder, or empty it"
        )
    kinds = {rel: _kind(entry) for rel, entry in written.items()}
    foreign = [rel for rel, entry in found.items() if kinds.get(rel) != _kind(entry)]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise FileExistsError(
            f"refusing to replace {out}: it holds {foreign[0]}{more}, which was not written "
            "there by this program; move that away, or choose another folder"
        )


def _lock(folder: Path) -> int | None:
    """A descriptor holding an exclusive lock on folder, or None where another process holds
    it (or the file system has no locks)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    _HELD.add(fd)
    return fd


def _unlock(fd: int) -> None:
    _HELD.discard(fd)
    os.close(fd)


def _drop_inherited_locks() -> None:
    """In a forked child (curation workers) the lock stays its parent's alone, so a killed
    run whose workers are still exiting does not look alive."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def remove_abandoned(out: Path) -> list[Path]:
    """Removes the work folders of earlier runs on out that died before cleaning up."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.partial-\d+")
    removed = []
    for path in out.parent.iterdir() if out.parent.is_dir() else []:
        if not pattern.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
            continue
        fd = _lock(path)
        if fd is not None:
            shutil.rmtree(path)
            _unlock(fd)
            removed.append(path)
    return removed


@contextlib.contextmanager
def work_folder(out: Path) -> Iterator[Path]:
    """`.NAME.partial-PID` beside out, locked while this run uses it and removed when it
    ends, also on an error or Ctrl-C."""
    work = out.with_name(f".{out.name}.partial-{os.getpid()}")
    work.mkdir()
    fd = _lock(work)
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if fd is not None:
            _unlock(fd)


def swap_in(new: Path, out: Path, work: Path) -> None:
    """Moves the finished folder `new` to out. An earlier out (the caller has checked it is
    replaceable) first moves into the work folder, and goes with it."""
    if out.exists():
        out.rename(work / "replaced")
    new.rename(out)

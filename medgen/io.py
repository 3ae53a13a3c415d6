"""Small filesystem helpers: outputs appear complete or not at all, and `--overwrite` replaces
only what medgen wrote.

Every output folder medgen creates as a whole (`atomic_dir`: reports, sample sets, caches,
cohorts, model folders) carries a marker file, `OUTPUT_MARKER`, listing what medgen wrote into
it. `ensure_new_output` is the one check every command runs before it works: an existing
non-empty `--out` is replaced only with `--overwrite`, only when everything in it is listed in
its marker (otherwise the files in the way are named), and never when it is the current
directory or holds it. Final files and folders get the modes the umask gives, as `open` and
`mkdir` would (temp files and folders start private).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from medgen.errors import DataError, RunError

OUTPUT_MARKER = ".medgen-output.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (no race with threads)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path` (mode 0666 & ~umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 would hide shared runs from a lab
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def apply_umask_modes(folder: str | os.PathLike) -> None:
    """Give `folder` and everything in it the modes `open`/`mkdir` give under the umask (files
    0666 & ~umask, folders 0777 & ~umask): temp folders and some writers (safetensors,
    mkstemp) make files private, which hides a shared run from the rest of a lab."""
    file_mode, dir_mode = 0o666 & ~_umask(), 0o777 & ~_umask()
    os.chmod(folder, dir_mode)
    for dirpath, dirnames, filenames in os.walk(folder):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), dir_mode)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), file_mode)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# ----------------------------------------------------------------------------- output folders


def _entries(folder: Path) -> list[str]:
    """Relative paths (POSIX) of everything under `folder`, folders ending in '/', marker excluded."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = Path(dirpath).relative_to(folder)
        out += [(rel / d).as_posix() + "/" for d in dirnames]
        out += [(rel / f).as_posix() for f in filenames if not (rel == Path(".") and f == OUTPUT_MARKER)]
    return sorted(out)


def mark_output(folder: str | os.PathLike, command: str = "medgen", exclude: Iterable[str] = ()) -> None:
    """Record everything now under `folder` as written by medgen (`command` says which), except
    the entries in `exclude` (and what is under an excluded folder 'name/')."""
    from medgen import __version__

    folder = Path(folder)
    exclude = tuple(exclude)
    entries = [e for e in _entries(folder) if not any(e == x or (x.endswith("/") and e.startswith(x)) for x in exclude)]
    atomic_write_json(folder / OUTPUT_MARKER, {"written_by": command, "medgen_version": __version__, "entries": entries})


def foreign_entries(folder: str | os.PathLike) -> list[str]:
    """What under `folder` medgen's marker does not list (everything when there is no marker);
    a foreign folder is named once, not file by file."""
    folder = Path(folder)
    try:
        known = set(json.loads((folder / OUTPUT_MARKER).read_text())["entries"])
    except (OSError, ValueError, KeyError, TypeError):
        known = set()
    foreign = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = Path(dirpath).relative_to(folder)
        for d in list(dirnames):
            name = (rel / d).as_posix() + "/"
            if name not in known:
                foreign.append(name)
                dirnames.remove(d)
        foreign += [(rel / f).as_posix() for f in filenames
                    if (rel / f).as_posix() not in known and not (rel == Path(".") and f == OUTPUT_MARKER)]
    return sorted(foreign)


def holds_cwd(path: str | os.PathLike) -> bool:
    """Whether `path` is the current directory or one of its parents."""
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current directory was removed
        return False
    target = Path(path).resolve()
    return cwd == target or target in cwd.parents


def ensure_new_output(path: str | os.PathLike | None, overwrite: bool = False, what: str = "output folder",
                      inputs: Mapping[str, Any] | None = None) -> Path | None:
    """Check, before any work, that `path` may be written as a new output folder.

    - each of `inputs` (`{"--train": path, ...}`) exists (a missing input is reported as such,
      not as some later symptom);
    - `path` is not the current directory or one of its parents (replacing it would delete the
      folder the user is in);
    - an existing non-empty `path` needs `overwrite`, and then may hold only what medgen wrote
      (its `OUTPUT_MARKER` lists it); other files are named and the folder is left alone.

    Returns `path` (None stays None).
    """
    for flag, value in (inputs or {}).items():
        if value is not None and not Path(value).exists():
            raise DataError(f"{flag} {value}: no such file or folder")
    if path is None:
        return None
    path = Path(path)
    if holds_cwd(path):
        raise RunError(f"--out {path} is the current directory or holds it; the {what} is written as a new folder "
                       f"and medgen never replaces the folder you are in: choose another --out")
    if path.exists() and not path.is_dir():
        raise RunError(f"{what} {path} is a file; choose a folder path for --out")
    if not path.exists() or not any(path.iterdir()):
        return path
    if not overwrite:
        raise RunError(f"{what} {path} already holds files; pass --overwrite to replace it")
    foreign = foreign_entries(path)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunError(f"--overwrite replaces only what medgen wrote, but {path} holds {len(foreign)} "
                       f"{'entry' if len(foreign) == 1 else 'entries'} it did not write: {shown}; "
                       f"move {'it' if len(foreign) == 1 else 'them'} away or choose another --out")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, what: str = "output folder") -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success mark it (`mark_output`) and rename it to `path`.

    On an exception the temp folder is removed and `path` is untouched. An existing non-empty
    `path` is replaced only under `ensure_new_output`'s rules (then it is swapped out, not merged).
    """
    path = Path(path)
    ensure_new_output(path, overwrite, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        mark_output(tmp)
        apply_umask_modes(tmp)
        if path.exists():
            ensure_new_output(path, overwrite, what)  # nothing foreign arrived while we worked
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

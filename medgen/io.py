"""Small filesystem helpers: outputs appear complete or not at all, and `--overwrite` replaces
only what medgen wrote.

Every output folder medgen creates as a whole (`atomic_dir`: reports, sample sets, caches,
cohorts, model folders) carries a marker file, `OUTPUT_MARKER`, listing what medgen wrote into
it. `ensure_new_output` is the one check every command runs before it works (the output rule):

- its inputs exist, and the output is neither inside an input nor holds one;
- the output is not the current directory or one of its parents;
- the output's parent can be written and has room (`check_writable`);
- no other medgen process is writing the same output (a lock file beside it, `lock_output`);
- an existing non-empty output is replaced only with `--overwrite`, and only when everything in
  it is listed in its marker (otherwise the files in the way are named).

`atomic_dir` writes into a hidden staging folder beside the output (`.NAME.<random>.tmp`, with
an owner file naming the process), renames it into place when complete, and removes it on any
exception (SIGTERM included: the CLI turns it into one). Staging folders a killed process left
(`kill -9`, a lost node) are swept by the next run that writes the same output, once their owner
process is gone. Final files and folders get the modes the umask gives, as `open` and `mkdir`
would (temp files and folders start private).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from medgen.errors import DataError, RunError

log = logging.getLogger(__name__)

OUTPUT_MARKER = ".medgen-output.json"  # in every output folder: what medgen wrote there
OWNER_FILE = ".medgen-owner.json"  # in every staging folder: the process writing it
LOCK_SUFFIX = ".medgen-lock"  # PARENT/.NAME.medgen-lock: held while a process writes PARENT/NAME
STAGING_SUFFIX = ".tmp"  # PARENT/.NAME.<random>.tmp: a staging folder of PARENT/NAME
MIN_FREE_BYTES = 16 << 20  # every output needs some room (reports, manifests, figures)
OTHER_HOST_STALE_S = 7 * 24 * 3600  # a staging folder of another machine is left alone for a week
# the errors of a disk that cannot take the output (not a bug of medgen: one `medgen: error:` line)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


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


# ----------------------------------------------------------------------------- who is writing


def owner_record() -> dict[str, Any]:
    """This process as an owner: pid, host, the process's start time (tells a reused pid apart), now."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_start(os.getpid()), "time": time.time()}


def _process_start(pid: int) -> int | None:
    """Start time of process `pid` in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[19])  # field 22; the name in (...) may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def owner_alive(owner: Mapping[str, Any]) -> bool:
    """Whether the process in `owner` (an `owner_record`) may still be running.

    On this host: its pid exists and, where both are known, started when the record says (a
    reused pid is another process). On another host nothing can be checked: alive unless the
    record is older than `OTHER_HOST_STALE_S`.
    """
    if owner.get("host") != socket.gethostname():
        return time.time() - float(owner.get("time") or 0) < OTHER_HOST_STALE_S
    pid = int(owner["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    started = owner.get("started")
    return started is None or _process_start(pid) in (None, started)


def _read_owner(path: Path) -> dict[str, Any] | None:
    """The owner record in `path`, or None when there is none (missing, empty, not medgen's)."""
    try:
        owner = json.loads(path.read_text())
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) and "host" in owner else None
    except (OSError, ValueError):
        return None


def _describe_owner(owner: Mapping[str, Any] | None) -> str:
    if owner is None:
        return "another medgen process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner.get("time") or 0)))
    return f"medgen process {owner['pid']} on {owner['host']} (since {since})"


# ----------------------------------------------------------------------------- locks

# resolved output path -> (fd of its lock file, the lock file, the pid that took it)
_locks: dict[Path, tuple[int, Path, int]] = {}
_scopes = 0  # depth of `command_outputs`
# the launcher variables of the global process rank (torchrun/accelerate; MPI flavours)
RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")


def _lock_file(path: Path) -> Path:
    return path.parent / f".{path.name}{LOCK_SUFFIX}"


def _main_process() -> bool:
    """Whether this is the main process of a launch (`accelerate launch`: every process runs the
    command, the main one writes and holds the lock)."""
    return all((os.environ.get(v) or "0") == "0" for v in RANK_VARS)


def lock_output(path: str | os.PathLike, what: str = "output folder") -> None:
    """Hold the lock of output `path` (`PARENT/.NAME.medgen-lock`) until `release_output(path)`
    or the process exits; raise RunError naming the process that holds it.

    A `flock` on the lock file: the kernel drops it when its process dies, so a killed run
    (`kill -9`) never blocks the next one. The file holds the owner record for the message.
    Taking a lock this process holds is a no-op. Under a launcher only the main process locks.
    """
    path = Path(path)
    key = path.resolve()
    if key in _locks or not _main_process():
        return
    lock = _lock_file(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = _open_lock(lock)
        if not _try_flock(fd, lock):
            owner = _read_owner(lock)
            os.close(fd)
            raise RunError(f"{what} {path} is being written by {_describe_owner(owner)}; wait for it to finish, "
                           f"or choose another --out")
        try:  # a process releasing its lock unlinks the file: ours must still be the one at `lock`
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current and os.fstat(fd).st_uid == os.geteuid():
            break
        if current:  # a stale lock file of another user: replace it by one we can write
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(owner_record()).encode())
    _locks[key] = (fd, lock, os.getpid())


def _open_lock(lock: Path) -> int:
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's lock file: flock needs no write access
        return os.open(lock, os.O_RDONLY)


def _try_flock(fd: int, lock: Path) -> bool:
    """Take the lock of `fd` without waiting: False when another process holds it. On a filesystem
    without flock the lock file's owner record decides (a live owner holds it)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:
        owner = _read_owner(lock)
        return owner is None or owner["pid"] == os.getpid() or not owner_alive(owner)


@contextlib.contextmanager
def command_outputs() -> Iterator[None]:
    """The scope of one command (the CLI runs each in one): there `ensure_new_output` takes the
    lock of its output at the first check, so a second process is refused before either works,
    and every lock taken inside is released when the scope ends. Outside a scope (the Python
    API), an output is locked while `atomic_dir` or a training run writes it."""
    global _scopes
    _scopes += 1
    try:
        yield
    finally:
        _scopes -= 1
        if not _scopes:
            release_all_outputs()


def holds_lock(path: str | os.PathLike) -> bool:
    """Whether this process holds the lock of output `path` (what it may then remove is its own)."""
    held = _locks.get(Path(path).resolve())
    return held is not None and held[2] == os.getpid()


def release_output(path: str | os.PathLike) -> None:
    """Drop this process's lock of output `path` (no-op when it holds none)."""
    held = _locks.pop(Path(path).resolve(), None)
    if held is None:
        return
    fd, lock, pid = held
    if pid == os.getpid():  # a forked child (a data loader worker) never removes its parent's lock
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # before the unlock: a waiting process then sees a new file, not ours
        os.close(fd)


def release_all_outputs() -> None:
    for key in list(_locks):
        release_output(key)


atexit.register(release_all_outputs)


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


def written_by(folder: str | os.PathLike) -> str | None:
    """The command whose marker `folder` carries ("medgen", "medgen demo", ...), None without one."""
    try:
        return str(json.loads((Path(folder) / OUTPUT_MARKER).read_text())["written_by"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stale_leftover(path: Path) -> bool:
    """Whether `path` is what a dead medgen process left while writing: a staging folder whose
    owner is gone, or a lock file no process holds."""
    if path.is_dir() and path.name.startswith(".") and path.name.endswith(STAGING_SUFFIX):
        owner = _read_owner(path / OWNER_FILE)
        return owner is not None and not owner_alive(owner)
    if path.is_file() and path.name.startswith(".") and path.name.endswith(LOCK_SUFFIX):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken at once: nobody holds it
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
    return False


def foreign_entries(folder: str | os.PathLike) -> list[str]:
    """What under `folder` medgen's marker does not list (everything when there is no marker);
    a foreign folder is named once, not file by file. What a killed medgen run left there
    (`_stale_leftover`) is not foreign: it goes with the folder."""
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
                if not _stale_leftover(Path(dirpath) / d):
                    foreign.append(name)
                dirnames.remove(d)
        foreign += [(rel / f).as_posix() for f in filenames
                    if (rel / f).as_posix() not in known and not (rel == Path(".") and f == OUTPUT_MARKER)
                    and not _stale_leftover(Path(dirpath) / f)]
    return sorted(foreign)


def holds_cwd(path: str | os.PathLike) -> bool:
    """Whether `path` is the current directory or one of its parents."""
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current directory was removed
        return False
    target = Path(path).resolve()
    return cwd == target or target in cwd.parents


def overlapping_input(path: str | os.PathLike, inputs: Mapping[str, Any]) -> tuple[str, Any] | None:
    """The first (flag, value) of `inputs` that `path` is inside of, equals, or holds (symlinks
    resolved), else None."""
    target = Path(path).resolve()
    for flag, value in inputs.items():
        if value is None:
            continue
        source = Path(value).resolve()
        if target == source or source in target.parents or target in source.parents:
            return flag, value
    return None


def check_writable(path: str | os.PathLike, need_bytes: int | None = None, what: str = "output folder") -> None:
    """Raise RunError, before any work, when output `path` cannot be written: its parent cannot be
    created or written (read-only disk, no permission), or has less free space than `need_bytes`
    (an estimate of the output's size; at least `MIN_FREE_BYTES`). Creates the parent."""
    path = Path(path)
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".medgen-probe.", suffix=STAGING_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except (FileExistsError, NotADirectoryError):
        raise RunError(f"cannot write the {what} {path}: a part of {parent} is a file, not a folder; "
                       f"choose another --out") from None
    except OSError as e:
        raise RunError(f"cannot write the {what} {path}: {e.strerror} ({e.filename or parent}); "
                       f"choose an --out on a disk you can write to") from None
    need = max(int(need_bytes or 0), MIN_FREE_BYTES)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise RunError(f"cannot write the {what} {path}: {_size(free)} free on its disk, about {_size(need)} needed; "
                       f"free some space or choose an --out on another disk")


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def _existing_inputs(inputs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The inputs that are set; DataError naming the first that does not exist."""
    inputs = {k: v for k, v in (inputs or {}).items() if v is not None}
    for flag, value in inputs.items():
        if not Path(value).exists():
            raise DataError(f"{flag} {value}: no such file or folder")
    return inputs


def claim_output(path: str | os.PathLike, what: str = "output folder", inputs: Mapping[str, Any] | None = None,
                 need_bytes: int | None = None) -> Path:
    """The checks every output gets before any work, whatever it holds (`ensure_new_output` adds
    the rule for an existing folder; a training run continued with --resume has its own):

    - each of `inputs` (`{"--train": path, ...}`) exists (a missing input is reported as such,
      not as some later symptom);
    - `path` is not a file, and is neither inside an input nor holds one (inputs are never
      written to, nor removed by --overwrite);
    - its disk can take it (`check_writable`);
    - no other medgen process is writing it (`lock_output`, inside a `command_outputs` scope;
      released when `atomic_dir` put the output in place, else when the scope ends).

    Under a launcher, the disk and the lock are the main process's to check.
    """
    inputs = _existing_inputs(inputs)
    path = Path(path)
    overlap = overlapping_input(path, inputs)
    if overlap is not None:
        raise RunError(f"{what} {path} overlaps the {overlap[0]} input {overlap[1]}; input folders are never written "
                       f"to: choose an --out outside every input")
    if path.exists() and not path.is_dir():
        raise RunError(f"{what} {path} is a file; choose a folder path for --out")
    if _main_process():  # under a launcher the main process writes (the others may not see its disk)
        check_writable(path, need_bytes, what)
        if _scopes:
            lock_output(path, what)
            sweep_stale_staging(path)  # what a killed run left (a release's round files: training copies) goes now
    return path


def ensure_new_output(path: str | os.PathLike | None, overwrite: bool = False, what: str = "output folder",
                      inputs: Mapping[str, Any] | None = None, need_bytes: int | None = None) -> Path | None:
    """Check, before any work, that `path` may be written as a new output folder: it is not the
    current directory or one of its parents (replacing it would delete the folder the user is
    in), `claim_output`'s checks pass, and an existing non-empty `path` needs `overwrite`, and
    then may hold only what medgen wrote (its `OUTPUT_MARKER` lists it); other files are named
    and the folder is left alone.

    Returns `path` (None stays None: only the inputs are checked).
    """
    if path is None:
        _existing_inputs(inputs)
        return None
    path = Path(path)
    if holds_cwd(path):
        raise RunError(f"--out {path} is the current directory or holds it; the {what} is written as a new folder "
                       f"and medgen never replaces the folder you are in: choose another --out")
    try:
        claim_output(path, what, inputs, need_bytes)
        refuse_replacing(path, overwrite, what)
    except BaseException:
        release_output(path)
        raise
    return path


def refuse_replacing(path: Path, overwrite: bool, what: str) -> None:
    """Raise RunError unless `path` is absent, empty, or (with `overwrite`) holds only what medgen wrote."""
    if not path.exists() or not any(path.iterdir()):
        return
    if not overwrite:
        raise RunError(f"{what} {path} already holds files; pass --overwrite to replace it")
    foreign = foreign_entries(path)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunError(f"--overwrite replaces only what medgen wrote, but {path} holds {len(foreign)} "
                       f"{'entry' if len(foreign) == 1 else 'entries'} it did not write: {shown}; "
                       f"move {'it' if len(foreign) == 1 else 'them'} away or choose another --out")


# ----------------------------------------------------------------------------- staging folders


def _staging_dir(path: Path) -> Path:
    """A new private staging folder beside `path` (`.NAME.<random>.tmp`) holding its owner file."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=STAGING_SUFFIX))
    atomic_write_json(tmp / OWNER_FILE, owner_record())
    return tmp


def sweep_stale_staging(path: str | os.PathLike) -> list[Path]:
    """Remove the staging folders of `path` (`.NAME.*.tmp` beside it) whose owner process is gone
    (`owner_alive`); never one without medgen's owner file. Returns what was removed."""
    path = Path(path)
    removed = []
    for candidate in sorted(path.parent.glob(f".{glob.escape(path.name)}.*{STAGING_SUFFIX}")):
        if candidate.is_dir() and not candidate.is_symlink() and _stale_leftover(candidate):
            shutil.rmtree(candidate, ignore_errors=True)
            log.info("removed %s, left by a medgen run that was killed while writing %s", candidate, path)
            removed.append(candidate)
    return removed


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace the existing folder `path` by `tmp`. The old folder first moves into a staging
    folder of its own (never a fixed name such as `.NAME.old`, which could be the user's), so a
    run killed in between leaves only what the next run sweeps."""
    trash = _staging_dir(path)
    try:
        os.replace(path, trash / path.name)
    except BaseException:
        shutil.rmtree(trash, ignore_errors=True)
        raise
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(trash / path.name, path)  # put the old folder back
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _on_output(file: Path, path: Path) -> bool:
    """Whether `file` lies in output `path` or one of its staging folders (`.NAME.*.tmp`)."""
    try:
        first = file.resolve().relative_to(path.resolve().parent).parts[0]
    except (ValueError, IndexError):
        return False
    return first == path.name or first.startswith(f".{path.name}.")


@contextlib.contextmanager
def write_errors(path: str | os.PathLike, what: str = "output folder") -> Iterator[None]:
    """Turn a full or read-only disk met while writing `path` (ENOSPC, EDQUOT, EROFS, or EACCES/EPERM
    on a file under `path`'s folder) into one RunError naming the output and the file."""
    try:
        yield
    except OSError as e:
        on_output = e.filename is not None and _on_output(Path(os.fsdecode(e.filename)), Path(path))
        if e.errno not in WRITE_ERRNOS or (e.errno in (errno.EACCES, errno.EPERM) and not on_output):
            raise
        raise RunError(f"could not write the {what} {path}: {e.strerror}"
                       + (f" ({os.fsdecode(e.filename)})" if e.filename else "")
                       + "; free some space or choose an --out on a disk you can write to") from e


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, what: str = "output folder") -> Iterator[Path]:
    """Yield a staging folder beside `path`; on success mark it (`mark_output`) and rename it to `path`.

    On an exception the staging folder is removed and `path` is untouched. An existing non-empty
    `path` is replaced only under `ensure_new_output`'s rules (then it is swapped out, not merged).
    Staging folders of `path` that killed runs left are swept first; the lock of `path` is
    released when the block ends.
    """
    path = Path(path)
    try:
        ensure_new_output(path, overwrite, what)
        lock_output(path, what)
        sweep_stale_staging(path)
        with write_errors(path, what):
            tmp = _staging_dir(path)
            try:
                yield tmp
                (tmp / OWNER_FILE).unlink()
                mark_output(tmp)
                apply_umask_modes(tmp)
                if path.exists():
                    refuse_replacing(path, overwrite, what)  # nothing foreign arrived while we worked
                    _swap_in(tmp, path)
                else:
                    os.replace(tmp, path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    finally:
        release_output(path)

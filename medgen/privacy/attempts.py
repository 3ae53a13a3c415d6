"""Every audit and release of a model, on the record: `RUN_DIR/privacy_attempts.jsonl`.

A rerun with another seed redraws the samples and retrains the SSL detector, so a model that
copies can be retried until it passes. The log makes every attempt visible (the release's data
card lists the earlier ones), and the number of earlier *release* attempts sets the error level
of the next one (`medgen.privacy.bound.attempt_alpha`: attempt k at alpha / 2^k), so all
attempts together pass a copying model with probability at most alpha. A release takes its
number when it starts (`start_release`, under the log's lock: two concurrent releases never
share one), so an attempt that crashed or was killed before its verdict still counts. Audits
are recorded but do not spend alpha: they publish nothing, and a release judges its own fresh
samples.

One JSON object per line (`kind`: audit or release; `event`: start, verdict, outcome), appended
under an exclusive lock. A run folder where the log cannot be written is refused before any
work: an attempt that leaves no record is not allowed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from medgen.errors import RunError

ATTEMPTS_LOG = "privacy_attempts.jsonl"


def log_path(run: str | os.PathLike) -> Path:
    return Path(run) / ATTEMPTS_LOG


def read_attempts(run: str | os.PathLike) -> list[dict[str, Any]]:
    """The recorded attempts of `run`, oldest first ([] when none). A damaged line is refused:
    the record decides the error level, so it is never guessed."""
    path = log_path(run)
    if not path.is_file():
        return []
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            raise RunError(f"{path}:{number} is not a JSON line; the attempt log decides how strict the next release is, "
                           f"so it must be intact (restore it from a backup, or remove the damaged line knowingly)") from None
    return out


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def start_release(run: str | os.PathLike, **info: Any) -> int:
    """Take the next release attempt number of `run` (1 + the releases started before) and record
    the start, in one step under the log's lock."""
    path = log_path(run)
    try:
        with _locked(path) as f:
            number = 1 + sum(1 for a in read_attempts(run) if a.get("kind") == "release" and a.get("event") == "start")
            _append(f, {"time": _now(), "kind": "release", "event": "start", "attempt": number, **info})
    except OSError as e:
        raise RunError(f"cannot write the attempt log {path} ({e.strerror})") from None
    return number


def check_writable(run: str | os.PathLike) -> None:
    """Refuse, before any work, a run whose attempt log cannot be appended to."""
    path = log_path(run)
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise RunError(f"cannot write the attempt log {path} ({e.strerror}): every audit and release of a run is recorded "
                       f"there; make the run folder writable") from None


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield f
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _append(f, entry: dict[str, Any]) -> None:
    f.write(json.dumps(entry, default=str) + "\n")
    f.flush()
    os.fsync(f.fileno())


def record_attempt(run: str | os.PathLike, entry: dict[str, Any]) -> dict[str, Any]:
    """Append `entry` (with the time) to the run's log, flushed to disk; returns what was written."""
    entry = {"time": _now(), **entry}
    path = log_path(run)
    try:
        with _locked(path) as f:
            _append(f, entry)
    except OSError as e:
        raise RunError(f"cannot write the attempt log {path} ({e.strerror})") from None
    return entry


def release_history(attempts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per earlier attempt (audits and releases): when, what, verdict, bound, outcome."""
    rows: dict[tuple, dict[str, Any]] = {}
    for i, a in enumerate(attempts):
        key = ("release", a["attempt"]) if a.get("kind") == "release" and "attempt" in a else ("audit", i)
        row = rows.setdefault(key, {"kind": a.get("kind"), "attempt": a.get("attempt"), "time": a.get("time")})
        for k in ("verdict", "bound_upper_pct", "confidence", "seed", "n_samples", "policy", "released", "why"):
            if k in a:
                row[k] = a[k]
    return list(rows.values())


def attempt_entry(kind: str, result, *, seed: int, n: int, policy: dict[str, Any], out: str | os.PathLike | None, **extra: Any) -> dict[str, Any]:
    """The record of a judged attempt (`result`: a `medgen.privacy.verdict.AuditResult`)."""
    bound = result.report.get("bound") or {}
    return {
        "kind": kind, "event": "verdict", "verdict": result.verdict, "seed": seed, "n_samples": n,
        "bound_upper_pct": bound.get("upper_pct"), "confidence": bound.get("confidence"),
        "flagged": result.report["n_copies"], "p_value": result.report["test"]["p_value"],
        "policy": policy, "reasons": list(result.reasons), "out": None if out is None else str(out), **extra,
    }

"""Errors a user can hit. The CLI prints them as one message (no traceback) and exits non-zero."""


class MedgenError(Exception):
    """Base class: the message names the file or value, the problem, and what to do."""

    exit_code = 2


class DataError(MedgenError):
    """A dataset folder, manifest or image file is missing, unreadable or inconsistent."""


class ConfigError(MedgenError):
    """A YAML config or a command-line override is invalid."""


class WeightsError(MedgenError):
    """Pretrained weights are needed but not available (offline, wrong file)."""


class RunError(MedgenError):
    """A run, sample or report directory is missing, incomplete, or would be overwritten."""


class TrainingError(MedgenError):
    """Training cannot continue (NaN/Inf loss, incompatible resume state)."""


class ReleaseRefused(MedgenError):
    """A release was refused (fail closed): its audit failed (exit 1) or could not decide (exit 3),
    or the release would not be clean. Nothing is released."""

    def __init__(self, message: str, verdict: str = "fail", summary: str | None = None):
        super().__init__(message)
        self.verdict = verdict
        self.summary = summary or message  # one line: why (for tables)
        self.exit_code = 3 if verdict == "inconclusive" else 1

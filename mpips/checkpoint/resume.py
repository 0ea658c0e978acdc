"""Which checkpoint a job resumes from (rank 0 at start-up): the newest that verifies, the others
set aside; never one that would mix two runs in one directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mpips.checkpoint.files import CheckpointError, find_latest, list_checkpoints, set_aside, verify
from mpips.config import ConfigError

__all__ = ["ResumeError", "choose", "clash"]

log = logging.getLogger("mpips.checkpoint")


class ResumeError(ConfigError):
    """The run's configuration cannot resume from the chosen checkpoint; says which setting."""


def clash(chosen: tuple[str, dict[str, Any]] | None, directory: str, resuming: bool) -> str | None:
    """Why this run must not write into ``directory`` (another run's checkpoints are there), or None."""
    found = list_checkpoints(directory)
    if chosen is None and found and not resuming:  # (resuming: those that did not verify were set aside)
        return (f"--checkpoint-dir {directory} already holds checkpoints (newest: step {found[0][0]})"
                " of an earlier run; add --resume to continue it, or choose an empty --checkpoint-dir")
    if chosen is not None:
        newer = [step for step, path in found if step > chosen[1]["step"] and _verifies_or_aside(path)]
        if newer:
            return (f"--resume {chosen[0]}: --checkpoint-dir {directory} holds newer checkpoints (steps"
                    f" {', '.join(map(str, sorted(newer)))}); resuming here would interleave two runs'"
                    " checkpoints: move those away, or resume from the newest (--resume alone)")
    return None


def _verifies_or_aside(path: Path) -> bool:
    """Whether ``path`` verifies; when not, it is moved aside with a warning naming it."""
    try:
        verify(path)
        return True
    except CheckpointError as exc:
        log.warning("skipping checkpoint: %s; moved aside to %s", exc, set_aside(path).name)
        return False


def choose(resume: str, directory: str | None) -> tuple[str, dict[str, Any]] | str | None:
    """(path, manifest) to resume from, None to start afresh, or an error message (one rank).

    ``--resume`` alone finds nothing in a new ``--checkpoint-dir`` on a job's first run: that
    starts from step 0, so one requeueable job script serves the first run and every restart.
    """
    if resume == "latest":
        if directory is None:
            return "--resume without a path needs --checkpoint-dir"
        found = find_latest(directory, aside=True)
        if found is None:
            return None
        return str(found[0]), found[1]
    try:
        return resume, verify(resume)
    except CheckpointError as exc:
        return f"--resume {resume}: {exc}"

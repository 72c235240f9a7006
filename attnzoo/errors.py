"""Errors a user can cause. The CLI turns these into one line and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AttnzooError(ValueError):
    """A mistake in what the user asked for (a name, a path, an option), not a bug."""


class UnknownNameError(AttnzooError, KeyError):
    """A name (backbone, attention module, site, option) that does not exist."""

    def __init__(self, what: str, name: str, valid: Iterable[str], *, show_all: bool = False):
        valid = sorted(set(valid))
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
        msg = f"unknown {what} '{name}'"
        if close:
            msg += f"; did you mean {', '.join(repr(c) for c in close)}?"
        if show_all and valid:
            msg += f" Valid: {', '.join(valid)}"
        super().__init__(msg)
        self.name, self.suggestions = name, close

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


class UnknownKeywordError(UnknownNameError, TypeError):
    """A keyword argument nothing takes: a user's mistake (one line), and a ``TypeError`` to code that expects a
    factory to raise one for an unknown argument, as timm's ``create_model`` does."""


class SiteError(AttnzooError):
    """An attention module that cannot work at the site it was put at."""


class PretrainedUnavailable(AttnzooError):
    """Pretrained weights that cannot be fetched (offline, or none published)."""


class TrainingFailed(Exception):
    """A failure inside training (the CLI exits 1), as opposed to a user's mistake (exit 2)."""


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving; ``str()`` says how to resume. The CLI exits 128 + signum."""

    def __init__(self, message: str, signum: int, run_dir: object = None):
        super().__init__(message)
        self.signum, self.run_dir = signum, run_dir


def first_line(e: BaseException, named: bool = False, limit: int = 300) -> str:
    """An error's message as one line to show (its first line, at most ``limit`` characters), after its type's
    name when ``named``; the type's name alone when it has no message."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0][:limit]
    return f"{type(e).__name__}: {line}" if named else line


def hide_import_noise() -> None:
    """What attnzoo's processes (the CLI, a sweep's workers) do not show: fastai decorates functions with
    ``torch.jit.script`` at import, which torch >= 2.10 answers with a ``FutureWarning`` meant for fastai."""
    import warnings

    warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated")

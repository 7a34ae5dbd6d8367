"""The exceptions grood raises on purpose, in one place.

Each subclasses the built-in exception callers would catch without knowing grood
(``ValueError``, ``RuntimeError``, ``ImportError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

__all__ = [
    "BackendUnavailableError",
    "DetectorFileError",
    "MissingExtraError",
    "NotFittedError",
    "RankFailedError",
    "RowsRefusedError",
]


class NotFittedError(ValueError, AttributeError):
    """A detector (or baseline) was used before ``fit`` or ``load``."""


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


class DetectorFileError(ValueError):
    """A detector file or shard manifest cannot be used: not a grood file, damaged, of another
    format version, inconsistent, or not matching its manifest. The message names the file."""


class RankFailedError(ValueError, RuntimeError):
    """Another rank of a distributed fit or score failed (bad input on that rank, a loader
    that raised there): every other rank raises this, naming the rank and its error, while
    that rank raises its own error. The ranks leave the step together, so the process group
    stays usable.

    Attributes:
        ranks (list[int]): the ranks that failed, lowest first.
        step (str): what they were doing (e.g. "reading its features").
        errors (dict[int, str]): each failed rank's error, as ``"TypeName: message"``.
    """

    def __init__(self, message: str, *, ranks: list[int] | None = None, step: str = "",
                 errors: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.ranks, self.step, self.errors = list(ranks or []), step, dict(errors or {})


class RowsRefusedError(ValueError):
    """Rows of the input that are refused: NaN or Inf in them, or (scoring) a score or a
    step of it past the dtype's range. The message names them and why.

    Attributes:
        rows (list[int]): the rows the message names (the first few, lowest first), in the
            array given (not in the batches it was scored in), or, where the message names a
            loader's batch, in that batch.
    """

    def __init__(self, rows: list[int], text: Callable[[list[int]], str]) -> None:
        super().__init__(text(rows))
        self.rows, self._text = rows, text

    def __reduce__(self) -> tuple[type[RowsRefusedError], tuple[list[int], _Said]]:
        """Pickled (to another process) with its message as said."""
        return RowsRefusedError, (self.rows, _Said(str(self)))

    def renumbered(self, offset: int) -> RowsRefusedError:
        """The same refusal with the rows numbered from ``offset`` on (a batch's rows, from
        its place in the whole input)."""
        return RowsRefusedError([offset + r for r in self.rows], self._text)

    def prefixed(self, prefix: str) -> RowsRefusedError:
        """The same refusal, its message after ``prefix`` (which file, which batch)."""
        text = self._text
        return RowsRefusedError(self.rows, lambda rows: f"{prefix}: {text(rows)}")


class _Said:
    """A refusal's message as it was said, whatever the rows (what pickling keeps)."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __call__(self, rows: list[int]) -> str:
        return self.message


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the ``pip`` extra."""


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import and return ``module``, or raise :class:`MissingExtraError` naming the extra.

    Args:
        module: the module to import (e.g. ``"sklearn.datasets"``).
        extra: the extra of grood that installs it (e.g. ``"demo"``).
        purpose: what needs it, for the message (e.g. ``"the demo's digits data"``).
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise MissingExtraError(
            f"{purpose} needs {DISTRIBUTIONS.get(top, top)}, which is not installed: "
            f"pip install 'grood[{extra}]'") from exc


#: Import names whose distribution (what pip installs) is named otherwise.
DISTRIBUTIONS = {"sklearn": "scikit-learn", "PIL": "Pillow"}

"""Progress reporting: a tqdm bar on a terminal, periodic plain lines elsewhere.

tqdm draws nothing when stderr is not a terminal (logs, CI, ``nohup``), so a long fit or the
demo would print nothing for minutes. :func:`progress` returns a tqdm bar on a terminal or in
a Jupyter kernel (``tqdm.auto``'s widget there; a kernel's stderr is no terminal) and,
elsewhere, a :class:`PlainProgress` that writes one plain line to stderr every
``PLAIN_EVERY_S`` seconds of a long operation (short ones stay silent). With progress off it
returns a silent :class:`PlainProgress`, not a disabled tqdm bar: tqdm starts its monitor
thread with its first instance, a disabled one too, and the thread then wakes every 10 s for
the rest of the process.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import Any

from tqdm.auto import tqdm

#: Seconds between plain progress lines when stderr is not a terminal.
PLAIN_EVERY_S = 15.0


class PlainProgress:
    """The part of tqdm's interface grood uses, writing a plain line now and then (never,
    with ``every_s=math.inf``: a silent counter)."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None,
                 desc: str = "", unit: str = "it", every_s: float | None = None) -> None:
        self.iterable = iterable
        if total is None and isinstance(iterable, Sized):
            total = len(iterable)
        self.total, self.desc, self.unit = total, desc, unit
        self.every_s = PLAIN_EVERY_S if every_s is None else every_s  # (read at each bar)
        self.n = 0
        self.postfix = ""
        self.start = self.last = time.monotonic()

    def _line(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < self.every_s:
            return
        if final and now - self.start < self.every_s:
            return  # a short operation: no line at all
        self.last = now
        of = f"/{self.total:,}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
        state = "done" if final else "at"
        print(f"{self.desc}: {state} {self.n:,}{of} {self.unit}{pct}, {now - self.start:.0f} s"
              + (f", {self.postfix}" if self.postfix else ""), file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._line()

    def set_postfix(self, **kwargs: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def close(self) -> None:
        self._line(final=True)

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this progress counter was made without an iterable")
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _in_jupyter_kernel() -> bool:
    """Whether this is an IPython kernel (a Jupyter notebook), without importing IPython."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", enabled: bool | None = None, **tqdm_kwargs: Any) -> Any:
    """A progress bar: ``enabled=False`` none, ``True`` always tqdm, ``None`` tqdm on a
    terminal or in a Jupyter kernel and periodic plain lines otherwise."""
    if enabled is False:
        return PlainProgress(iterable, total=total, desc=desc, unit=unit, every_s=math.inf)
    if enabled is None and not sys.stderr.isatty() and not _in_jupyter_kernel():
        return PlainProgress(iterable, total=total, desc=desc, unit=unit)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, **tqdm_kwargs)

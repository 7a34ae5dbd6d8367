"""Adapters that let other OOD frameworks call grood as a backend.

Neither framework is imported here or by the adapters at import time; both adapters follow the
frameworks' protocols by their method names and signatures.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from grood._checks import did_you_mean


def check_grood_kwargs(kwargs: Iterable[str], owner: str, own: Sequence[str]) -> None:
    """Refuse, when an adapter is made, keyword arguments it would pass on to
    :class:`grood.GROOD` that GROOD does not take (found at the first fit otherwise, in
    GROOD's constructor); ``own``: the adapter's own parameters, named in the message."""
    from grood.detector import GROOD

    known = set(GROOD._param_names())
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"{owner} got unknown parameter(s) {', '.join(unknown)}"
                        f"{did_you_mean(unknown, known | set(own))}; besides "
                        f"{', '.join(own[:-1])} and {own[-1]} it takes GROOD's: "
                        + ", ".join(sorted(known - set(own))))

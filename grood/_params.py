"""Constructor parameters as scikit-learn reads them: ``get_params`` / ``set_params``, and the
estimator tags scikit-learn 1.6+ asks every step of a ``Pipeline`` for.

The names come from the signature of ``__init__``, which stores each argument unchanged under
its own name (validation happens in ``fit``), so ``sklearn.base.clone`` works and a new
parameter never has to be listed twice; whether ``fit`` needs labels comes from its signature
too.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from grood._checks import did_you_mean

if TYPE_CHECKING:
    from typing_extensions import Self


def init_parameters(cls: type) -> tuple[list[str], list[str]]:
    """Names of ``cls.__init__``'s named parameters (after ``self``), and of its ``*args`` /
    ``**kwargs`` ones."""
    named: list[str] = []
    variadic: list[str] = []
    init = cls.__init__  # type: ignore[misc]  # a class's own __init__, not an instance's
    for p in list(inspect.signature(init).parameters.values())[1:]:
        (variadic if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) else named).append(p.name)
    return named, variadic


class Parameters:
    """Mixin: ``get_params(deep)``, ``set_params(**params)`` and a ``repr`` from ``__init__``."""

    @classmethod
    def _param_names(cls) -> list[str]:
        named, variadic = init_parameters(cls)
        if variadic:
            raise TypeError(f"{cls.__name__}.__init__ must name every parameter "
                            f"(no *{variadic[0]} / **{variadic[0]})")
        return named

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor arguments by name; with ``deep``, also ``name__sub`` of nested
        estimators (objects with their own ``get_params``)."""
        out: dict[str, Any] = {}
        for name in self._param_names():
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                out.update((f"{name}__{k}", v) for k, v in value.get_params().items())
            out[name] = value
        return out

    def set_params(self, **params: Any) -> Self:
        """Set constructor arguments (``name=value``, or ``name__sub=value`` for a nested
        estimator); unknown names raise ``ValueError``. Takes effect at the next ``fit``; an
        estimator may apply some at the next score too (its class says which)."""
        valid = self._param_names()
        nested: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            name, _, sub = key.partition("__")
            if name not in valid:
                raise ValueError(f"{type(self).__name__} has no parameter {name!r}"
                                 f"{did_you_mean(name, valid)}; valid: {', '.join(valid)}")
            if sub:
                nested.setdefault(name, {})[sub] = value
            else:
                setattr(self, name, value)
        for name, sub_params in nested.items():
            target = getattr(self, name)
            if not hasattr(target, "set_params") or isinstance(target, type):
                raise ValueError(f"{type(self).__name__}.{name} is {target!r}, which has no "
                                 f"parameters to set ({', '.join(sub_params)}); set {name} "
                                 "to an object that has them")
            target.set_params(**sub_params)
        return self

    def __sklearn_tags__(self) -> Any:
        """scikit-learn's tags (1.6+, which asks for them in ``check_is_fitted`` and so in a
        ``Pipeline``'s ``score_samples`` / ``predict``): a fit is required, and takes labels
        when ``fit``'s second argument has no default. Imported only when scikit-learn asks."""
        from sklearn.utils import Tags, TargetTags

        fit = type(self).fit  # type: ignore[attr-defined]  # (every estimator here has one)
        fit_args = list(inspect.signature(fit).parameters.values())[1:]
        labels = len(fit_args) > 1 and fit_args[1].default is inspect.Parameter.empty
        return Tags(estimator_type=None, target_tags=TargetTags(required=labels))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params(deep=False).items())
        return f"{type(self).__name__}({args})"

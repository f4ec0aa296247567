"""Estimator parameters read from ``__init__``'s signature, as ``sklearn.base.BaseEstimator`` does.

A class whose ``__init__`` takes keyword arguments and stores each one unchanged under its own
name gets ``get_params``, ``set_params`` and a ``repr`` listing the non-default values, with the
parameter list written once: in the signature.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["ParamsMixin"]


class ParamsMixin:
    """``get_params`` / ``set_params`` / ``__repr__`` from the signature of ``__init__``."""

    @classmethod
    def _param_names(cls) -> list[str]:
        """Keyword parameters of ``__init__``, in signature order."""
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]

    def get_params(self) -> dict[str, Any]:
        """Constructor arguments, as given."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> Any:
        """Set constructor arguments by name.

        As in scikit-learn, learned state is not updated: parameters that shape the model take
        effect at the next ``fit``; scoring settings (PatchCore's ``batch_size``, ``progress``)
        apply to the next call.

        Returns:
            self
        """
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(
                    f"invalid parameter {name!r} for {type(self).__name__}; valid parameters: "
                    + ", ".join(valid)
                )
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {
            p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()
        }
        changed = [
            f"{k}={v!r}"
            for k, v in self.get_params().items()
            if not _same(v, defaults.get(k, inspect.Parameter.empty))
        ]
        return f"{type(self).__name__}({', '.join(changed)})"


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # noqa: BLE001 - e.g. arrays: show them
        return False

"""Command-line options derived from an estimator: nothing here repeats a default.

Each keyword parameter of the estimator's ``__init__`` becomes an option with the signature's
name (``top_k`` -> ``--top-k``), type and default; its help is the first sentence of the
parameter's entry under ``Args:`` in the class docstring; the choices of string parameters
come from the registries that validate them (:data:`patchcore.core.backbones.BACKBONES`,
``BACKBONE_DTYPES``, ...). A parameter whose default is a value but that also accepts
``None`` (``weights``, ``max_bank_size``) takes ``none`` / ``0`` for None on the command line.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from patchcore.apps.cli.base import choices
from patchcore.core.params import (
    BACKBONE_DTYPE_NAMES,
    BACKBONE_NAMES,
    FEATURE_DTYPE_NAMES,
    OFFLINE_BACKBONES,
    PRECISIONS,
    SAMPLINGS,
)

__all__ = [
    "CHOICES",
    "EstimatorOption",
    "docstring_args",
    "estimator_options",
    "literal_defaults",
    "literal_value",
    "with_options",
]

#: Allowed values of string parameters: the registries' names, read without torch
#: (:mod:`patchcore.core.params`).
CHOICES: dict[str, tuple[str, ...]] = {
    "sampling": SAMPLINGS,
    "search_precision": ("auto", *PRECISIONS),
    "feature_dtype": FEATURE_DTYPE_NAMES,
    "backbone_dtype": BACKBONE_DTYPE_NAMES,
}
#: Option names that differ from the parameter's (one value per repetition).
FLAGS = {"layers": "--layer"}
#: What the command line adds to a docstring's sentence.
NOTES = {
    "backbone": "One of: "
    + ", ".join(f"{n} (offline)" if n in OFFLINE_BACKBONES else n for n in BACKBONE_NAMES)
    + ".",
    "layers": "Repeat --layer for each.",
    "weights": "A local file works for any backbone.",
    "seed": "Also draws the --train-fraction share.",
}
METAVARS = {"weights": "PATH|imagenet", "backbone": "NAME", "layers": "LAYER"}


def _clean(text: str, names: Sequence[str], none_word: str) -> str:
    """A docstring sentence as plain text: roles and literals unwrapped, parameter names as
    their options, ``None`` as the command line spells it."""
    text = re.sub(r"\s*\(see :\w+:`[^`]+`\)", "", text)
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"\1", text)

    def literal(m: re.Match) -> str:
        word = m.group(1)
        if word in names:
            return "--" + word.replace("_", "-")
        return none_word if word == "None" else word

    text = re.sub(r"``([^`]+)``", literal, text)
    return text[:1].upper() + text[1:]


def docstring_args(cls: type) -> dict[str, str]:
    """``{parameter: its text}`` from the ``Args:`` section of ``cls``'s docstring (Google
    style; continuation lines joined)."""
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    section = False
    name = None
    for line in doc.splitlines():
        if line.strip() == "Args:":
            section = True
            continue
        if not section:
            continue
        if line and not line.startswith(" "):
            break  # the next section
        m = re.match(r"^ {4}(\w+)(?: \([^)]*\))?: (.*)$", line)
        if m:
            name = m.group(1)
            out[name] = m.group(2).strip()
        elif name is not None and line.strip():
            out[name] += " " + line.strip()
    return out


#: The end of a sentence: a full stop and a space, except after these abbreviations.
_SENTENCE_END = re.compile(r"(?<!e\.g\.)(?<!i\.e\.)(?<!eq\.)(?<!cf\.)(?<!vs\.)(?<=\.)\s+")


def _first_sentence(text: str) -> str:
    return _SENTENCE_END.split(text, maxsplit=1)[0]


@dataclass(frozen=True)
class EstimatorOption:
    """One estimator parameter as a command-line option."""

    name: str
    default: Any
    annotation: Any  # Annotated[type, typer.Option(...)]
    none_word: Any = None  # the command-line value that stands for None, if any

    def value(self, given: Any) -> Any:
        """The estimator's value of what the command line gave."""
        if isinstance(given, Enum):
            given = given.value
        if isinstance(given, list):
            return given or None
        if isinstance(given, str) and self.none_word == "none":
            return None if given.lower() == "none" else given
        return None if self.none_word is not None and given == self.none_word else given


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(the option's scalar type, whether None is allowed) of a parameter's type hint."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = typing.get_args(hint) if union else (hint,)
    scalar = next(a for a in args if a is not type(None))
    origin = typing.get_origin(scalar)
    if origin is not None and origin is not tuple and issubclass(origin, Sequence):
        return list[str], type(None) in args
    return (scalar if scalar in (int, float, bool) else str), type(None) in args


def _option(name: str, param: inspect.Parameter, hint: Any, doc: str, names: list[str]) -> Any:
    base, allows_none = _base_type(hint)
    default = param.default
    none_word: Any = None  # a default value that may also be None: 0 / "none" stand for None
    if allows_none and default is not None and base in (int, str):
        none_word = 0 if base is int else "none"
    sentence = _clean(_first_sentence(doc), names, "unset" if none_word is None else str(none_word))
    if name in CHOICES:
        base = choices("".join(w.title() for w in name.split("_")), CHOICES[name])
        default = base(default)
    info = typer.Option(
        FLAGS.get(name, "--" + name.replace("_", "-")),
        help=" ".join(t for t in (sentence, NOTES.get(name, "")) if t),
        metavar=METAVARS.get(name),
        show_default=default is not None,
    )
    kind = base | None if default is None else base
    return EstimatorOption(name, default, Annotated[kind, info], none_word)


def estimator_options(cls: type, *, skip: Sequence[str] = ()) -> dict[str, EstimatorOption]:
    """The command-line options of the keyword-only parameters of ``cls.__init__`` (``skip``:
    left out), in signature order."""
    init = cls.__init__  # type: ignore[misc]
    sig = inspect.signature(init)
    hints = typing.get_type_hints(init)
    docs = docstring_args(cls)
    names = [p for p in sig.parameters if p != "self"]
    return {
        name: _option(name, p, hints[name], docs.get(name, name.replace("_", " ")), names)
        for name, p in sig.parameters.items()
        if p.kind is p.KEYWORD_ONLY and name not in skip
    }


def with_options(options: dict[str, EstimatorOption], *, after: str) -> Callable:
    """Give a command function (which takes ``**params``) the options as keyword-only
    parameters in its signature, placed after its parameter ``after``."""

    def apply(fn: Callable) -> Callable:
        sig = inspect.signature(fn, eval_str=True)
        fixed = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        derived = [
            inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default,
                              annotation=o.annotation)
            for o in options.values()
        ]  # fmt: skip
        at = [p.name for p in fixed].index(after) + 1
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in fixed]
        fn.__signature__ = sig.replace(parameters=[*params[:at], *derived, *params[at:]])  # type: ignore[attr-defined]
        return fn

    return apply


def literal_defaults(module: str, function: str) -> dict[str, Any]:
    """``{parameter: default}`` of a module-level function whose defaults are literals, read
    from the module's source without importing it (e.g. a workflow step whose module loads
    torch), so a command's options can repeat no default and still not load torch."""
    tree = _source_tree(module)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    args = fn.args
    positional = [*args.posonlyargs, *args.args]
    pairs = [
        *zip(positional[len(positional) - len(args.defaults) :], args.defaults, strict=True),
        *((a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d),
    ]
    return {a.arg: ast.literal_eval(d) for a, d in pairs}


def literal_value(module: str, name: str) -> Any:
    """The literal value of a module-level ``NAME = ...`` read from the module's source without
    importing it (as :func:`literal_defaults`)."""
    for node in _source_tree(module).body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == name and node.value is not None:
            return ast.literal_eval(node.value)
    raise LookupError(f"no literal {name} in {module}")


def _source_tree(module: str) -> ast.Module:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"no module {module!r}")
    return ast.parse(Path(spec.origin).read_text(encoding="utf-8"))

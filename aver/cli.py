"""Command lines built from the config dataclasses: one flag per field, its help the field's
docstring, its default the field's default. Nested configs (``detector``, ``loss``, ``retry``) give
prefixed flags (``--detector-min-prob``, ``--loss-affectnet-weight``, ``--retry-attempts``).

A field's ``metadata`` may add ``choices`` or hide a testing-only flag (``{"cli": False}``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
import textwrap
import types
import typing
from typing import Any, Callable


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of ``cls`` and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                    isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) and \
                    isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _add_fields(parser: argparse.ArgumentParser, cls: type, prefix: str, defaults: dict) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        name = prefix + f.name
        flag = "--" + name.replace("_", "-")
        default = defaults.get(f.name, dataclasses.MISSING)
        if default is dataclasses.MISSING:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if dataclasses.is_dataclass(tp):
            _add_fields(parser, tp, name + "_", {} if default is dataclasses.MISSING else dataclasses.asdict(default))
            continue
        kw: dict[str, Any] = {"dest": name}
        if f.metadata.get("cli") is False:
            kw["help"] = argparse.SUPPRESS
        else:
            shown = "" if default is False or default in (dataclasses.MISSING, None, "", {}) else f" (default {_show(default)})"
            kw["help"] = (docs.get(f.name, "") + shown).replace("%", "%%")
        if "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction if default is True else "store_true"
        elif origin is tuple:
            kw["type"] = args[0]
            kw["nargs"] = "+" if len(args) == 2 and args[1] is Ellipsis else len(args)
        elif origin is dict or tp is dict:
            kw["type"] = json.loads
        else:
            kw["type"] = tp
        if default is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = default
        parser.add_argument(flag, **kw)


def _show(value) -> str:
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return str(value)


def _build(cls: type, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, values, prefix + f.name + "_")
        elif prefix + f.name in values:
            value = values[prefix + f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def parser_for(config_class: type, description: str | None = None, **defaults) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of ``config_class`` (``defaults`` override the
    dataclass's, e.g. a job's own run name)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_fields(p, config_class, "", defaults)
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own log lines on the terminal too (they always go to the session's log files)")
    return p


def parse(config_class: type, argv: list[str] | None = None, description: str | None = None, **defaults):
    """The config ``argv`` describes (``sys.argv[1:]`` by default); a config that rejects the values
    ends the program with its message, as argparse does."""
    p = parser_for(config_class, description, **defaults)
    values = vars(p.parse_args(argv))
    if values.pop("verbose"):
        import os

        from aver.console import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    try:
        return _build(config_class, values)
    except (ValueError, TypeError) as e:
        p.error(str(e))


def main(config_class: type, run: Callable[[Any], Any], description: str | None = None,
         argv: list[str] | None = None) -> int:
    """A job's whole command line: parse its config, run it, exit 0."""
    run(parse(config_class, argv, description))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("aver.cli is a library; run a job from jobs/")

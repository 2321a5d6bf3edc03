"""Command-line flags derived from a config dataclass, so each option is declared once.

    @dataclass
    class Config:
        batch_size: int = option(8, "per rank and micro-batch", group="batches")
        resume: str | None = option(None, "a checkpoint or run directory")

    add_flags(parser, Config())   # --batch_size INT (default 8), --resume RESUME, grouped

One flag per field: `--FIELD`, typed by the annotation (`X | None` takes X) and defaulted by the
instance. A boolean's help says what the field does when True. One that defaults to False becomes
the switch `--FIELD`; one that defaults to True the pair `--FIELD` / `--no_FIELD` (its aliases
turn it off too, as `--no_FIELD` does), listed together in `--help`. A field's `group` opens an
argument group that the following fields join until the next one names another (the sections of
`--help`, as in SiT's train.py). A field whose value is itself a dataclass contributes its own
fields, flat (`--time_mean`, not `--flow.time_mean`).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", *,
           factory: Callable[[], Any] | None = None, aliases: Sequence[str] = (),
           choices: Sequence[Any] | None = None, group: str | None = None,
           required: bool = False, metavar: str | None = None, repeat: bool = False,
           flag: str | None = None) -> Any:
    """A dataclass field with what its command-line flag needs (see the module docstring).
    `repeat`: the flag may be given several times and collects strings (the field parses them);
    `flag`: the flag's name where it is not the field's (`--model_override` for a dict of them)."""
    meta = dict(help=help, aliases=tuple(aliases), choices=choices, group=group,
                required=required, metavar=metavar, repeat=repeat, flag=flag)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def count_or_auto(value: str | int, flag: str, error: type[Exception] = ValueError) -> int | None:
    """A flag that takes `auto` (None) or a whole number >= 1; anything else raises `error` with
    one line naming the flag."""
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise error(f"--{flag} must be auto or a number >= 1, got {value!r}")
    return n


def add_flags(parser: argparse.ArgumentParser, config: Any,
              choices: dict[str, Sequence[Any]] | None = None,
              exclude: Sequence[str] = (), unset: bool = False) -> None:
    """Add one flag per field of the dataclass instance `config` (and of nested dataclasses).
    `choices` supplies choices known only at run time, by field name; `exclude` names fields
    that get no flag here (another function adds them, or they are not for the command line);
    `unset`: a flag not given parses to None (its help still names the field's default), for
    commands where something else (a named recipe) may fill it."""
    groups: dict[str, Any] = {}
    current: list[Any] = [parser]

    def add(cfg: Any, section: str | None = None) -> None:
        hints = typing.get_type_hints(type(cfg))
        for f in dataclasses.fields(cfg):
            if f.name in exclude:  # nor does it open its group
                continue
            meta = f.metadata
            title = meta.get("group") or section
            if title:
                if title not in groups:
                    groups[title] = parser.add_argument_group(title)
                current[0] = groups[title]
            value = getattr(cfg, f.name)
            if dataclasses.is_dataclass(value):
                add(value, title)
                continue
            _add_flag(current[0], f.name, _flag_type(hints[f.name]), value, meta,
                      (choices or {}).get(f.name, meta.get("choices")), unset)

    add(config)


def values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The parsed flags that are fields of dataclass `cls` or of its nested dataclasses, flat."""
    names: set[str] = set()

    def collect(c: type) -> None:
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            nested = hints[f.name]
            if dataclasses.is_dataclass(nested):
                collect(nested)
            else:
                names.add(f.name)

    collect(cls)
    return {k: v for k, v in vars(args).items() if k in names}


def _flag_type(hint: Any) -> Any:
    """The type a flag parses to: `X | None` and `Optional[X]` give X."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return typing.get_origin(hint) or hint


def _add_flag(target: Any, name: str, kind: Any, default: Any, meta: Any, choices: Any,
              unset: bool = False) -> None:
    help_text = meta.get("help") or ""
    names = [meta.get("flag") or f"--{name}", *meta.get("aliases", ())]
    if kind is bool and default is True:
        names.insert(1, f"--no_{name}")
        target.add_argument(*names, dest=name, action=_OnOff, default=True,
                            help=f"{help_text} (default: on)" if help_text else "default: on")
        return
    if kind is bool:
        target.add_argument(*names, dest=name, action="store_true", help=help_text or None)
        return
    if meta.get("repeat"):
        target.add_argument(*names, dest=name, action="append", default=[],
                            metavar=meta.get("metavar"), help=help_text or None)
        return
    if default is not None and not meta.get("required"):
        shown = f"{default}".replace("%", "%%")
        help_text = f"{help_text} (default: {shown})" if help_text else f"default: {shown}"
    target.add_argument(*names, dest=name, type=kind,
                        default=None if meta.get("required") or unset else default,
                        required=bool(meta.get("required")),
                        choices=list(choices) if choices is not None else None,
                        metavar=meta.get("metavar"), help=help_text or None)


class _OnOff(argparse.Action):
    """A switch that is on by default: its first option string (`--FIELD`) sets it, every other
    one (`--no_FIELD` and the aliases) clears it."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def format_usage(self) -> str:
        return " | ".join(self.option_strings[:2])

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, option_string == self.option_strings[0])

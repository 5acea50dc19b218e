"""How a setting is declared: one dataclass field holds its type (the annotation), default, help,
allowed values and role (whether it shapes the stage's output), and every config checks itself
against them when built.

The CLI's flags (flags.py), the notebooks' configs, saved configs and the presets all derive from
these declarations and pass through the same check; an output's identity (stages.output_identity)
derives from the roles.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from ..core.errors import CxrError


# What a setting is to the output its stage makes (its `role`; stages.output_identity reads it).
SHAPES = "shapes"  # it changes what is made: a rerun into the same output must keep it (the default)
RUN = "run"  # how far or how the run goes, what it shows, or where an input is read (the stage records
#              the input's content apart): a rerun may change it and continue the output
VOLATILE = "volatile"  # where the output goes, whether it may replace or resume one: never compared


def setting(default: Any = dataclasses.MISSING, *, help: str = "", min: float | None = None,
            max: float | None = None, above: float | None = None, below: float | None = None,
            choices: tuple | None = None, multiple_of: int | None = None, why: str = "",
            flag: str = "", role: str = SHAPES, when: str = "", path: bool = False,
            default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help and range: min/max inclusive, above/below exclusive.

    flag: a command-line name other than the field's (kept where the flag predates the field).
    role: SHAPES, RUN or VOLATILE, what the setting is to the stage's output.
    when: the boolean setting without which this one does nothing (then it shapes nothing).
    path: a file or folder (or a hub id): it shapes the output by its content, not by its name."""
    rules = {k: v for k, v in dict(min=min, max=max, above=above, below=below, choices=choices,
                                   multiple_of=multiple_of).items() if v is not None}
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"rules": rules, "why": why, "help": help, "flag": flag, "role": role,
                                       "when": when, "path": path})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_flag(f: dataclasses.Field) -> str:
    """The command-line flag of a field: its declared flag, else its name with dashes."""
    return flag_name(f.metadata.get("flag") or f.name)


def field_type(hint: Any) -> tuple[Any, bool]:
    """(the type inside an Optional, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def item_type(hint: Any) -> Any:
    """The item type of a tuple[X, ...] or list[X], else None."""
    return typing.get_args(hint)[0] if typing.get_origin(hint) in (tuple, list) else None


_KIND = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def _type_ok(value: Any, hint: Any) -> bool:
    inner, optional = field_type(hint)
    if value is None:
        return optional
    if inner is bool:
        return isinstance(value, bool)
    if inner is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if inner is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if inner is str:
        return isinstance(value, str)
    if item_type(inner) is not None:  # JSON gives lists for tuples; either is fine
        return isinstance(value, (tuple, list)) and all(_type_ok(v, item_type(inner)) for v in value)
    return True


def _describe(hint: Any) -> str:
    inner, optional = field_type(hint)
    item = item_type(inner)
    kind = f"a list of {_KIND.get(item, 'values')} values" if item else _KIND.get(inner, str(inner))
    return kind + (" or none" if optional else "")


def show_choice(choice: Any) -> str:
    return repr(choice) if choice == "" else str(choice)


def range_text(rules: dict) -> str:
    """The allowed values in words, e.g. "at least 0.0 and less than 1.0"; "" when anything goes."""
    if "choices" in rules:
        options = [show_choice(c) for c in rules["choices"]]
        return f"{', '.join(options[:-1])} or {options[-1]}"
    if "multiple_of" in rules:
        return f"a positive multiple of {rules['multiple_of']}"
    low = f"at least {rules['min']}" if "min" in rules else f"more than {rules['above']}" if "above" in rules else ""
    high = f"at most {rules['max']}" if "max" in rules else f"less than {rules['below']}" if "below" in rules else ""
    return " and ".join(b for b in (low, high) if b)


def _outside_choices(value: Any, choices: tuple) -> list:
    """The values not among the choices: of a list setting, its items (each must be a choice)."""
    values = value if isinstance(value, (tuple, list)) else [value]
    return [v for v in values if v not in choices]


def _in_range(value: Any, rules: dict) -> bool:
    if "choices" in rules:
        return not _outside_choices(value, rules["choices"])
    if "multiple_of" in rules and (value < rules["multiple_of"] or value % rules["multiple_of"]):
        return False
    return not (("min" in rules and value < rules["min"]) or ("above" in rules and value <= rules["above"])
                or ("max" in rules and value > rules["max"]) or ("below" in rules and value >= rules["below"]))


def check_settings(cfg: Any) -> None:
    """Types, finiteness and ranges of every field: one sentence naming the setting, else None."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), field_flag(f)
        if not _type_ok(value, hints[f.name]):
            raise CxrError(f"{flag} must be {_describe(hints[f.name])}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise CxrError(f"{flag} must be a finite number, got {value}")
        rules, why = f.metadata.get("rules", {}), f.metadata.get("why", "")
        if value is None or not rules or _in_range(value, rules):
            continue
        why = f" ({why})" if why else ""
        if "choices" in rules:
            unknown = _outside_choices(value, rules["choices"])
            shown = ", ".join(unknown) if isinstance(value, (tuple, list)) else repr(value)
            raise CxrError(f"{flag} {shown} {'is' if len(unknown) == 1 else 'are'} not known; "
                           f"use {range_text(rules)}{why}")
        raise CxrError(f"{flag} must be {range_text(rules)}{why}, got {value}")


class Checked:
    """Mixin: a stage config checks its settings when built (and when `replace`d)."""

    def __post_init__(self) -> None:
        check_settings(self)

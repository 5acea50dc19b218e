"""Command-line flags generated from a stage's dataclass: one flag per field, declared once in
config.py with settings.setting.

A flag's kind comes from the field's annotation (bool: --x / --no-x; a tuple or list: one or more
values; X | None: an X), its help, default and allowed values from the declaration. Every flag's
own default is None (not given), so that the preset's values apply unless the flag is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from .presets import PRESET_CHOICES
from .settings import field_flag, field_type, item_type, range_text

PRESET_HELP = (f"a named profile: {', '.join(PRESET_CHOICES)}; its settings for this stage override the "
               "defaults, and the flags given here override it (default: none)")


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def show_default(value: Any) -> str:
    """A default as the help shows it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or (isinstance(value, (tuple, list)) and not value):
        return "none"
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return '""' if value == "" else str(value)


def _help(f: dataclasses.Field, required: bool) -> str:
    allowed = range_text(f.metadata.get("rules", {}))
    tail = "required" if required else f"default: {show_default(field_default(f))}"
    text = f"{f.metadata.get('help', '')} ({allowed + '; ' if allowed else ''}{tail})"
    return text.replace("%", "%%")  # argparse formats help with %


def _kind(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """add_argument's type / nargs / action (and metavar) for a field's annotation."""
    inner, _ = field_type(hint)
    if inner is bool:
        return {"action": argparse.BooleanOptionalAction}
    choices = f.metadata.get("rules", {}).get("choices")
    metavar = "{" + ",".join(choices) + "}" if choices else field_flag(f)[2:].upper().replace("-", "_")
    if item_type(inner) is not None:
        return {"nargs": "+", "type": item_type(inner), "metavar": metavar}
    return {"type": inner, "metavar": metavar}


def add_config_flags(parser: argparse.ArgumentParser, cls: type, required: tuple[str, ...] = (),
                     exclusive: tuple[str, ...] = ()) -> None:
    """A flag per field of `cls`, then --preset. required: fields the command line must give;
    exclusive: fields of which at most one may be given."""
    hints = typing.get_type_hints(cls)
    group = parser.add_mutually_exclusive_group() if exclusive else None
    for f in dataclasses.fields(cls):
        target = group if f.name in exclusive else parser
        extra = {"required": True} if f.name in required else {}
        target.add_argument(field_flag(f), dest=f.name, default=None, help=_help(f, f.name in required),
                            **_kind(f, hints[f.name]), **extra)
    parser.add_argument("--preset", choices=PRESET_CHOICES, metavar="NAME", help=PRESET_HELP)


def given_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` as parsed (None: not given)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}

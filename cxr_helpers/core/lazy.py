"""A package's public names, loaded from its submodules when first used: importing a package
stays light (`check-gpu` runs before torch is fixed), its heavy parts load on demand."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, where: dict[str, str]) -> tuple[Callable, Callable]:
    """(__getattr__, __dir__) for `package`, whose name N lives in submodule `where[N]`.

    A name must never equal a submodule's name: importing the submodule would replace it."""

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        setattr(sys.modules[package], name, value)  # the next look-up is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__

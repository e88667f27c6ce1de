"""Names a package exports but imports only at first use (PEP 562), so that importing the package, or
the ``ptv2`` command line checking its flags, does not load torch and transformers (about 5 s)."""

from __future__ import annotations

import sys
from importlib import import_module


def lazy_exports(package: str, homes: dict):
    """``(__getattr__, __dir__)`` for ``package``: each name in ``homes`` (name -> relative module) is
    imported from its module when first read, then kept in the package's namespace."""
    def __getattr__(name):
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(homes[name], package), name)
        setattr(sys.modules[package], name, value)  # found directly from now on
        return value

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(homes))

    return __getattr__, __dir__

"""The errors resprune raises on purpose: every one derives from :class:`ResPruneError`.

They mean bad input, a missing or out-of-date file, or a run that cannot go on, and their
message names the problem. The command line prints them as one line (exit status 2); any
other exception is a bug and keeps its traceback. Each also derives from the built-in type
that callers caught before the hierarchy existed (``ValueError``, ``FileNotFoundError``,
``RuntimeError``), so ``except ValueError`` around a recipe still works.

This module imports nothing, so every part of the package (the stand-alone ``data`` and
``qmc`` packages included) can use it.
"""

from __future__ import annotations

__all__ = ["ResPruneError"]


class ResPruneError(Exception):
    """Base class of the errors resprune raises on purpose (see the module docstring)."""

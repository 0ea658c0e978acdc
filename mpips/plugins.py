"""User code named on the command line as ``package.module:name`` (``--model``, ``--loss``). Pure."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["load_callable"]


def load_callable(path: str, flag: str, error: type[Exception], expected: str) -> Callable[..., Any]:
    """The callable ``path`` (``package.module:name``) names.

    Args:
        path: what the user wrote.
        flag: the flag it came from, for the message (``--model``).
        error: the exception type to raise (an input error: said once, exit 2).
        expected: what the flag accepts, for the message (``mlp, cnn, gpt or package.module:factory``).

    Raises:
        error: one line naming the flag and what is wrong: not ``module:name``, the module does
            not import (with its own error), or it has no callable of that name.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise error(f"{flag} {path!r}: expected {expected}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while it is imported
        raise error(f"{flag} {path!r}: cannot import {module_name}: {type(exc).__name__}: {exc}"
                    " (is its folder on PYTHONPATH on every node?)") from exc
    found = getattr(module, attr, None)
    if not callable(found):
        what = "has no" if found is None else "has a non-callable"
        raise error(f"{flag} {path!r}: module {module_name} ({module.__file__}) {what} {attr!r}")
    return found

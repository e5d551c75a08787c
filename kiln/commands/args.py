"""Parsed command-line arguments into the options dataclasses the stages take.

`kiln eval` (EvalOptions) and `kiln generate` (SamplingParams) name their flags after the
dataclass fields, so one function carries every field across instead of each command listing
`field=args.field` again.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def options_from(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """`cls` built from the parsed arguments named like its fields (lists become tuples).

    Fields with no same-named argument keep their defaults; `given` sets fields directly.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    values = dict(given)
    for f in dataclasses.fields(cls):
        if f.name not in values and hasattr(args, f.name):
            v = getattr(args, f.name)
            values[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**values)

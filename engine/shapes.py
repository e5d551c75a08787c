"""Shape ranges of every engine input and output, per optimization profile.

The export names each dynamic ONNX axis (batch, sequence, past_sequence, total_sequence) and
writes output axes as expressions of them ("past_sequence + sequence"). A GPU profile gives
(min, opt, max) for those names (profiles.ShapeRange.axes), so each input's range follows by
substitution, and each output's by evaluating its expression at min, opt and max. The engine
cannot be inspected without a GPU, so these ranges in engine.json are the runtime's only
source of truth.
"""

from __future__ import annotations

import ast
import logging
import operator
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from kiln.engine.errors import ProfileError
from kiln.engine.profiles import ShapeRange

log = logging.getLogger(__name__)

Dim = int | str
Range = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

_OPS: dict[type[ast.operator], Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
}


def fit_to_model(shapes: tuple[ShapeRange, ...], max_positions: int | None) -> list[ShapeRange]:
    """Clip context ranges to the model's position limit (longer contexts cannot run anyway)."""
    if not max_positions:
        return list(shapes)
    out = []
    for s in shapes:
        if s.max_context <= max_positions:
            out.append(s)
            continue
        log.info(
            "profile %s: max_context %d exceeds the model's %d positions; clipped to %d",
            s.name,
            s.max_context,
            max_positions,
            max_positions,
        )
        mx = max_positions
        out.append(
            replace(
                s,
                max_context=mx,
                max_sequence=min(s.max_sequence, mx),
                opt_context=min(s.opt_context, mx),
                opt_sequence=min(s.opt_sequence, mx),
            )
        )
    return out


def input_ranges(inputs: list[dict[str, Any]], shape: ShapeRange) -> dict[str, Range]:
    """(min, opt, max) shape of every input for one optimization profile."""
    axes = shape.axes()
    return {v["name"]: _resolve(v, axes, shape) for v in inputs}


def tensor_ranges(
    io: dict[str, list[dict[str, Any]]], shape: ShapeRange
) -> dict[str, dict[str, Any]]:
    """For the manifest: each I/O tensor's dtype and min/opt/max shape in one profile."""
    axes = shape.axes()
    out = {}
    for mode in ("inputs", "outputs"):
        for v in io[mode]:
            lo, opt, hi = _resolve(v, axes, shape)
            out[v["name"]] = {
                "mode": mode[:-1],
                "dtype": v["dtype"],
                "min": list(lo),
                "opt": list(opt),
                "max": list(hi),
            }
    return out


def _resolve(v: dict[str, Any], axes: dict[str, tuple[int, int, int]], shape: ShapeRange) -> Range:
    dims: list[tuple[int, int, int]] = []
    for d in v["shape"]:
        if isinstance(d, int) and d > 0:
            dims.append((d, d, d))
            continue
        try:
            expr = str(d)
            dims.append((_eval(expr, axes, 0), _eval(expr, axes, 1), _eval(expr, axes, 2)))
        except (KeyError, SyntaxError, ValueError) as e:
            raise ProfileError(
                f"ONNX tensor {v['name']!r} has axis {d!r}, which GPU profile shape "
                f"{shape.name!r} cannot size (it sizes {', '.join(axes)}): export with kiln, "
                "whose axes carry those names."
            ) from e
    lo, opt, hi = (tuple(x[i] for x in dims) for i in range(3))
    return lo, opt, hi


def _eval(expr: str, axes: dict[str, tuple[int, int, int]], which: int) -> int:
    """Evaluate an axis expression like 'past_sequence + sequence' at min/opt/max."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Name):
            return axes[node.id][which]
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(expr)

    return walk(ast.parse(expr, mode="eval"))

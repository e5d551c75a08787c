"""Graph passes as Steps over an in-memory `ir.Model`, and the helpers passes share."""

from __future__ import annotations

import importlib
import pkgutil
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import onnx_ir as ir

from kiln.steps import Result, Step


def op_counts(model: ir.Model) -> Counter[str]:
    """How many nodes of each op type the main graph holds."""
    return Counter(n.op_type for n in model.graph)


def count_delta(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    """Nodes removed (negative) or added (positive) per op type, omitting unchanged ones."""
    keys = sorted(set(before) | set(after))
    return {k: after[k] - before[k] for k in keys if after[k] != before[k]}


class GraphPass(Step[ir.Model]):
    """A Step over an ONNX model held in onnx-ir form, registered by its class `name`."""

    @classmethod
    def for_model(cls, config: Mapping[str, Any]) -> GraphPass:
        """Build the pass for one model; `config` is export.json's `config` record.

        Most passes need no model facts; those that do (the onnxruntime target's RoPE cache
        length, the sliding window) override this, so the registry builds every pass alike.
        """
        return cls()


class IrPass(GraphPass):
    """Wrap an onnx-ir pass (`onnx_ir.passes.common.*`) as a Step, counting nodes it removed.

    Subclasses set `name` and `ir_pass`, a zero-argument factory of the wrapped pass.
    """

    ir_pass: ClassVar[Callable[[], ir.passes.PassBase]]

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Apply the wrapped pass in place and report the change by op type."""
        before = op_counts(model)
        inits = len(model.graph.initializers)
        # Through the class: a factory stored on it is not a method of this instance.
        result = type(self).ir_pass()(model)
        counts = count_delta(before, op_counts(model))
        removed_inits = inits - len(model.graph.initializers)
        if removed_inits:
            counts["initializers"] = -removed_inits
        return Result(result.model, changed=bool(result.modified), counts=counts)


def passes_in(*packages: str) -> tuple[type[GraphPass], ...]:
    """Every GraphPass class that names itself in the modules of `packages`, in file order.

    A module, or each module of a package folder, is imported; a class counts when it sets
    `name` itself (bases such as FusionPass do not), so a new pass file registers by existing.
    """
    found: list[type[GraphPass]] = []
    for package in packages:
        mod = importlib.import_module(package)
        modules = [mod]
        if hasattr(mod, "__path__"):
            subs = sorted(m.name for m in pkgutil.iter_modules(mod.__path__))
            modules += [importlib.import_module(f"{package}.{m}") for m in subs]
        for m in modules:
            for obj in vars(m).values():
                if (
                    isinstance(obj, type)
                    and issubclass(obj, GraphPass)
                    and obj.__module__ == m.__name__
                    and "name" in vars(obj)
                ):
                    found.append(obj)
    return tuple(found)


def set_opset(model: ir.Model, version: int) -> None:
    """Raise the default-domain opset import to at least `version`.

    Safe for the exporter's graphs: the ops kiln emits (Cast, Reshape, Shape, Squeeze, ...)
    gained types, not different semantics, between opset 18 and 23 (ONNX Changelog).
    """
    if model.opset_imports.get("", 0) < version:
        model.opset_imports[""] = version
        model.graph.opset_imports[""] = version

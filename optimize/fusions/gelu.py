"""Gelu (opset 20) from the exported tanh or erf formula (GPT-2's gelu_new, BERT-style gelu).

onnxscript's own Gelu rules emit com.microsoft FastGelu/Gelu, which TensorRT-RTX does not parse
(docs/tensorrt-rtx/README.md: FastGelu unsupported), and its tanh pattern associates 0.5*x
differently from the dynamo export, so kiln states the two patterns here and emits the standard op.
"""

from __future__ import annotations

import math
from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter._basics import MatchContext
from onnxscript.rewriter._context import TapeBuilder
from onnxscript.rewriter._pattern_ir import ValuePattern
from onnxscript.rewriter.pattern import MatchResult, OpsetPatternBuilder, Var

from kiln.optimize.fusions.base import FusionPass, has_ops

_C = {"half": 0.5, "cube": 0.044715, "sqrt_2_over_pi": math.sqrt(2 / math.pi), "one": 1.0}


def _is(v: ir.Value, want: float) -> bool:
    got = _ir_utils.get_singleton_value(v)
    return isinstance(got, float) and math.isclose(got, want, rel_tol=1e-3)


class GeluTanhFusion(pattern.RewriteRuleClassBase):
    """(0.5 * x) * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))) -> Gelu(x, approximate=tanh)."""

    def pattern(
        self, op: OpsetPatternBuilder, x: Var, half: Var, three: Var, cube: Var, s2pi: Var, one: Var
    ) -> ValuePattern:
        """The tanh formula as the dynamo exporter associates it."""
        inner = op.Mul(op.Add(x, op.Mul(op.Pow(x, three), cube)), s2pi)
        gelu: ValuePattern = op.Mul(op.Mul(x, half), op.Add(op.Tanh(inner), one))
        return gelu

    def check(
        self,
        op: MatchContext,
        half: ir.Value,
        three: ir.Value,
        cube: ir.Value,
        s2pi: ir.Value,
        one: ir.Value,
        **_: Any,
    ) -> MatchResult:
        """Every constant must be the formula's."""
        result = MatchResult()
        for v, want in ((half, 0.5), (three, 3.0), (cube, 0.044715), (s2pi, _C["sqrt_2_over_pi"])):
            if not _is(v, want):
                return result.fail(f"constant is not {want}", v)
        if not _is(one, 1.0):
            return result.fail("constant is not 1", one)
        return result

    def rewrite(self, op: TapeBuilder, x: ir.Value, **_: Any) -> ir.Value:
        """One standard Gelu node."""
        gelu: ir.Value = op.Gelu(x, approximate="tanh")
        return gelu


class GeluErfFusion(pattern.RewriteRuleClassBase):
    """x * 0.5 * (1 + erf(x / sqrt(2))) -> Gelu(x)."""

    def pattern(
        self, op: OpsetPatternBuilder, x: Var, sqrt2: Var, one: Var, half: Var
    ) -> ValuePattern:
        """The erf formula."""
        gelu: ValuePattern = op.Mul(op.Mul(x, op.Add(op.Erf(op.Div(x, sqrt2)), one)), half)
        return gelu

    def check(
        self, op: MatchContext, sqrt2: ir.Value, one: ir.Value, half: ir.Value, **_: Any
    ) -> MatchResult:
        """Every constant must be the formula's."""
        result = MatchResult()
        for v, want in ((sqrt2, math.sqrt(2)), (one, 1.0), (half, 0.5)):
            if not _is(v, want):
                return result.fail(f"constant is not {want}", v)
        return result

    def rewrite(self, op: TapeBuilder, x: ir.Value, **_: Any) -> ir.Value:
        """One standard Gelu node."""
        gelu: ir.Value = op.Gelu(x)
        return gelu


GELU_RULES = pattern.RewriteRuleSet([GeluTanhFusion.rule(), GeluErfFusion.rule()], commute=True)


class GeluFusionPass(FusionPass):
    """The tanh and erf GELU formulas -> Gelu (opset 20)."""

    name = "gelu"
    produces = "Gelu"
    opset = 20

    def rules(self, model: ir.Model) -> pattern.RewriteRuleSet:
        """Return the two Gelu rules."""
        return GELU_RULES

    def expected(self, model: ir.Model) -> str | None:
        """GELU leaves Tanh (approximate) or Erf (exact) behind."""
        for op in ("Tanh", "Erf"):
            if has_ops(model, op):
                return f"the graph has {op}"
        return None

"""What every fusion pass shares: apply an onnxscript rule set, count rewrites, explain misses.

kiln's rules (here and in ort/) type their hooks as onnxscript calls them: `pattern(op:
OpsetPatternBuilder, *Var)`, `check(op: MatchContext, *ir.Value)` and `rewrite(op: TapeBuilder,
*ir.Value)`. check's context is named `op` because PatternBase.check names it so, and mypy holds
an override to its base's parameter names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from kiln.optimize.base import GraphPass, set_opset
from kiln.steps import Result

if TYPE_CHECKING:
    from onnxscript.rewriter.pattern import RewriteRuleSet


def closest_miss(rules: RewriteRuleSet, model: ir.Model) -> str:
    """Why the rule set's best partial match failed, from onnxscript's MatchingTracer."""
    from onnxscript.rewriter import MatchingTracer

    tracer = MatchingTracer()
    rules.apply_to_model(model, tracer=tracer)
    best = None
    for rule, matches in tracer.best_matches_map.items():
        for m in matches:
            if best is None or m.score() > best[1].score():
                best = (rule, m)
    if best is None:
        return "no node matched the pattern's root"
    rule, info = best
    reason = info.match_result.reason or "pattern mismatch"
    return (
        f"closest: rule {rule.name or type(rule).__name__} matched {len(info.match_result.nodes)} "
        f"nodes, then {info.status.name.lower()}: {reason}"
    )


class FusionPass(GraphPass):
    """Apply `rules()`; report rewrites by `produces`, or why an expected fusion missed."""

    produces: ClassVar[str]
    opset: ClassVar[int] = 18
    # Run only where the activations have a fused attention kernel (Precision.attention_kernel).
    needs_attention_kernel: ClassVar[bool] = False

    def rules(self, model: ir.Model) -> RewriteRuleSet:
        """The onnxscript RewriteRuleSet to apply."""
        raise NotImplementedError

    def expected(self, model: ir.Model) -> str | None:
        """A reason to expect a match in this graph (None: nothing to fuse here is normal)."""
        return None

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Apply the rules in place; name what was expected when nothing matched."""
        before = sum(1 for n in model.graph if n.op_type == self.produces)
        rules = self.rules(model)
        count = rules.apply_to_model(model)
        if count:
            set_opset(model, self.opset)
            # Rewritten values carry no types; later passes (precision) need them.
            common_passes.ShapeInferencePass()(model)
        counts = {self.produces: count}
        notes = []
        if before:
            notes.append(f"{before} {self.produces} already in the graph (from the exporter)")
        why = self.expected(model) if not count else None
        if why:
            notes.append(f"no match although {why}; {closest_miss(rules, model)}")
        return Result(model, changed=count > 0, counts=counts, notes=notes)


def has_ops(model: ir.Model, *ops: str) -> bool:
    """True when the graph holds every one of `ops`."""
    present = {n.op_type for n in model.graph}
    return all(op in present for op in ops)

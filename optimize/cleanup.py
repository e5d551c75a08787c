"""Cleanup passes, each wrapping an onnxscript / onnx-ir pass.

Constant folding, shape-op simplification, identity and dead-code removal, common
subexpressions, deduplicated initializers.

The tied-embedding pass lives in tied_embedding.py; it is cleanup too but kiln's own rewrite.
"""

from __future__ import annotations

from functools import partial

import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from kiln.optimize.base import GraphPass, IrPass, count_delta, op_counts
from kiln.optimize.tied_embedding import TiedEmbeddingPass
from kiln.steps import Result


class FoldConstantsPass(GraphPass):
    """Fold nodes whose inputs are all constant (onnxscript's folder, with shape inference).

    The exporter already ran onnxscript's optimizer; this catches what earlier passes expose.
    Transposes of a tensor that a Gather also reads are left alone: folding them would store a
    tied embedding twice (see tied_embedding.py).
    """

    name = "fold-constants"

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Fold constants in place and count the nodes that went away."""
        from onnxscript.optimizer import fold_constants

        before = op_counts(model)
        result = fold_constants(model, onnx_shape_inference=True, should_fold=_keep_tied_transpose)
        counts = count_delta(before, op_counts(model))
        return Result(model, changed=bool(result.modified), counts=counts)


def _keep_tied_transpose(node: ir.Node) -> bool | None:
    if node.op_type != "Transpose" or not node.inputs or node.inputs[0] is None:
        return None
    src = node.inputs[0]
    if src.is_initializer() and any(u.op_type == "Gather" for u, _ in src.uses()):
        return False
    return None


class SimplifyPass(GraphPass):
    """onnxscript's default rewrite rules: no-op removal, slice/reshape/cast simplification."""

    name = "simplify"

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Apply the default rule set in place."""
        from onnxscript import rewriter

        before = op_counts(model)
        rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES)(model)  # the set optimize() uses
        counts = count_delta(before, op_counts(model))
        return Result(model, changed=bool(counts), counts=counts)


class RemoveIdentityPass(IrPass):
    """Drop Identity nodes."""

    name = "remove-identity"
    ir_pass = common_passes.IdentityEliminationPass


class LiftConstantsPass(IrPass):
    """Constant nodes -> initializers (every size), so later passes see one kind of constant."""

    name = "lift-constants"
    ir_pass = partial(common_passes.LiftConstantsToInitializersPass, size_limit=0)


class DedupInitializersPass(IrPass):
    """Initializers with equal contents -> one."""

    name = "dedup-initializers"
    ir_pass = common_passes.DeduplicateHashedInitializersPass


class CsePass(IrPass):
    """Common subexpressions -> one node."""

    name = "cse"
    ir_pass = common_passes.CommonSubexpressionEliminationPass


class RemoveUnusedPass(IrPass):
    """Drop nodes no graph output depends on."""

    name = "remove-unused"
    ir_pass = common_passes.RemoveUnusedNodesPass


# The cleanup sequence, in the order it runs (tolerance: the graph's own precision).
CLEANUP_PASSES: tuple[type[GraphPass], ...] = (
    FoldConstantsPass,
    SimplifyPass,
    RemoveIdentityPass,
    LiftConstantsPass,
    DedupInitializersPass,
    CsePass,
    TiedEmbeddingPass,
    RemoveUnusedPass,
)

"""Fusion passes by name (one fusion per file): exported subgraphs -> ops TensorRT fuses."""

from __future__ import annotations

from collections.abc import Callable

from kiln.optimize.base import GraphPass
from kiln.optimize.fusions.attention import AttentionFusionPass
from kiln.optimize.fusions.gelu import GeluFusionPass
from kiln.optimize.fusions.layer_norm import LayerNormFusionPass
from kiln.optimize.fusions.rms_norm import RmsNormFusionPass
from kiln.optimize.fusions.rotary_embedding import RotaryEmbeddingFusionPass

FUSION_PASSES: dict[str, Callable[[], GraphPass]] = {
    "layer-norm": LayerNormFusionPass,
    "rms-norm": RmsNormFusionPass,
    "gelu": GeluFusionPass,
    "rotary-embedding": RotaryEmbeddingFusionPass,
    "attention": AttentionFusionPass,
}

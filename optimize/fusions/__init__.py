"""Fusion passes (one fusion per file): exported subgraphs -> ops TensorRT fuses.

FUSION_PASSES is the order the tensorrt target runs them in (optimize/passes.py); a new fusion
is its file plus its place here.
"""

from __future__ import annotations

from kiln.optimize.fusions.attention import AttentionFusionPass
from kiln.optimize.fusions.base import FusionPass
from kiln.optimize.fusions.gelu import GeluFusionPass
from kiln.optimize.fusions.layer_norm import LayerNormFusionPass
from kiln.optimize.fusions.rms_norm import RmsNormFusionPass
from kiln.optimize.fusions.rotary_embedding import RotaryEmbeddingFusionPass

FUSION_PASSES: tuple[type[FusionPass], ...] = (
    LayerNormFusionPass,
    RmsNormFusionPass,
    GeluFusionPass,
    RotaryEmbeddingFusionPass,
    AttentionFusionPass,
)

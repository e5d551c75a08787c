"""Let fp32 attention build: mark TensorRT's IAttention layers decomposable where they need it.

TensorRT-RTX 1.7 has no dedicated fp32 kernel for IAttention; the build fails with "Attention
operation was not supported by a dedicated kernel ... may be marked as decomposable" unless
`IAttention.decomposable = True`, which lets it lower the op to MatMul/Softmax layers
(docs/tensorrt-rtx/README.md, "build failures and their fixes"). fp16/bf16
attention keeps the fused kernel. `kiln optimize` records the need as
`engine_hints.attention_decomposable`; export folders carry no hints (their opset-24 static
graphs hold Attention too), so the parsed network's attention output types decide as well.
"""

from __future__ import annotations

import logging
from typing import Any

from kiln.engine.builder import Backend, Network

log = logging.getLogger(__name__)

# TensorRT-RTX's build error when an IAttention has no dedicated kernel: every fp32 one, and
# some fp16 shapes (the eval model's: 2 query heads over 1 KV head of 64); engine/__init__.py
# then builds again with every attention layer decomposable.
NO_ATTENTION_KERNEL = "Attention operation was not supported by a dedicated kernel"


def attention_layers(backend: Backend, net: Network) -> list[Any]:
    """The network's IAttention objects (one per ATTENTION_OUTPUT layer)."""
    t = backend.trt
    found = []
    for layer in net.layers():
        if layer.type == t.LayerType.ATTENTION_OUTPUT:
            layer.__class__ = t.IAttentionOutputLayer  # the binding returns the ILayer base
            found.append(layer)
    return found


def mark_decomposable(backend: Backend, net: Network, hint: bool | None) -> dict[str, Any]:
    """Set decomposable on fp32 attention (or all attention when the hint asks); describe it."""
    layers = attention_layers(backend, net)
    fp32 = [a for a in layers if backend.dtype_name(a.get_output(0).dtype) == "float32"]
    chosen = layers if hint else fp32
    for layer in chosen:
        layer.attention.decomposable = True
    why = (
        "engine_hints.attention_decomposable"
        if hint
        else "fp32 attention has no dedicated TensorRT-RTX kernel"
        if fp32
        else "not needed"
    )
    if chosen:
        log.info("attention: %d of %d layers decomposable (%s)", len(chosen), len(layers), why)
    return {"layers": len(layers), "decomposable": len(chosen), "why": why}

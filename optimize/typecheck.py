"""Strict ONNX type checking: the gate that catches Float x Half leftovers before TensorRT does."""

from __future__ import annotations

import onnx_ir as ir

from kiln.errors import KilnError


def check_types(model: ir.Model, *, what: str) -> None:
    """Run onnx's shape inference in strict mode with type checks; raise naming the first error.

    TensorRT-RTX networks are always strongly typed, so a graph that fails here fails there
    (docs/tensorrt-rtx/README.md: strict inference caught the exact mismatch TensorRT rejected).
    """
    import onnx

    proto = ir.serde.serialize_model(model)
    try:
        onnx.shape_inference.infer_shapes(proto, strict_mode=True, check_type=True, data_prop=False)
    except onnx.shape_inference.InferenceError as e:
        raise KilnError(
            f"{what} fails strict ONNX type checking: {str(e).strip().splitlines()[0]}\n"
            "This is a bug in the pass that produced it; skip the pass (--skip) meanwhile."
        ) from e

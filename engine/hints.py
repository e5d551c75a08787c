"""What to do about a TensorRT parse error: the optimize pass or profile change that fixes it.

Each rule was seen on TensorRT-RTX 1.7 (docs/tensorrt-rtx/README.md, "build
failures and their fixes" and "Fused ops"); the first matching rule wins.
"""

from __future__ import annotations

# (op type or "" for any, text in the error or "" for any, the fix)
_RULES: tuple[tuple[str, str, str], ...] = (
    (
        "",
        "Failed to parse the ONNX model",
        "the file is not a readable ONNX model (truncated or corrupt): re-run `kiln export` "
        "(or `kiln optimize`) to regenerate it",
    ),
    (
        "",
        "cannot be found",
        "the ONNX file does not exist: pass the artifact folder that `kiln export` or "
        "`kiln optimize` wrote",
    ),
    (
        "GroupQueryAttention",
        "",
        "com.microsoft GroupQueryAttention has no TensorRT plugin: run `kiln optimize` with the "
        "tensorrt target, which emits the standard opset-23 Attention (native GQA)",
    ),
    (
        "MatMulNBits",
        "",
        "com.microsoft MatMulNBits has no TensorRT plugin: quantize with `kiln optimize "
        "--precision int4` (weight-only DequantizeLinear) instead of onnxruntime's quantizer",
    ),
    (
        "Attention",
        "one output",
        "TensorRT's Attention takes no past/present: keep the KV concat outside the op "
        "(the tensorrt target of `kiln optimize` does)",
    ),
    (
        "TensorScatter",
        "circular",
        "only mode='linear' TensorScatter maps to a KV-cache update: re-export the static cache "
        "with linear mode",
    ),
    (
        "",
        "build-time constant",
        "an axes/shape input is computed at run time: fold constants with `kiln optimize` "
        "(cleanup pass) or export with optimize=True",
    ),
    (
        "",
        "same input types",
        "mixed float types (e.g. Float x Half): run `kiln optimize --precision fp16`, whose "
        "result passes strict ONNX type checking, instead of converting by hand",
    ),
    (
        "",
        "Plugin not found",
        "the op is neither standard ONNX nor a plugin TensorRT ships: rewrite it to standard ops "
        "(`kiln optimize`) or export without it",
    ),
    (
        "",
        "external",
        "the ONNX's external weight file is missing: keep model.onnx.data next to model.onnx",
    ),
)

_DEFAULT = (
    "the op or attribute is not supported by this TensorRT version: check the TensorRT ONNX "
    "operator list; `kiln optimize` folds or rewrites most export leftovers"
)


def parse_hint(op: str, desc: str) -> str:
    """The fix for one parse error, from its op type and message."""
    low = desc.lower()
    for rule_op, text, fix in _RULES:
        if rule_op and rule_op != op:
            continue
        if text and text.lower() not in low:
            continue
        return fix
    return _DEFAULT

"""Precisions: one record per label that every stage asks, instead of its own table.

A label names what a graph computes in: fp32 / fp16 / bf16 are float graphs (weights and
activations in that type); int8 / int4 are weight-only quantized graphs over fp16 activations
(DequantizeLinear on constant weights); fp8 is FP8 E4M3 Q/DQ over fp16 activations. The export
stage writes the float labels it can trace, the optimize stage makes every label (passes named
here, registered in optimize/passes.py), the engine stage reads the label back off the parsed
graph (engine/precision.py) and refuses GPUs below the record's compute capability
(engine/profiles.py), and kiln/parity.py judges drift by the record's tolerance.

Adding a precision: one record here and the pass that makes it (optimize/precision/*.py, or
optimize/ort/ for the onnxruntime target). This module imports nothing heavy: the CLI reads it
for `choices=`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import ConfigError


@dataclass(frozen=True)
class Tol:
    """Allowed drift: |got - ref| <= atol + rtol * |ref| elementwise, and greedy agreement."""

    atol: float
    rtol: float
    agree: float = 1.0  # fraction of positions whose argmax must match the reference


# numpy-style name of each float type activations can carry (as engine/builder.py names
# TensorRT's types and torch names its dtypes).
_FLOAT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

# Where a label can be made: `kiln export` traces it, or `kiln optimize --target` makes it for
# a runtime. Each refusal says why and what to do instead.
OPTIMIZE_TARGETS = ("tensorrt", "onnxruntime")
TARGETS = ("export", *OPTIMIZE_TARGETS)
_REFUSALS = {
    "export": (
        "is not written by `kiln export` (it traces weights and activations in one float type; "
        "quantized and bf16 graphs come from `kiln optimize`)",
        "or export fp32 and run `kiln optimize --precision {name}`",
    ),
    "onnxruntime": (
        "is not offered for target 'onnxruntime' (ONNX Runtime CPU kernels: fp32 activations, "
        "int8/int4 weight-only MatMulNBits)",
        "or --target tensorrt for {name}",
    ),
}


@dataclass(frozen=True)
class Precision:
    """What one precision label means to every stage.

    `quantizer` and `ort_quantizer` are pass names (optimize/passes.py PASSES) that run after
    the activation cast on the tensorrt and onnxruntime targets; `quantized` lists the
    quantized tensors (role and dtype, as engine/precision.py reads them from a parsed
    TensorRT network) that mark a graph of this label.
    """

    name: str
    activations: str  # the float label activations carry (a key of _FLOAT_DTYPES)
    tol: Tol  # drift allowed against the fp32 reference (kiln/parity.py TOL)
    min_compute_capability: float  # TensorRT builds (NVIDIA support matrix)
    exported: bool = False  # `kiln export --precision` writes it
    quantizer: str | None = None  # tensorrt target: the pass after the activation cast
    onnxruntime: bool = False  # offered on the onnxruntime target (fp32 activations only)
    ort_quantizer: str | None = None  # onnxruntime target: its weight quantizer pass
    quantized: frozenset[str] = frozenset()  # quantized tensor kinds; empty: a float graph

    @property
    def dtype(self) -> str:
        """numpy-style name of the activations' float type, e.g. 'float16'."""
        return _FLOAT_DTYPES[self.activations]

    @property
    def cast(self) -> str | None:
        """The pass that retypes an fp32 graph to these activations (named after them).

        fp32 has none: an fp32 graph is what the exporter writes.
        """
        return None if self.activations == FP32.name else self.activations

    @property
    def attention_kernel(self) -> bool:
        """Whether TensorRT-RTX has a dedicated IAttention kernel at these activations.

        It has none for fp32, so an fp32 graph keeps MatMul/Softmax attention (or marks a
        fused Attention decomposable).
        """
        return self.activations != FP32.name

    @property
    def sm(self) -> str:
        """The minimum compute capability as TensorRT-RTX names it, e.g. 'SM89'."""
        return f"SM{round(self.min_compute_capability * 10)}"

    def offered(self, target: str) -> bool:
        """Whether `target` (one of TARGETS) can make this precision."""
        return {"export": self.exported, "tensorrt": True, "onnxruntime": self.onnxruntime}[target]

    def made_by(self) -> str:
        """The commands that make a graph of this precision, for error messages."""
        ways = [f"`kiln export --precision {self.name}`"] if self.exported else []
        if self.cast or self.quantizer:
            ways.append(f"`kiln optimize --precision {self.name}`")
        return " or ".join(ways)


# Tolerances: calibrated on the bundled model and tiny random models of every family
# (optimize/NOTES.md has the per-model figures); fp32: max abs logit error <= 1e-4 against PyTorch.
FP32 = Precision(
    "fp32",
    activations="fp32",
    tol=Tol(atol=1e-4, rtol=0.0),
    min_compute_capability=7.5,
    exported=True,
    onnxruntime=True,
)
FP16 = Precision(
    "fp16",
    activations="fp16",
    tol=Tol(atol=2e-2, rtol=1e-2, agree=0.99),
    min_compute_capability=7.5,
    exported=True,
)
BF16 = Precision(
    "bf16",
    activations="bf16",
    tol=Tol(atol=1e-1, rtol=5e-2, agree=0.95),
    min_compute_capability=8.0,  # bf16 from Ampere
)
# Weight-only / FP8 graphs (kiln optimize), judged against the fp32 export and PyTorch. Floors
# calibrated on random-weight tiny models, whose near-tied logits flip easily; the bundled model
# keeps 100% (per-model figures: optimize/NOTES.md). A broken scale gives ~0.
INT8 = Precision(
    "int8",
    activations="fp16",  # onnxruntime target: fp32 activations (MatMulNBits over fp32)
    tol=Tol(atol=2.5e-1, rtol=1e-1, agree=0.9),
    min_compute_capability=7.5,
    quantizer="int8-weight-only",
    onnxruntime=True,
    ort_quantizer="matmul-nbits-int8",
    quantized=frozenset({"weights int8", "weights uint8"}),
)
INT4 = Precision(
    "int4",
    activations="fp16",
    tol=Tol(atol=2.0, rtol=2.5e-1, agree=0.6),
    min_compute_capability=7.5,
    quantizer="int4-weight-only",
    onnxruntime=True,
    ort_quantizer="matmul-nbits-int4",
    quantized=frozenset({"weights int4"}),
)
FP8 = Precision(
    "fp8",
    activations="fp16",
    tol=Tol(atol=2.5, rtol=1e-1, agree=0.7),
    # FP8 types cannot be compiled below Ada (TensorRT-RTX: hardware-specific datatypes).
    min_compute_capability=8.9,
    quantizer="fp8-qdq",
    quantized=frozenset({"activations float8e4m3", "weights float8e4m3"}),
)
PRECISIONS: dict[str, Precision] = {p.name: p for p in (FP32, FP16, BF16, INT8, INT4, FP8)}


def names_for(target: str) -> tuple[str, ...]:
    """The labels `target` (one of TARGETS) can make, in table order (CLI `choices=`)."""
    return tuple(n for n, p in PRECISIONS.items() if p.offered(target))


def precision_named(name: str, *, target: str = "tensorrt") -> Precision:
    """The record called `name`, or a ConfigError naming the choices when `target` cannot make it.

    `target` is one of TARGETS: "export" for `kiln export`, else a `kiln optimize --target`.
    """
    record = PRECISIONS.get(name)
    if record is None:
        raise ConfigError(
            f"precision {name!r} is not supported; choose one of {', '.join(PRECISIONS)}."
        )
    if not record.offered(target):
        why, fix = _REFUSALS[target]
        raise ConfigError(
            f"precision {name!r} {why}; choose one of {', '.join(names_for(target))}, "
            f"{fix.format(name=name)}."
        )
    return record

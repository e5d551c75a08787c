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
    """Allowed drift of one output (logits of a call, or one layer's K or V) and greedy agreement.

    Against a reference of the same type (a reduced precision against fp32, one graph against
    another): |got - ref| <= atol + scale * max|ref| + rtol * |ref| elementwise; `scale` ties the
    budget to the output's own magnitude (the logit scale), which grows with depth and init.

    Against float64 (`noise` set: fp32 graphs checked against PyTorch, export/check.py), per
    output: max|got - f64| <= noise * min(max|torch fp32 - f64|, noise_cap * max|f64|) + floor.
    The graph may round at most `noise` times as badly as PyTorch fp32 does on the same inputs,
    plus a tiny absolute floor for outputs PyTorch computes (almost) exactly. PyTorch fp32's own
    error counts only up to `noise_cap` of the output's magnitude, what fp32 rounding can
    explain: a PyTorch reference that is further off float64 is itself wrong (a module changed
    by tracing) and must not widen the budget.
    """

    atol: float
    rtol: float
    agree: float = 1.0  # fraction of positions whose argmax must match the reference
    scale: float = 0.0  # budget per unit of max|ref| of the output
    noise: float | None = None  # factor over PyTorch fp32's own error against float64
    floor: float = 0.0  # absolute floor of the float64 check
    noise_cap: float = 0.0  # most of PyTorch fp32's error that counts, per unit of max|f64|

    def budget(self, ref_max_abs: float) -> float:
        """The elementwise absolute budget (before rtol) of an output whose max|ref| is given."""
        return self.atol + self.scale * ref_max_abs


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


# Tolerances: calibrated on the bundled model, tiny random models of every family (max |logit|
# ~0.6) and the real-scale shapes of tests/tiny_models.py (max |logit| 12 and 16); optimize/NOTES.md
# has the tiny and bundled models' figures, the real-scale ones are stated below.
# fp32 against PyTorch is judged against a float64 forward (export/check.py; export/README.md has
# the rule and the table): per output, the graph's max error may be 8x PyTorch fp32's own plus
# 1e-6, PyTorch's counted up to 1e-4 of the output's max|f64|. Measured graph/PyTorch error
# ratios: median 1.2-1.6, worst 2.9 (tiny Llama, static slots) and 3.0 (SmolLM-135M shape,
# concat; logits 2.25e-4 vs PyTorch's 1.68e-4): 8 leaves 2.7x for other CPUs' kernels. PyTorch
# fp32's own error is at most 1.4e-5 of max|logit| (SmolLM shape) and ~4e-7 (tiny): the cap
# leaves 7x over the first; a traced longrope module's wrong reference was 2% off. One RMSNorm
# gain 1% off moves the logits by 2.7e-4 (tiny) and 7e-4 to 0.16 (SmolLM shape, first to last
# layer) and K/V by >= 1.8e-3 in the layers after it: >= 1.8x past the budget. fp32 graph
# against graph (a pass's drift, kiln/steps.py): 1e-4 + 1e-5 of max|ref|; fusing the
# SmolLM-135M shape's norms drifts its logits by 8.2e-5 (max |logit| 12).
FP32 = Precision(
    "fp32",
    activations="fp32",
    tol=Tol(atol=1e-4, rtol=0.0, scale=1e-5, noise=8.0, floor=1e-6, noise_cap=1e-4),
    min_compute_capability=7.5,
    exported=True,
    onnxruntime=True,
)
FP16 = Precision(
    "fp16",
    activations="fp16",
    # + 2.5% of max|ref|: PyTorch in fp16 is off its fp32 by 5e-4 on a tiny Llama (max |logit|
    # 0.6) and 0.29 on the SmolLM-135M shape (2.4% of max |logit| 12).
    tol=Tol(atol=2e-2, rtol=1e-2, agree=0.99, scale=2.5e-2),
    min_compute_capability=7.5,
    exported=True,
)
BF16 = Precision(
    "bf16",
    activations="bf16",
    # + 15% of max|ref|: bf16 PyTorch is off fp32 by 3.7e-3 (tiny) and 1.7 (SmolLM shape, 14%).
    tol=Tol(atol=1e-1, rtol=5e-2, agree=0.95, scale=1.5e-1),
    min_compute_capability=8.0,  # bf16 from Ampere
)
# Weight-only / FP8 graphs (kiln optimize), judged against the fp32 export and PyTorch. Floors
# calibrated on random-weight tiny models, whose near-tied logits flip easily; the bundled model
# keeps 100% (per-model figures: optimize/NOTES.md). A broken scale gives ~0. Their absolute
# budgets (>= 0.25) are already >= 2% of a real-scale logit range and are not scaled (no
# real-scale quantized figures yet).
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

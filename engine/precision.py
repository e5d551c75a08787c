"""The precision an ONNX graph carries, read from the types TensorRT parsed.

TensorRT-RTX and TensorRT 11 are strongly typed: no builder flag picks the precision, the
graph's tensor types do. So kiln reads the precision off the parsed network and refuses to
build a profile whose `precision` differs, instead of building an engine nobody asked for.
- activations: the dtype of the float model outputs (logits, present KV);
- quantized tensors: each Quantize/Dequantize counted by role (weights: a constant input;
  activations) and dtype; the record in kiln/precisions.py whose `quantized` kinds cover them
  names the graph (int8 / int4 weight-only, fp8 Q/DQ), as `kiln optimize --precision` does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from kiln.engine.builder import Backend, Network
from kiln.engine.errors import ProfileError
from kiln.engine.profiles import GpuProfile, available_profiles, load_profile
from kiln.precisions import PRECISIONS

# Float labels by the numpy-style dtype name TensorRT's types map to (engine/builder.py).
_FLOATS = {p.dtype: p.name for p in PRECISIONS.values() if p.activations == p.name}


@dataclass(frozen=True)
class GraphPrecision:
    """What the graph computes in: a label (kiln/precisions.py, or below) plus the evidence."""

    label: str
    activations: str
    quantized: dict[str, int] = field(default_factory=dict)  # "weights int8": count, ...

    def describe(self) -> str:
        """E.g. 'fp16 (activations float16, no quantized tensors)'."""
        q = ", ".join(f"{n} {k}" for k, n in sorted(self.quantized.items())) or "no quantized"
        return f"{self.label} (activations {self.activations}; {q} tensors)"


def precision_of(backend: Backend, net: Network) -> GraphPrecision:
    """Classify the parsed network by its output dtypes and its Q/DQ layers."""
    t = backend.trt
    floats = [
        backend.dtype_name(o.dtype) for o in net.outputs() if backend.dtype_name(o.dtype) in _FLOATS
    ]
    activations = Counter(floats).most_common(1)[0][0] if floats else "float32"
    producers = _producer_types(net)
    quantized: Counter[str] = Counter()
    for layer in net.layers():
        if layer.type == t.LayerType.QUANTIZE:  # Q on a constant: weights stored as QDQ
            src, q = layer.get_input(0), backend.dtype_name(layer.get_output(0).dtype)
        elif layer.type == t.LayerType.DEQUANTIZE:
            src = layer.get_input(0)
            q = backend.dtype_name(src.dtype)
            if producers.get(src.name) == "QUANTIZE":
                continue  # the Q of this pair was counted
        else:
            continue
        role = "weights" if producers.get(src.name) == "CONSTANT" else "activations"
        quantized[f"{role} {q}"] += 1
    return GraphPrecision(_label(activations, quantized), activations, dict(quantized))


def _label(activations: str, quantized: Counter[str]) -> str:
    kinds = set(quantized)
    if not kinds:
        return _FLOATS[activations]
    for p in PRECISIONS.values():
        if p.quantized and kinds <= p.quantized:
            return p.name
    if any(k.startswith("activations") for k in kinds):
        return "int8-activations"  # int8 QDQ on activations: no shipped profile builds it
    return "mixed-weights"  # quantized weights of more than one label: kiln makes none


def _producer_types(net: Network) -> dict[str, str]:
    out: dict[str, str] = {}
    for layer in net.layers():
        kind = str(layer.type).rsplit(".", 1)[-1]
        for i in range(layer.num_outputs):
            out[layer.get_output(i).name] = kind
    return out


def check_precision(found: GraphPrecision, profile: GpuProfile, artifact: str) -> None:
    """Raise ProfileError when the artifact's precision is not the profile's, naming the fix."""
    if found.label == profile.precision:
        return
    fitting = [n for n in available_profiles() if _precision_of_profile(n) == found.label]
    make = PRECISIONS[profile.precision].made_by()
    raise ProfileError(
        f"{artifact} is {found.describe()}, but GPU profile {profile.name!r} builds "
        f"{profile.precision}; TensorRT takes the precision from the ONNX types, so make a "
        f"{profile.precision} artifact with {make}, or pick a {found.label} profile"
        f" ({', '.join(fitting) or 'none shipped: write one in models/gpus/'})."
    )


def _precision_of_profile(name: str) -> str | None:
    try:
        return load_profile(name).precision
    except Exception:  # a broken shipped profile must not hide the real error
        return None

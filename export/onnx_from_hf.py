"""Trace a transformers model into one ONNX graph with a KV cache, via torch's dynamo exporter.

Why dynamo at opset 18 (evidence: docs/tensorrt-rtx/README.md, re-checked here):
- dynamo emits about half the nodes of the TorchScript exporter (470 vs 965 TensorRT layers on a
  tiny GPT-2) and no TracerWarnings, whose Python-bool branches can bake shapes into the graph;
- named `Dim`s give the graph readable dynamic axes (batch, sequence, past_sequence);
- opset 18 lowers sdpa to MatMul/Softmax, which ONNX Runtime and every TensorRT version run in
  every precision. Opset 23's fused Attention fails TensorRT-RTX builds in fp32 ("not supported
  by a dedicated kernel"), so fusing to opset-23 ops is the optimize stage's job, per target.
`optimize=True` is required: unoptimized graphs keep ReduceMean axes as computed inputs, which
TensorRT rejects ("Axis input must resolve to a build-time constant").
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch

from kiln.errors import ExportError
from kiln.export.patches import sequence_dependent_rope_in_graph
from kiln.layouts import CONCAT, KVLayout
from kiln.models.families import ModelShape
from kiln.precisions import precision_named

log = logging.getLogger(__name__)

# protobuf cannot hold more than 2 GiB; stay clear of the limit with graph overhead included.
EXTERNAL_DATA_BYTES = 1_800_000_000


def _rename_total_axis(model: onnx.ModelProto) -> None:
    """Give the mask's inferred axis (an opaque `s53`) the readable name `total_sequence`."""
    mask = next((i for i in model.graph.input if i.name == "attention_mask"), None)
    if mask is None:  # a layout without a mask input
        return
    auto = mask.type.tensor_type.shape.dim[1].dim_param
    if not auto or not re.fullmatch(r"s\d+", auto):
        return
    pattern = re.compile(rf"\b{auto}\b")
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    for v in values:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub("total_sequence", d.dim_param)


def onnx_from_hf(
    model: Any,
    shape: ModelShape,
    path: Path,
    *,
    precision: str,
    opset: int,
    layout: KVLayout = CONCAT,
    max_context: int | None = None,
) -> int:
    """Export `model` to `path` (plus `path.data` when large); returns the parameter bytes.

    The layout's record (export/layouts.py) gives the wrapper, example inputs and dynamic axes:
    concat takes a growing past, static fixed [batch, kv_heads, max_context, head_dim] buffers
    written in place (export/static_kv.py).
    """
    from kiln.export.layouts import export_layout

    how = export_layout(layout)
    dtype = getattr(torch, precision_named(precision, target="export").dtype)
    traced = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    wrapper = how.wrapper(traced, shape.layers).eval()
    args = how.example_inputs(shape, dtype, max_context)
    # Count each storage once: a tied LM head shares the embedding's tensor.
    unique: dict[int, torch.Tensor] = {t.data_ptr(): t for t in traced.state_dict().values()}
    weight_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    chatter = io.StringIO()  # the exporter prints its progress; keep it for -v and for errors
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with (
            sequence_dependent_rope_in_graph(traced),
            how.attention(),
            torch.no_grad(),
            contextlib.redirect_stdout(chatter),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                args,
                None,
                dynamo=True,
                opset_version=opset,
                input_names=layout.input_names(shape.layers),
                output_names=layout.output_names(shape.layers),
                dynamic_shapes=how.dynamic_shapes(shape.layers),
                custom_translation_table=how.translations(),
                optimize=True,
                verify=False,
            )
    except Exception as e:  # torch.export raises many unrelated types; all mean the same here
        log.debug("exporter output:\n%s", chatter.getvalue())
        raise ExportError(
            f"torch.onnx.export failed for {type(model).__name__}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}\nRun with -v for the exporter's log."
        ) from e
    log.debug("exporter output:\n%s", chatter.getvalue())
    assert program is not None, "torch.onnx.export(dynamo=True) returns an ONNXProgram"
    program.save(str(path), external_data=external)
    proto = onnx.load(str(path))
    _rename_total_axis(proto)
    proto.producer_name = "kiln"
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    # The exporter keeps folded constants (e.g. transposed weights) inline even with
    # external_data=True; move every tensor over 1 KiB out so the graph stays under 2 GiB.
    onnx.save(
        proto,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    return weight_bytes

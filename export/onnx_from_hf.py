"""Trace a transformers model into one ONNX graph with a KV cache, via torch's dynamo exporter.

Why dynamo at opset 18 (evidence: ../shared/research/tensorrt-rtx/README.md, re-checked here):
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
from kiln.export.patches import grouped_query_attention, sequence_dependent_rope_in_graph
from kiln.export.static_kv import (
    StaticKVWrapper,
    kv_write_onnx,
    native_gqa_attention,
    static_input_names,
)
from kiln.export.wrapper import FlatKVWrapper, input_names, output_names
from kiln.models.families import ModelShape
from kiln.precisions import precision_named

log = logging.getLogger(__name__)

# protobuf cannot hold more than 2 GiB; stay clear of the limit with graph overhead included.
EXTERNAL_DATA_BYTES = 1_800_000_000
# Example sizes for tracing: none may be 0 or 1, or torch.export specializes that axis.
_EXAMPLE_B, _EXAMPLE_S, _EXAMPLE_P = 2, 4, 3


def _example_inputs(shape: ModelShape, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    b, s, p = _EXAMPLE_B, _EXAMPLE_S, _EXAMPLE_P
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (b, s), generator=gen)
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s).expand(b, s).contiguous()
    kv = shape.kv_heads, shape.head_dim
    past = [
        torch.randn(b, kv[0], p, kv[1], generator=gen).to(dtype) for _ in range(2 * shape.layers)
    ]
    return (ids, mask, pos, *past)


def _static_example_inputs(
    shape: ModelShape, dtype: torch.dtype, max_context: int
) -> tuple[torch.Tensor, ...]:
    b, s = _EXAMPLE_B, _EXAMPLE_S
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (b, s), generator=gen)
    index = torch.tensor([_EXAMPLE_P, _EXAMPLE_P + 2])  # slots at different lengths
    pos = index[:, None] + torch.arange(s)[None, :]
    kv = (b, shape.kv_heads, max_context, shape.head_dim)
    return (ids, pos, index, *[torch.zeros(kv, dtype=dtype) for _ in range(2 * shape.layers)])


def _static_dynamic_shapes(layers: int) -> dict[str, Any]:
    from torch.export import Dim

    batch, seq = Dim("batch"), Dim("sequence")
    return {
        "input_ids": {0: batch, 1: seq},
        "position_ids": {0: batch, 1: seq},
        "write_index": {0: batch},
        "past": tuple({0: batch} for _ in range(2 * layers)),  # max_context is fixed
    }


def _dynamic_shapes(layers: int) -> dict[str, Any]:
    from torch.export import Dim

    batch, seq, past = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    # The mask's length is past + seq; stating that relation explicitly fails in torch.export
    # ("Only increasing linear operations with integer coefficients"), so AUTO infers it.
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: Dim.AUTO},
        "position_ids": {0: batch, 1: seq},
        "past": tuple({0: batch, 2: past} for _ in range(2 * layers)),  # must be a tuple
    }


def _rename_total_axis(model: onnx.ModelProto) -> None:
    """Give the mask's inferred axis (an opaque `s53`) the readable name `total_sequence`."""
    mask = next(i for i in model.graph.input if i.name == "attention_mask")
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
    kv: str = "concat",
    max_context: int | None = None,
) -> int:
    """Export `model` to `path` (plus `path.data` when large); returns the parameter bytes.

    kv="concat": past in, past + new out (dynamic past length). kv="static": fixed
    [batch, kv_heads, max_context, head_dim] buffers written in place (export/static_kv.py).
    """
    dtype = getattr(torch, precision_named(precision, target="export").dtype)
    traced = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    if kv == "static":
        assert max_context is not None  # export_model validates the options
        wrapper: torch.nn.Module = StaticKVWrapper(traced, shape.layers).eval()
        args = _static_example_inputs(shape, dtype, max_context)
        names, dynamic = static_input_names(shape.layers), _static_dynamic_shapes(shape.layers)
        translations: dict[Any, Any] | None = {torch.ops.kiln.kv_write.default: kv_write_onnx}
        gqa = native_gqa_attention()
    else:
        wrapper = FlatKVWrapper(traced, shape.layers).eval()
        args = _example_inputs(shape, dtype)
        names, dynamic = input_names(shape.layers), _dynamic_shapes(shape.layers)
        translations, gqa = None, grouped_query_attention()
    # Count each storage once: a tied LM head shares the embedding's tensor.
    unique = {t.data_ptr(): t for t in traced.state_dict().values()}
    weight_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    chatter = io.StringIO()  # the exporter prints its progress; keep it for -v and for errors
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with (
            sequence_dependent_rope_in_graph(traced),
            gqa,
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
                input_names=names,
                output_names=output_names(shape.layers),
                dynamic_shapes=dynamic,
                custom_translation_table=translations,
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
    program.save(str(path), external_data=external)
    proto = onnx.load(str(path))
    if kv == "concat":
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

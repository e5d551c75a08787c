"""The export stage's half of each KV layout: wrapper, example inputs, dynamic axes, parity plan.

kiln/layouts.py holds the graph contract (names, opsets, manifest record); this table adds what
tracing and checking a layout needs from torch. `onnx_from_hf` and `export_model` ask the
record of the chosen layout instead of branching on its name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kiln.export.check import DEFAULT_POINTS, STATIC_PLAN, ParityPlan, SlotSchedule, Trajectories
from kiln.export.patches import grouped_query_attention
from kiln.export.static_kv import StaticKVWrapper, kv_write_onnx, native_gqa_attention
from kiln.export.wrapper import FlatKVWrapper
from kiln.layouts import CONCAT, STATIC, KVLayout
from kiln.models.families import ModelShape

# Example sizes for tracing: none may be 0 or 1, or torch.export specializes that axis.
_EXAMPLE_B, _EXAMPLE_S, _EXAMPLE_P = 2, 4, 3


@dataclass(frozen=True)
class ExportLayout:
    """How to trace and check one KV layout."""

    layout: KVLayout
    wrapper: Callable[[Any, int], torch.nn.Module]  # (model, layers) -> flat-I/O module
    example_inputs: Callable[[ModelShape, torch.dtype, int | None], tuple[torch.Tensor, ...]]
    dynamic_shapes: Callable[[int], dict[str, Any]]  # layers -> torch.export dynamic shapes
    translations: Callable[[], dict[Any, Any] | None]  # custom ops -> ONNX functions
    attention: Callable[[], contextlib.AbstractContextManager[None]]  # how GQA is traced
    parity: ParityPlan  # what export/check.py runs against PyTorch


def _concat_example(
    shape: ModelShape, dtype: torch.dtype, max_context: int | None
) -> tuple[torch.Tensor, ...]:
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


def _concat_axes(layers: int) -> dict[str, Any]:
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


def _static_example(
    shape: ModelShape, dtype: torch.dtype, max_context: int | None
) -> tuple[torch.Tensor, ...]:
    assert max_context is not None  # KVLayout.check_options requires it
    b, s = _EXAMPLE_B, _EXAMPLE_S
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (b, s), generator=gen)
    index = torch.tensor([_EXAMPLE_P, _EXAMPLE_P + 2])  # slots at different lengths
    pos = index[:, None] + torch.arange(s)[None, :]
    kv = (b, shape.kv_heads, max_context, shape.head_dim)
    return (ids, pos, index, *[torch.zeros(kv, dtype=dtype) for _ in range(2 * shape.layers)])


def _static_axes(layers: int) -> dict[str, Any]:
    from torch.export import Dim

    batch, seq = Dim("batch"), Dim("sequence")
    return {
        "input_ids": {0: batch, 1: seq},
        "position_ids": {0: batch, 1: seq},
        "write_index": {0: batch},
        "past": tuple({0: batch} for _ in range(2 * layers)),  # max_context is fixed
    }


EXPORT_LAYOUTS: dict[str, ExportLayout] = {
    CONCAT.name: ExportLayout(
        layout=CONCAT,
        wrapper=FlatKVWrapper,
        example_inputs=_concat_example,
        dynamic_shapes=_concat_axes,
        translations=lambda: None,
        attention=grouped_query_attention,
        parity=Trajectories(DEFAULT_POINTS),
    ),
    STATIC.name: ExportLayout(
        layout=STATIC,
        wrapper=StaticKVWrapper,
        example_inputs=_static_example,
        dynamic_shapes=_static_axes,
        translations=lambda: {torch.ops.kiln.kv_write.default: kv_write_onnx},
        attention=native_gqa_attention,
        parity=SlotSchedule(STATIC_PLAN),
    ),
}


def export_layout(layout: KVLayout) -> ExportLayout:
    """The export stage's record for `layout`."""
    return EXPORT_LAYOUTS[layout.name]

"""KV-cache layouts: one record per layout that every stage asks, instead of comparing names.

- concat: `past_key_values.{i}.key/value [batch, Hkv, past, D]` in, `present = concat(past, new)`
  out; an `attention_mask [batch, past + new]` input; plain opset-18 ops any runtime runs.
- static: preallocated slot buffers `[slots, Hkv, max_context, D]` written in place at
  `write_index [slots]` with opset-24 TensorScatter (TensorRT: IKVCacheUpdateLayer); each row
  is a slot with its own length, so a finished slot is refilled while the others decode.

This module holds the graph contract only (names, opsets, manifest record, option checks); it
imports no stage. Torch-side parts (wrappers, parity plans) live in the export stage, keyed by
these records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.errors import ConfigError

# Letters: B rows (slots), S new tokens, P past length, M max_context, Hkv KV heads, D head dim.


def kv_names(prefix: str, layers: int) -> list[str]:
    """`{prefix}.{i}.key`, `{prefix}.{i}.value` for every layer, in graph order."""
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class KVLayout:
    """What a KV layout means for the graph: its inputs, opsets and how it updates the cache."""

    name: str
    default_opset: int
    min_opset: int
    leading_inputs: tuple[str, ...]  # graph inputs before the per-layer K/V, in order
    in_place: bool  # present aliases past (one buffer per layer, written at write_index)
    update: str  # how present is made from past, for the manifest
    mask: str  # what a query may attend to, for the manifest
    min_context: int = 0  # smallest max_context the export accepts (0: no max_context)
    help: str = ""

    @property
    def has_slots(self) -> bool:
        """True when rows are slots with fixed-length buffers (a max_context is part of it)."""
        return self.min_context > 0

    def input_names(self, layers: int) -> list[str]:
        """Graph input names in order: the leading inputs, then past K and V per layer."""
        return [*self.leading_inputs, *kv_names("past_key_values", layers)]

    def output_names(self, layers: int) -> list[str]:
        """Graph output names in order: logits, then present K and V per layer."""
        return ["logits", *kv_names("present", layers)]

    def record(self, max_context: int | None) -> dict[str, Any]:
        """The manifest's `kv_cache` record."""
        out: dict[str, Any] = {"layout": self.name}
        if self.has_slots:
            out["max_context"] = max_context
        return {**out, "update": self.update, "mask": self.mask}

    def check_options(self, max_context: int | None, opset: int | None) -> int:
        """Validate the export options of this layout; return the opset to export with."""
        if not self.has_slots:
            if max_context is not None:
                raise ConfigError(
                    f"--max-context applies to --kv {STATIC.name} only; drop it or add "
                    f"--kv {STATIC.name}."
                )
        elif max_context is None or max_context < self.min_context:
            raise ConfigError(
                f"--kv {self.name} needs --max-context N with N >= {self.min_context} "
                f"(got {max_context}): the slot buffers' fixed length."
            )
        if opset is not None and opset < self.min_opset:
            raise ConfigError(
                f"--kv {self.name} needs opset >= {self.min_opset} (TensorScatter), got {opset}; "
                "drop --opset."
            )
        return opset or self.default_opset


CONCAT = KVLayout(
    name="concat",
    default_opset=18,  # plain ops (see export/onnx_from_hf.py's module docstring)
    min_opset=18,
    leading_inputs=("input_ids", "attention_mask", "position_ids"),
    in_place=False,
    update="present = concat(past, new) along past_sequence",
    mask="attention_mask [batch, past + new]: 1 for real tokens, 0 for padding",
    help="past in, past+new out, dynamic length",
)
STATIC = KVLayout(
    name="static",
    default_opset=24,  # TensorScatter exists from opset 24
    min_opset=24,
    leading_inputs=("input_ids", "position_ids", "write_index"),
    in_place=True,
    update="TensorScatter(axis=-2, mode=linear) at write_index; present aliases past",
    mask="key j visible to query at write_index + i iff j <= write_index + i",
    # export/check.py's slot plan: the longest slot (9 + 20 tokens) must fit
    min_context=32,
    help="preallocated [batch, kv_heads, max_context, head_dim] slot buffers written in place "
    "at write_index with TensorScatter; TensorRT maps it to IKVCacheUpdateLayer",
)
LAYOUTS: dict[str, KVLayout] = {layout.name: layout for layout in (CONCAT, STATIC)}


def layout_named(name: str, *, where: str = "--kv") -> KVLayout:
    """The layout called `name`, or a ConfigError naming `where` it came from and the choices."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ConfigError(
            f"{where} {name!r} is not a cache layout; choose one of {', '.join(LAYOUTS)} "
            "(re-export the model with this kiln if a manifest says so)."
        ) from None


def layout_of_inputs(input_names: list[str] | tuple[str, ...]) -> KVLayout:
    """The layout whose leading inputs a graph has (a graph without a manifest at hand)."""
    for layout in LAYOUTS.values():
        if list(input_names[: len(layout.leading_inputs)]) == list(layout.leading_inputs):
            return layout
    raise ConfigError(
        f"graph inputs {list(input_names[:3])} match no kiln KV layout; export the model with "
        "`kiln export`."
    )

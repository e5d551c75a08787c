"""The static KV-cache layout: preallocated per-slot buffers written in place.

Inputs `past_key_values.{i}.key/value [batch, kv_heads, max_context, head_dim]` are buffers, one
row (slot) per sequence, and `write_index [batch]` says where each slot's new tokens go. New keys
and values are written with opset-24 `TensorScatter(axis=-2, mode="linear")`, which TensorRT maps
to IKVCacheUpdateLayer (present aliases past) and ONNX Runtime updates in place when past and
present share a buffer. Attention reads the whole buffer under a mask built from write_index, so
each slot has its own length and a finished slot can be refilled while the others decode.
The graph's names are kiln/layouts.py STATIC's.

A query at slot position q = write_index + i sees keys j <= q (and j > q - window for sliding
windows); positions past a slot's length are masked until overwritten, so right padding is safe.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

# Letters: B slots, S new tokens, M max_context, Hkv KV heads, D head dim.


@torch.library.custom_op("kiln::kv_write", mutates_args=())
def kv_write(
    cache_BHkvMD: torch.Tensor, new_BHkvSD: torch.Tensor, index_B: torch.Tensor
) -> torch.Tensor:
    """Eager TensorScatter(axis=-2, linear): cache[b, :, index[b] : index[b] + S] = new[b]."""
    out = cache_BHkvMD.clone()
    s = new_BHkvSD.shape[2]
    for b in range(out.shape[0]):
        i = int(index_B[b])
        out[b, :, i : i + s] = new_BHkvSD[b]
    return out


@kv_write.register_fake
def _(cache_BHkvMD: torch.Tensor, new_BHkvSD: torch.Tensor, index_B: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(cache_BHkvMD)


def kv_write_onnx(cache: Any, new: Any, index: Any) -> Any:
    """ONNX translation of kv_write: the standard opset-24 op, no custom domain."""
    import onnxscript

    return onnxscript.values.Opset("", 24).TensorScatter(cache, new, index, axis=-2, mode="linear")


class _SlotLayer(CacheLayerMixin):
    """One layer's K/V buffers; `update` writes this step's keys at each slot's write index."""

    is_sliding = False
    is_compileable = False
    # Allocated from the start (the mixin's are None until its lazy_initialization).
    keys: torch.Tensor
    values: torch.Tensor

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.index = keys, values, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Buffers arrive allocated; nothing to do."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values in place and hand attention the whole buffers."""
        self.keys = kv_write(self.keys, key_states, self.index)
        self.values = kv_write(self.values, value_states, self.index)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Attention spans the whole buffer; the mask decides what is visible."""
        return self.keys.shape[-2], 0

    def get_seq_length(self) -> int:
        """Unused: position ids and masks are always passed in explicitly."""
        return 0

    def get_max_length(self) -> int:
        """The buffer's fixed length, max_context."""
        return self.keys.shape[-2]


class StaticKVWrapper(torch.nn.Module):
    """(ids_BS, pos_BS, write_index_B, *buffers_BHkvMD) -> (logits, *buffers after the write)."""

    def __init__(self, model: Any, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers
        cfg = model.config
        window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        # Families that mix full and sliding layers take one mask per layer type.
        self.layer_types = sorted(set(types)) if types else None
        self.window = window if window and (types is None or "sliding_attention" in types) else None

    def _masks(self, write_index: torch.Tensor, s: int, m: int) -> Any:
        j = torch.arange(m, device=write_index.device)[None, None, None, :]
        q = (write_index[:, None] + torch.arange(s, device=write_index.device)[None, :])[
            :, None, :, None
        ]
        full = j <= q  # [B, 1, S, M] bool: True where a query may attend
        sliding = full & (j > q - self.window) if self.window else full
        if self.layer_types is None:
            return sliding
        return {t: sliding if t == "sliding_attention" else full for t in self.layer_types}

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        write_index: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """Run the model over the slots, writing this step's K/V at each slot's write index."""
        layers = [_SlotLayer(past[2 * i], past[2 * i + 1], write_index) for i in range(self.layers)]
        cache = Cache(layers=[*layers])  # its own list of the same layers (Cache's is invariant)
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=self._masks(write_index, input_ids.shape[1], past[0].shape[2]),
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        present: list[torch.Tensor] = []
        for layer in layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


@contextmanager
def native_gqa_attention() -> Iterator[None]:
    """Let transformers' sdpa path pass grouped K/V heads to sdpa instead of repeating them.

    With a mask, transformers repeats K/V heads (repeat_kv) for CUDA's sake; the exporter then
    emits Expand + Reshape before Attention. With enable_gqa the graph's opset-23/24 Attention
    takes kv_num_heads < q_num_heads natively, which TensorRT's IAttention supports.
    """
    from transformers.integrations import sdpa_attention

    original = sdpa_attention.use_gqa_in_sdpa
    sdpa_attention.use_gqa_in_sdpa = lambda *args, **kwargs: True
    try:
        yield
    finally:
        sdpa_attention.use_gqa_in_sdpa = original

"""A flat-I/O view of a transformers causal LM, the shape the ONNX graph takes.

ONNX graphs take tensors, not Cache objects: the wrapper rebuilds a DynamicCache from flat
`past_key_values.{i}.key/value` inputs and returns `present.{i}.key/value` outputs, so one graph
serves prefill (past length 0) and decode. The graph's names are kiln/layouts.py CONCAT's.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

# Letters in names: B batch, S new tokens, P past length, T = P + S, Hkv KV heads, D head dim.


class FlatKVWrapper(torch.nn.Module):
    """Run `model` on flat tensors: (ids_BS, mask_BT, pos_BS, *past_BHkvPD) -> (logits, *kv)."""

    def __init__(self, model: PreTrainedModel, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """Append this step's keys/values to the past ones and return logits and the new cache."""
        # A plain DynamicCache (no config) keeps every position in every layer, so present is
        # always past + seq long; sliding windows are applied by the attention mask instead of
        # by truncating the cache, which keeps one I/O contract for every family.
        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)

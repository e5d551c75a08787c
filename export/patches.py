"""Export-time rewrites of transformers modules whose eager code one static graph cannot follow.

transformers updates RoPE frequencies for "dynamic" (NTK) and "longrope" scaling by mutating a
buffer behind a Python branch on the running sequence length (modeling_rope_utils.
dynamic_rope_update). torch.export either refuses the branch (dynamic) or bakes in the frequencies
of the example input (longrope). The replacement forward computes the same frequencies from
each row's `max(position_ids) + 1` inside the graph, which is what HF's stateful code yields for
a sequence generated alone whose length only grows (prefill, then decode).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

log = logging.getLogger(__name__)

SEQUENCE_DEPENDENT_ROPE = ("dynamic", "longrope")


def _stateless_forward(rope: Any) -> Any:
    """A forward for `rope` that picks its frequencies in-graph from the positions it is given."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    init = ROPE_INIT_FUNCTIONS[rope.rope_type]
    if rope.rope_type == "longrope":
        params = rope.config.rope_parameters
        original_max = int(
            params.get("original_max_position_embeddings")
            or rope.config.original_max_position_embeddings
        )
        short = rope.original_inv_freq.detach().clone()
        long, _ = init(rope.config, short.device, seq_len=original_max + 1)

        def frequencies(seq_len_B1: torch.Tensor) -> torch.Tensor:
            return torch.where(seq_len_B1 > original_max, long, short)

    else:

        def frequencies(seq_len_B1: torch.Tensor) -> torch.Tensor:
            return init(rope.config, seq_len_B1.device, seq_len=seq_len_B1.float())[0]

    def forward(x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Per row: each sequence gets the frequencies it would get alone (HF switches on the
        # batch-wide maximum), so batching and slot refills never change a sequence's output.
        seq_len_B1 = position_ids.max(dim=-1, keepdim=True).values + 1
        inv_freq_BF = frequencies(seq_len_B1).to(torch.float32)
        freqs = position_ids[..., None].float() * inv_freq_BF[:, None, :]  # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * rope.attention_scaling
        sin = emb.sin() * rope.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)

    return forward


@contextmanager
def sequence_dependent_rope_in_graph(model: torch.nn.Module) -> Iterator[int]:
    """Within the block, rotary modules with length-dependent scaling compute it in-graph.

    Yields how many modules were patched; the originals are restored on exit.
    """
    patched: list[torch.nn.Module] = []
    for module in model.modules():
        if getattr(module, "rope_type", None) in SEQUENCE_DEPENDENT_ROPE:
            module.forward = _stateless_forward(module)
            patched.append(module)
    if patched:
        log.info(
            "rope: %d rotary module(s) compute %s scaling in-graph",
            len(patched),
            patched[0].rope_type,
        )
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward  # the instance attribute shadowed the class's forward

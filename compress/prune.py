"""Training-free structured pruning of a Hugging Face Llama-family causal LM (PyTorch).

Every cut is measured on calibration token sequences, never on held-out text:
- decoder layers by block influence (ShortGPT, Men et al. 2024): 1 - mean cosine similarity of
  the hidden state entering and leaving the layer; the layers that change it least go first;
- attention by whole KV groups (a KV head and the query heads sharing it, so GQA stays GQA):
  mean |attention output| of the group's heads times the norm of their o_proj columns;
- MLP channels: mean |act(gate) * up| of each intermediate channel times its down_proj column
  norm (the channel's typical contribution to the residual stream);
- vocabulary: the tokens a corpus uses (compress/vocab.py).
The same count is cut from every layer, so the config stays uniform and `kiln export` takes the
result as any model. Sizes are whole numbers of heads and channels; nothing is retrained.

Letters: L layers, T tokens, H hidden, F intermediate, G KV groups, D head dim.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.errors import ConfigError


@dataclass(frozen=True)
class PruneSpec:
    """How much to cut: fractions of layers, KV groups and MLP channels (0 keeps all)."""

    layers: float = 0.0
    kv_groups: float = 0.0
    mlp: float = 0.0

    def check(self) -> None:
        """Fractions in [0, 0.9]: more leaves nothing worth exporting."""
        for name, v in (("layers", self.layers), ("kv_groups", self.kv_groups), ("mlp", self.mlp)):
            if not 0.0 <= v <= 0.9:
                raise ConfigError(f"prune fraction {name}={v} must be within [0, 0.9].")


def _decoder(model: Any) -> Any:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(layers[0], "mlp") or not hasattr(layers[0].mlp, "gate_proj"):
        raise ConfigError(
            f"{type(model).__name__} is not a Llama-family decoder (model.layers[i].mlp.gate_proj,"
            " self_attn.q/k/v/o_proj); kiln prune supports Llama, Mistral, Qwen2/3 layouts."
        )
    return inner


@contextmanager
def _hooks(modules: list[Any], fn: Any, pre: bool = False) -> Iterator[None]:
    handles = [
        m.register_forward_pre_hook(fn(i)) if pre else m.register_forward_hook(fn(i))
        for i, m in enumerate(modules)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run(model: Any, sequences: list[list[int]]) -> None:
    import torch

    with torch.no_grad():
        for seq in sequences:
            model(torch.tensor([seq]), use_cache=False)


def layer_importance(model: Any, sequences: list[list[int]]) -> np.ndarray:
    """Block influence per layer [L]: 1 - mean cos(hidden in, hidden out); low = removable."""
    import torch

    layers = _decoder(model).layers
    sums = np.zeros(len(layers))
    counts = np.zeros(len(layers))

    def hook(i: int) -> Any:
        def f(mod: Any, args: Any, kwargs: Any, out: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            sums[i] += float((1 - cos).sum())
            counts[i] += cos.numel()

        return f

    handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in enumerate(layers)]
    try:
        _run(model, sequences)
    finally:
        for h in handles:
            h.remove()
    return sums / np.maximum(counts, 1)


def mlp_importance(model: Any, sequences: list[list[int]]) -> list[np.ndarray]:
    """Per layer [F]: mean |down_proj input| per channel times its down_proj column norm."""
    layers = _decoder(model).layers
    sums = [np.zeros(layer.mlp.down_proj.in_features) for layer in layers]
    n = [0]

    def hook(i: int) -> Any:
        def f(mod: Any, args: Any) -> None:
            a = args[0].detach().float().abs().reshape(-1, args[0].shape[-1])
            sums[i] += a.sum(0).numpy()
            if i == 0:
                n[0] += a.shape[0]

        return f

    with _hooks([layer.mlp.down_proj for layer in layers], hook, pre=True):
        _run(model, sequences)
    return [
        s / max(n[0], 1) * layer.mlp.down_proj.weight.detach().float().norm(dim=0).numpy()
        for s, layer in zip(sums, layers, strict=True)
    ]


def _heads(model: Any) -> tuple[int, int, int]:
    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, d


def kv_group_importance(model: Any, sequences: list[list[int]]) -> list[np.ndarray]:
    """Per layer [G]: Σ over the group's query heads of mean |o_proj input| x column norm."""
    layers = _decoder(model).layers
    heads, kv, d = _heads(model)
    per_group = heads // kv
    sums = [np.zeros(heads * d) for _ in layers]

    def hook(i: int) -> Any:
        def f(mod: Any, args: Any) -> None:
            a = args[0].detach().float().abs()
            sums[i] += a.reshape(-1, a.shape[-1]).sum(0).numpy()

        return f

    with _hooks([layer.self_attn.o_proj for layer in layers], hook, pre=True):
        _run(model, sequences)
    out = []
    for s, layer in zip(sums, layers, strict=True):
        col = layer.self_attn.o_proj.weight.detach().float().norm(dim=0).numpy()
        out.append((s * col).reshape(kv, per_group * d).sum(1))
    return out


def _slice_linear(lin: Any, keep: Any, dim: int) -> None:
    import torch

    with torch.no_grad():
        w = lin.weight.index_select(dim, keep).clone()
        lin.weight = torch.nn.Parameter(w)
        if lin.bias is not None and dim == 0:
            lin.bias = torch.nn.Parameter(lin.bias.index_select(0, keep).clone())
    if dim == 0:
        lin.out_features = w.shape[0]
    else:
        lin.in_features = w.shape[1]


def drop_layers(model: Any, remove: list[int]) -> None:
    """Delete decoder layers `remove` in place; renumber the rest and the config."""
    import torch

    inner = _decoder(model)
    kept = [layer for i, layer in enumerate(inner.layers) if i not in set(remove)]
    inner.layers = torch.nn.ModuleList(kept)
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        cfg.layer_types = [t for i, t in enumerate(types) if i not in set(remove)]
    cfg.num_hidden_layers = len(kept)


def prune_mlp(model: Any, keep_per_layer: list[np.ndarray]) -> None:
    """Keep the listed intermediate channels of every layer (the same count in each)."""
    import torch

    for layer, keep in zip(_decoder(model).layers, keep_per_layer, strict=True):
        idx = torch.as_tensor(np.sort(keep), dtype=torch.long)
        _slice_linear(layer.mlp.gate_proj, idx, 0)
        _slice_linear(layer.mlp.up_proj, idx, 0)
        _slice_linear(layer.mlp.down_proj, idx, 1)
    model.config.intermediate_size = len(keep_per_layer[0])


def prune_kv_groups(model: Any, keep_per_layer: list[np.ndarray]) -> None:
    """Keep the listed KV groups (with their query heads) in every layer."""
    import torch

    heads, kv, d = _heads(model)
    per_group = heads // kv
    for layer, keep in zip(_decoder(model).layers, keep_per_layer, strict=True):
        groups = np.sort(keep)
        q_rows = np.concatenate(
            [np.arange(g * per_group * d, (g + 1) * per_group * d) for g in groups]
        )
        kv_rows = np.concatenate([np.arange(g * d, (g + 1) * d) for g in groups])
        att = layer.self_attn
        _slice_linear(att.q_proj, torch.as_tensor(q_rows), 0)
        _slice_linear(att.k_proj, torch.as_tensor(kv_rows), 0)
        _slice_linear(att.v_proj, torch.as_tensor(kv_rows), 0)
        _slice_linear(att.o_proj, torch.as_tensor(q_rows), 1)
    kept = len(keep_per_layer[0])
    model.config.head_dim = d
    model.config.num_key_value_heads = kept
    model.config.num_attention_heads = kept * per_group


def prune(model: Any, sequences: list[list[int]], spec: PruneSpec) -> dict[str, Any]:
    """Apply `spec` in place (layers, then KV groups, then MLP channels); what was cut and why."""
    spec.check()
    record: dict[str, Any] = {}
    n_layers = model.config.num_hidden_layers
    cut = round(spec.layers * n_layers)
    if cut:
        score = layer_importance(model, sequences)
        remove = sorted(int(i) for i in np.argsort(score)[:cut])
        drop_layers(model, remove)
        record["layers"] = {"importance": score.round(6).tolist(), "removed": remove}
    _, kv, _ = _heads(model)
    cut = round(spec.kv_groups * kv)
    if cut:
        scores = kv_group_importance(model, sequences)
        prune_kv_groups(model, [np.argsort(s)[cut:] for s in scores])
        record["kv_groups"] = {"kept": kv - cut, "of": kv}
    f = model.config.intermediate_size
    cut = round(spec.mlp * f)
    if cut:
        scores = mlp_importance(model, sequences)
        prune_mlp(model, [np.argsort(s)[cut:] for s in scores])
        record["mlp"] = {"kept": f - cut, "of": f}
    return record


def params(model: Any) -> int:
    """Parameters stored (a tied table counted once)."""
    return int(sum(p.numel() for p in model.parameters()))

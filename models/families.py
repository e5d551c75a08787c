"""What kiln knows about each architecture family, as data rather than name checks.

A new Llama-like family is one `replace(LLAMA, ...)` line: the export wrapper is generic over
transformers' causal LMs, so a family only says where the shape lives in its config and which
of its features the exported graph must preserve.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from kiln.errors import UnsupportedModelError

# RoPE variants whose frequencies are fixed when the model is built, so one traced graph is exact
# for every length. "dynamic" (NTK) and "longrope" switch frequencies on the running sequence
# length, a data-dependent branch one static graph cannot follow.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class Family:
    """One architecture family: config attribute names and the features the graph preserves."""

    name: str
    model_types: tuple[str, ...]
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    mlp: str = "swiglu"  # "swiglu" | "gelu"
    positions: str = "rope"  # "rope" | "learned"
    qk_norm: bool = False
    kv_heads_attr: str | None = "num_key_value_heads"  # None: one KV head per query head
    rope_types: tuple[str, ...] = STATIC_ROPE_TYPES

    def shape(self, cfg: Any) -> ModelShape:
        """Read layer count, head counts and dims from a transformers config."""
        heads = int(cfg.num_attention_heads)
        hidden = int(cfg.hidden_size)
        kv = getattr(cfg, self.kv_heads_attr, None) if self.kv_heads_attr else None
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        return ModelShape(
            layers=int(cfg.num_hidden_layers),
            hidden=hidden,
            heads=heads,
            kv_heads=int(kv or heads),
            head_dim=int(head_dim),
            vocab=int(cfg.vocab_size),
            max_positions=int(getattr(cfg, "max_position_embeddings", 0) or 0),
        )

    def rope_type(self, cfg: Any) -> str | None:
        """The config's RoPE variant ('default' when unscaled), or None without RoPE."""
        if self.positions != "rope":
            return None
        params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        return str(params.get("rope_type") or params.get("type") or "default")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions the exported I/O signature is built from."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int


LLAMA = Family(name="llama", model_types=("llama",))
FAMILIES: tuple[Family, ...] = (
    Family(
        name="gpt2",
        model_types=("gpt2",),
        norm="layernorm",
        mlp="gelu",
        positions="learned",
        kv_heads_attr=None,
    ),
    LLAMA,
    replace(LLAMA, name="mistral", model_types=("mistral",)),
    replace(LLAMA, name="qwen2", model_types=("qwen2",)),
    replace(LLAMA, name="qwen3", model_types=("qwen3",), qk_norm=True),
    replace(LLAMA, name="phi3", model_types=("phi3",)),
)


def supported_model_types() -> list[str]:
    """Every config `model_type` kiln can export, sorted."""
    return sorted(t for f in FAMILIES for t in f.model_types)


def family_for(model_type: str | None, *, where: str = "config.json") -> Family:
    """The family of a config's model_type, or an error listing what kiln supports."""
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise UnsupportedModelError(
        f"Architecture model_type={model_type!r} ({where}) is not supported; kiln exports "
        f"{', '.join(supported_model_types())}. A Llama-like family is one line in "
        "models/families.py."
    )

"""The candidate space: the target, the knobs, and the candidates they span.

A knob is one decision with a default value set per target (`Knob.values`). Candidates are
the cartesian product of the knobs' values in registry order; [search] in the recipe narrows
or widens any knob's values. A calibrated or sparse knob value names a compression method of
optimize/methods.py METHODS (`METHOD_KNOB`, `SPARSITY_KNOB`), which holds its pass per optimize
target; tune/rules.py drops a value whose method or pass is missing, by name.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.artifacts import sha256_json
from kiln.errors import ConfigError
from kiln.precisions import PRECISIONS
from kiln.tune.recipe import Workload

if TYPE_CHECKING:
    from kiln.compress.prune import PruneSpec
    from kiln.engine.profiles import GpuProfile
    from kiln.optimize.methods import Method

CPU = "cpu"

# Knob value -> the optimize/methods.py METHODS entry that makes it (None: nothing added; "rtn"
# is the precision's own round-to-nearest quantizer, kiln/precisions.py). A method entry
# replaces the quantizer; a sparsity entry is added before the final cleanup.
METHOD_KNOB: dict[str, str | None] = {"rtn": None, "gptq": "gptq-int4", "mixed": "mixed"}
SPARSITY_KNOB: dict[str, str | None] = {
    "dense": None,
    "2:4": "sparse24",
    "2:4-calibrated": "sparse24-calibrated",
}


@dataclass(frozen=True)
class Target:
    """Where the recipe will run: the CPU (ONNX Runtime) or one GPU profile (TensorRT)."""

    name: str
    profile: GpuProfile | None = None
    cores: int = 1

    @property
    def is_cpu(self) -> bool:
        """True for the ONNX Runtime CPU target."""
        return self.profile is None

    @property
    def optimize_target(self) -> str:
        """The `kiln optimize --target` whose graphs this target runs."""
        return "onnxruntime" if self.is_cpu else "tensorrt"


def target_named(name: str) -> Target:
    """`cpu` or a GPU profile name / TOML path (models/gpus/)."""
    if name == CPU:
        return Target(CPU, cores=len(os.sched_getaffinity(0)))
    from kiln.engine.profiles import load_profile

    profile = load_profile(name)
    return Target(profile.name, profile=profile)


@dataclass(frozen=True)
class ModelShape:
    """What the rules and the cost model read from the model's config.json."""

    layers: int
    hidden: int
    intermediate: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int
    family: str = ""  # config.json model_type (llama, mistral, qwen2, gpt2, ...)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelShape:
        """From a Hugging Face config (llama-style names, gpt2 names as fallback)."""
        hidden = int(cfg.get("hidden_size") or cfg["n_embd"])
        heads = int(cfg.get("num_attention_heads") or cfg["n_head"])
        return cls(
            layers=int(cfg.get("num_hidden_layers") or cfg["n_layer"]),
            hidden=hidden,
            intermediate=int(cfg.get("intermediate_size") or 4 * hidden),
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            vocab=int(cfg["vocab_size"]),
            max_positions=int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 0),
            family=str(cfg.get("model_type", "")),
        )


@dataclass(frozen=True)
class Context:
    """Everything the knobs and rules may ask about."""

    target: Target
    workload: Workload
    shape: ModelShape
    calibration: Path | None = None  # training text for calibrated methods (never held out)


@dataclass(frozen=True)
class Knob:
    """One decision; `values(ctx)` is its default value set on that target."""

    name: str
    help: str
    values: Callable[[Context], tuple[Any, ...]]


def _threads(ctx: Context) -> tuple[int, ...]:
    return tuple(sorted({1, ctx.target.cores})) if ctx.target.is_cpu else (0,)


# Pruning works in whole channel groups: 32 is the smallest block the weight quantizers cut K
# into (optimize/precision/weight_only.py pick_block), so a pruned MLP stays quantizable.
CHANNEL_GROUP = 32
# Default MLP pruning: about 10% and 20% of the channels, snapped to whole channel groups.
PRUNE_DEFAULT = (0.1, 0.2)


def _prune(ctx: Context) -> tuple[float, ...]:
    groups = ctx.shape.intermediate // CHANNEL_GROUP
    cuts = sorted({round(f * groups) for f in PRUNE_DEFAULT} - {0})
    return (0.0, *(round(n * CHANNEL_GROUP / ctx.shape.intermediate, 6) for n in cuts))


def prune_spec(value: Any) -> PruneSpec:
    """A prune knob value as compress/prune.py PruneSpec.

    A number is the fraction of MLP channels cut; text like "layers=0.25,mlp=0.1" names any
    of PruneSpec's fractions (layers, kv_groups, mlp).
    """
    from kiln.compress.prune import PruneSpec

    if isinstance(value, int | float) and not isinstance(value, bool):
        return PruneSpec(mlp=float(value))
    parts: dict[str, float] = {}
    for item in str(value).split(","):
        key, sep, num = item.partition("=")
        try:
            parts[key.strip()] = float(num)
        except ValueError:
            sep = ""
        if not sep or key.strip() not in ("layers", "kv_groups", "mlp"):
            raise ConfigError(
                f"[search] prune value {value!r}: expected a fraction of MLP channels (0.1) or "
                'text like "layers=0.25,mlp=0.1" (keys layers, kv_groups, mlp).'
            )
    return PruneSpec(**parts)


def prune_label(value: Any) -> str:
    """Short text of a prune value: "" when it prunes nothing, else "mlp0.0833" and so on."""
    spec = prune_spec(value)
    return "".join(f"{k.replace('_', '')}{v:g}" for k, v in asdict(spec).items() if v)


def _kv(ctx: Context) -> tuple[str, ...]:
    return ("concat", "static") if ctx.target.is_cpu else ("concat",)


KNOBS: tuple[Knob, ...] = (
    Knob(
        "precision", "what the graph computes in (kiln/precisions.py)", lambda c: tuple(PRECISIONS)
    ),
    Knob(
        "method", "weight quantizer: round-to-nearest or calibrated", lambda c: tuple(METHOD_KNOB)
    ),
    Knob("sparsity", "2:4 structured weight sparsity", lambda c: tuple(SPARSITY_KNOB)),
    Knob("prune", "structured pruning before export (compress/prune.py)", _prune),
    Knob("fusions", "the target's fusion passes on or off", lambda c: (True, False)),
    # GPU engines: concat only by default (each static graph is one more eval and build);
    # [search] kv = ["concat", "static"] widens it.
    Knob("kv", "KV-cache layout (kiln/layouts.py)", _kv),
    Knob("slots", "sequences held at once", lambda c: (c.workload.concurrency,)),
    Knob("threads", "ONNX Runtime intra-op threads (cpu)", _threads),
)
KNOB_NAMES = tuple(k.name for k in KNOBS)


@dataclass(frozen=True)
class Candidate:
    """One point of the space: a value per knob, in KNOBS order."""

    values: tuple[tuple[str, Any], ...]

    def __getitem__(self, name: str) -> Any:
        return dict(self.values)[name]

    def as_dict(self) -> dict[str, Any]:
        """Knob name -> value."""
        return dict(self.values)

    @property
    def key(self) -> str:
        """Content key of the candidate (stable across runs and orderings)."""
        return sha256_json(self.as_dict())[:16]

    @property
    def artifact_knobs(self) -> dict[str, Any]:
        """The knobs that change the graph (the rest are runtime settings)."""
        d = self.as_dict()
        keys = ("precision", "method", "sparsity", "prune", "fusions", "kv")
        return {k: d[k] for k in keys}

    def label(self) -> str:
        """Short text: int4 rtn dense fused concat s1 t2."""
        d = self.as_dict()
        fused = "fused" if d["fusions"] else "unfused"
        tail = f" t{d['threads']}" if d["threads"] else ""
        pruned = f" {prune_label(d['prune'])}" if prune_label(d["prune"]) else ""
        return (
            f"{d['precision']} {d['method']} {d['sparsity']}{pruned} {fused} {d['kv']} "
            f"s{d['slots']}{tail}"
        )


def candidates(ctx: Context, search: dict[str, tuple[Any, ...]]) -> list[Candidate]:
    """Every candidate of the space, the recipe's [search] values replacing the defaults."""
    unknown = sorted(set(search) - set(KNOB_NAMES))
    if unknown:
        raise ConfigError(
            f"[search] {', '.join(unknown)}: unknown knob(s); kiln tune knows "
            f"{', '.join(KNOB_NAMES)}."
        )
    axes = [search.get(k.name) or k.values(ctx) for k in KNOBS]
    return [
        Candidate(tuple(zip(KNOB_NAMES, combo, strict=True))) for combo in itertools.product(*axes)
    ]


def knob_methods(c: Candidate) -> list[tuple[str, str, Method | None]]:
    """(knob, METHODS key, its record or None when optimize/methods.py lacks it) per added pass."""
    from kiln.optimize.methods import METHODS

    picked = [
        (knob, table[c[knob]])
        for knob, table in (("method", METHOD_KNOB), ("sparsity", SPARSITY_KNOB))
    ]
    return [(knob, key, METHODS.get(key)) for knob, key in picked if key is not None]


def needs_calibration(c: Candidate) -> bool:
    """Whether any of the candidate's compression passes calibrates on text."""
    return any(m is not None and m.calibrated for _, _, m in knob_methods(c))


def pruned_shape(shape: ModelShape, value: Any) -> ModelShape:
    """The shape compress/prune.py `prune` leaves (it cuts round(fraction x count) of each)."""
    from dataclasses import replace

    spec = prune_spec(value)
    return replace(
        shape,
        layers=shape.layers - round(spec.layers * shape.layers),
        kv_heads=shape.kv_heads - round(spec.kv_groups * shape.kv_heads),
        intermediate=shape.intermediate - round(spec.mlp * shape.intermediate),
    )


def prunes(c: Candidate) -> bool:
    """Whether the candidate prunes the model before export (it measures cuts on text)."""
    return bool(prune_label(c["prune"]))

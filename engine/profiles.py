"""GPU profiles: what to build for one kind of GPU, loaded from `models/gpus/*.toml`.

A profile names the backend (`tensorrt-rtx` builds ahead of time on any machine, `tensorrt`
builds on the GPU it targets), the compute capabilities, the precision the ONNX must already
have, one or two optimization profiles (prefill, decode) and builder settings. Everything is
checked when the file loads, so a profile that cannot build fails before any work starts, with
the file and key in the message.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError
from kiln.precisions import PRECISIONS

GPUS_DIR = Path(__file__).resolve().parent.parent / "models" / "gpus"

# Which compute capabilities each backend can target. TensorRT-RTX 1.7 compiles ahead of time for
# its ComputeCapability enum (SM75..SM121, no SM90/SM100: data-center GPUs need full TensorRT);
# full TensorRT builds for the GPU it runs on, so any data-center or RTX capability is possible.
BACKENDS: dict[str, tuple[str, ...]] = {
    "tensorrt-rtx": ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1"),
    "tensorrt": ("7.5", "8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "10.3", "12.0", "12.1"),
}
MODULES = {"tensorrt-rtx": "tensorrt_rtx", "tensorrt": "tensorrt"}

_TOP_KEYS = {"name", "description", "backend", "compute_capabilities", "precision", "profile"}
# The GPU's memory bandwidth and where the figure comes from: `kiln tune`'s decode cost model
# reads it; it does not change the engine, so it stays out of to_dict() (the cache key).
_HARDWARE_KEYS = {"memory_bandwidth_gbs", "memory_bandwidth_source"}
_BUILDER_KEYS = {
    "optimization_level",
    "workspace_mib",
    "tactic_shared_memory_mib",
    "sparse_weights",
}
_SHAPE_KEYS = {
    "max_batch",
    "opt_batch",
    "max_sequence",
    "opt_sequence",
    "max_context",
    "opt_context",
}
PROFILE_NAMES = ("prefill", "decode")


@dataclass(frozen=True)
class ShapeRange:
    """One TensorRT optimization profile, in model terms.

    batch: rows; sequence: new tokens per call (the prompt at prefill, 1 at decode);
    context: past + new tokens the attention mask spans (so past <= max_context - 1).
    """

    name: str
    max_batch: int
    max_sequence: int
    max_context: int
    opt_batch: int = 1
    opt_sequence: int = 1
    opt_context: int = 1

    def axes(self) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of every dynamic ONNX axis kiln's export names."""
        opt_past = self.opt_context - self.opt_sequence
        return {
            "batch": (1, self.opt_batch, self.max_batch),
            "sequence": (1, self.opt_sequence, self.max_sequence),
            "past_sequence": (0, opt_past, self.max_context - 1),
            "total_sequence": (1, self.opt_context, self.max_context),
        }


@dataclass(frozen=True)
class BuilderSettings:
    """Builder knobs: optimization level 0-5, and memory pool limits (None: library default)."""

    optimization_level: int = 3
    workspace_mib: int | None = None
    tactic_shared_memory_mib: int | None = None
    # BuilderFlag.SPARSE_WEIGHTS: let TensorRT pick 2:4 sparse kernels for weights that are
    # 2:4 along K (optimize/sparsity.py makes them); Ampere+ only, speed-up not measured here.
    sparse_weights: bool = False


@dataclass(frozen=True)
class GpuProfile:
    """Everything that decides an engine except the ONNX: the cache key hashes `to_dict()`."""

    name: str
    backend: str
    compute_capabilities: tuple[str, ...]
    precision: str
    shapes: tuple[ShapeRange, ...]
    builder: BuilderSettings = field(default_factory=BuilderSettings)
    description: str = ""
    source: str = ""  # the file it came from; not part of the cache key
    memory_bandwidth_gbs: float | None = None  # not part of the cache key
    memory_bandwidth_source: str = ""

    @property
    def module(self) -> str:
        """The Python module of the backend."""
        return MODULES[self.backend]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for manifests and cache keys (without `source`)."""
        d = asdict(self)
        for key in ("source", *_HARDWARE_KEYS):
            d.pop(key)
        return d


def profile_path(name_or_path: str | Path) -> Path:
    """A TOML path as given, or `models/gpus/<name>.toml` for a bare name."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        return p
    return GPUS_DIR / f"{name_or_path}.toml"


def available_profiles() -> list[str]:
    """Names of the profiles shipped in models/gpus/."""
    return sorted(p.stem for p in GPUS_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path) -> GpuProfile:
    """Load and validate one GPU profile; raise ConfigError naming the file and key."""
    path = profile_path(name_or_path)
    if not path.is_file():
        raise ConfigError(
            f"GPU profile {str(name_or_path)!r} not found ({path}); shipped profiles: "
            f"{', '.join(available_profiles())}, or pass a path to a .toml file."
        )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}).") from e
    return _profile_from_dict(data, path)


def _profile_from_dict(data: dict[str, Any], path: Path) -> GpuProfile:
    where = _Where(path)
    where.unknown(data, _TOP_KEYS | _HARDWARE_KEYS | {"builder"}, "")
    backend = where.choice(data, "backend", "", tuple(BACKENDS))
    # The label the ONNX must already have (kiln/precisions.py; engine/precision.py reads it).
    precision = where.choice(data, "precision", "", tuple(PRECISIONS))
    ccs = tuple(where.str_list(data, "compute_capabilities", ""))
    _check_targets(where, backend, ccs, precision)
    tables = data.get("profile", {})
    if not isinstance(tables, dict) or not tables:
        raise where.error("", "profile", tables, "needs [profile.prefill] and/or [profile.decode]")
    shapes = tuple(_shape_range(where, n, tables[n]) for n in PROFILE_NAMES if n in tables)
    where.unknown(tables, set(PROFILE_NAMES), "profile")
    raw_builder = data.get("builder", {})
    where.unknown(raw_builder, _BUILDER_KEYS, "builder")
    builder = BuilderSettings(
        optimization_level=where.int(raw_builder, "optimization_level", "builder", 0, 5, 3),
        workspace_mib=where.int(raw_builder, "workspace_mib", "builder", 1, None, None),
        tactic_shared_memory_mib=where.int(
            raw_builder, "tactic_shared_memory_mib", "builder", 1, None, None
        ),
        sparse_weights=_bool(where, raw_builder, "sparse_weights", "builder"),
    )
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name:
        raise where.error("", "name", name, "must be a non-empty string")
    return GpuProfile(
        name=name,
        backend=backend,
        compute_capabilities=ccs,
        precision=precision,
        shapes=shapes,
        builder=builder,
        description=str(data.get("description", "")),
        source=str(path),
        memory_bandwidth_gbs=_bandwidth(where, data),
        memory_bandwidth_source=str(data.get("memory_bandwidth_source", "")),
    )


def _bandwidth(where: _Where, data: dict[str, Any]) -> float | None:
    value = data.get("memory_bandwidth_gbs")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise where.error("", "memory_bandwidth_gbs", value, "must be a positive number (GB/s)")
    if not data.get("memory_bandwidth_source"):
        raise where.error(
            "", "memory_bandwidth_source", None, "missing; say where the figure is from"
        )
    return float(value)


def _bool(where: _Where, raw: dict[str, Any], key: str, table: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise where.error(table, key, value, "must be true or false")
    return value


def _check_targets(where: _Where, backend: str, ccs: tuple[str, ...], precision: str) -> None:
    """Reject targets the backend or the precision cannot build, naming what can."""
    if not ccs:
        raise where.error("", "compute_capabilities", [], "must name at least one, e.g. ['8.9']")
    can = BACKENDS[backend]
    for cc in ccs:
        if cc not in can:
            other = [b for b, caps in BACKENDS.items() if cc in caps and b != backend]
            hint = f"; use backend = {other[0]!r} for {cc}" if other else ""
            raise where.error(
                "",
                "compute_capabilities",
                list(ccs),
                f"backend {backend!r} cannot build for {cc}; it builds for {', '.join(can)}{hint}",
            )
    need = PRECISIONS[precision].min_compute_capability
    low = [cc for cc in ccs if float(cc) < need]
    if low:
        ok = [cc for cc in can if float(cc) >= need]
        raise where.error(
            "",
            "precision",
            precision,
            f"{precision} needs compute capability >= {need} but the profile targets "
            f"{', '.join(low)}; {backend} can build {precision} for {', '.join(ok)} "
            "(build one engine per precision family)",
        )
    if backend == "tensorrt" and len(ccs) != 1:
        raise where.error(
            "",
            "compute_capabilities",
            list(ccs),
            "full TensorRT builds for the one GPU it runs on: give exactly one capability "
            "(one profile per data-center GPU), or use backend = 'tensorrt-rtx' for several",
        )


def _shape_range(where: _Where, name: str, raw: Any) -> ShapeRange:
    table = f"profile.{name}"
    if not isinstance(raw, dict):
        raise where.error("", table, raw, "must be a table")
    where.unknown(raw, _SHAPE_KEYS, table)
    vals: dict[str, int] = {}
    for axis in ("batch", "sequence", "context"):
        mx = where.int(raw, f"max_{axis}", table, 1, None, ...)
        vals[f"max_{axis}"] = mx
        vals[f"opt_{axis}"] = where.int(raw, f"opt_{axis}", table, 1, mx, 1)
    if vals["max_sequence"] > vals["max_context"]:
        raise where.error(
            table,
            "max_sequence",
            vals["max_sequence"],
            f"must be <= max_context = {vals['max_context']} (new tokens count in the context)",
        )
    if vals["opt_sequence"] > vals["opt_context"]:
        raise where.error(
            table,
            "opt_context",
            vals["opt_context"],
            f"must be >= opt_sequence = {vals['opt_sequence']}",
        )
    return ShapeRange(name=name, **vals)


class _Where:
    """Validation helpers whose errors read `file [table] key = value: problem`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, table: str, key: str, value: Any, problem: str) -> ConfigError:
        at = f" [{table}]" if table else ""
        return ConfigError(f"{self.path}{at} {key} = {value!r}: {problem}.")

    def unknown(self, raw: Any, allowed: set[str], table: str) -> None:
        if not isinstance(raw, dict):
            raise self.error("", table, raw, "must be a table")
        for key in raw:
            if key not in allowed:
                raise self.error(
                    table, key, raw[key], f"unknown key; allowed: {', '.join(sorted(allowed))}"
                )

    def choice(self, raw: dict[str, Any], key: str, table: str, allowed: tuple[str, ...]) -> str:
        if key not in raw:
            raise self.error(table, key, None, f"missing; one of {', '.join(allowed)}")
        value = raw[key]
        if not isinstance(value, str) or value not in allowed:
            raise self.error(table, key, value, f"must be one of {', '.join(allowed)}")
        return value

    def str_list(self, raw: dict[str, Any], key: str, table: str) -> list[str]:
        v = raw.get(key)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.error(table, key, v, "must be a list of strings like ['8.6', '8.9']")
        return v

    def int(
        self, raw: dict[str, Any], key: str, table: str, lo: int, hi: int | None, default: Any
    ) -> Any:
        if key not in raw:
            if default is ...:
                raise self.error(table, key, None, "missing; an integer is required")
            return default
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(table, key, v, "must be an integer")
        if v < lo:
            raise self.error(table, key, v, f"must be >= {lo}")
        if hi is not None and v > hi:
            bound = f"max_{key[4:]} = {hi}" if key.startswith("opt_") else str(hi)
            raise self.error(table, key, v, f"must be <= {bound}")
        return v

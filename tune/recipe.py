"""Recipe TOML: what `kiln tune` is asked for (budget, workload, search space) and what it chose.

One file shape serves both ways. `kiln tune --recipe FILE` reads [budget], [workload] and
[search] (knob name -> the values to try); the chosen recipe that `kiln tune` writes adds
[export], [optimize], [build] and [runtime], which `kiln optimize --recipe` and
`kiln build --recipe` take as they are. This module imports nothing heavy: the CLI reads it.
"""

from __future__ import annotations

import math
import os
import tempfile
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError


@dataclass(frozen=True)
class Budget:
    """Quality budget against the fp32 export on the eval protocol (evaluate/README.md)."""

    max_kl_mean: float = 5e-3  # mean KL(fp32 || candidate), nats
    min_top1: float = 0.90  # top-1 agreement at every scored position
    min_greedy: float = 0.95  # greedy agreement, candidate teacher-forced on fp32's tokens
    max_ppl_increase: float = 0.01  # (ppl - fp32 ppl) / fp32 ppl

    def deficits(self, metrics: dict[str, float], *, slack: float = 1.0) -> dict[str, float]:
        """By how much each limit is missed (positive: over budget); empty when within it.

        A figure that is not finite (a graph gone NaN) misses its limit by infinity.

        `slack` >= 1 widens every limit (the proxy's noise): KL x slack, the others' margins
        x slack.
        """
        out: dict[str, float] = {}
        kl = metrics["kl_mean"] - self.max_kl_mean * slack
        top1 = (1 - self.min_top1) * slack - (1 - metrics["top1_agreement"])
        greedy = (1 - self.min_greedy) * slack - (1 - metrics["greedy_agreement"])
        ppl = metrics["ppl_increase"] - self.max_ppl_increase * slack
        for name, over in (("kl_mean", kl), ("top1", -top1), ("greedy", -greedy), ("ppl", ppl)):
            if not math.isfinite(over):
                out[name] = math.inf
            elif over > 0:
                out[name] = over
        return out


@dataclass(frozen=True)
class Workload:
    """What the deployment serves: prompt and output lengths, sequences at once."""

    prompt_tokens: int = 64
    output_tokens: int = 32
    concurrency: int = 1

    @property
    def context(self) -> int:
        """Positions one sequence needs."""
        return self.prompt_tokens + self.output_tokens


@dataclass(frozen=True)
class ExportSection:
    """How the fp32 export the recipe starts from was made (`kiln export --kv --max-context`)."""

    kv: str = "concat"
    max_context: int | None = None
    prune: str = ""  # `kiln prune` fractions applied first ("mlp=0.1,..."); "" = the model as is


@dataclass(frozen=True)
class OptimizeSection:
    """`kiln optimize` options: target, precision, passes left out, quantization method."""

    target: str = "onnxruntime"
    precision: str = "fp32"
    skip: tuple[str, ...] = ()
    passes: tuple[str, ...] = ()  # extra passes after the default list (calibrated methods)
    calibration: str = ""  # text a calibrated pass calibrates on (CALIB_SEQUENCES x CALIB_LENGTH)
    weight_budget_mib: float | None = (
        None  # the mixed pass's budget (tune/make.py mixed_budget_mib)
    )


# Calibration windows of calibrated passes: kiln compress's defaults (kiln/commands/compress.py).
CALIB_SEQUENCES, CALIB_LENGTH = 16, 256


@dataclass(frozen=True)
class BuildSection:
    """`kiln build` options: the GPU profile and the precision its engine is built at."""

    profile: str = ""
    precision: str = ""


@dataclass(frozen=True)
class RuntimeSection:
    """Runtime settings the recipe was timed with (`kiln.runtime.load` / `kiln serve`)."""

    threads: int = 0
    slots: int = 1


@dataclass(frozen=True)
class Recipe:
    """A whole recipe; the sections a file lacks keep their defaults."""

    target: str = "cpu"
    measured: bool = False  # speed measured on the target (cpu: always; GPU: `kiln tune --measure`)
    budget: Budget = field(default_factory=Budget)
    workload: Workload = field(default_factory=Workload)
    search: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    export: ExportSection = field(default_factory=ExportSection)
    optimize: OptimizeSection | None = None
    build: BuildSection | None = None
    runtime: RuntimeSection | None = None


_SECTIONS: dict[str, type] = {
    "budget": Budget,
    "workload": Workload,
    "export": ExportSection,
    "optimize": OptimizeSection,
    "build": BuildSection,
    "runtime": RuntimeSection,
}


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe TOML; errors name the file, table and key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"recipe {path} not found; pass a TOML written by `kiln tune` or by hand."
        )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}).") from e
    allowed = {"target", "measured", "search", *_SECTIONS}
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{path} {key}: unknown key; allowed: {', '.join(sorted(allowed))}.")
    parts: dict[str, Any] = {k: _section(path, k, data[k]) for k in _SECTIONS if k in data}
    search = data.get("search", {})
    if not isinstance(search, dict) or not all(isinstance(v, list) for v in search.values()):
        raise ConfigError(f"{path} [search]: each key must name a knob and hold a list of values.")
    return Recipe(
        target=str(data.get("target", "cpu")),
        measured=bool(data.get("measured", False)),
        search={k: tuple(v) for k, v in search.items()},
        **parts,
    )


def _section(path: Path, name: str, raw: Any) -> Any:
    cls = _SECTIONS[name]
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} [{name}] must be a table.")
    kinds = {f.name: f.type for f in fields(cls)}
    for key, value in raw.items():
        if key not in kinds:
            raise ConfigError(
                f"{path} [{name}] {key} = {value!r}: unknown key; allowed: {', '.join(kinds)}."
            )
        _check_type(path, name, key, value, str(kinds[key]))
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return cls(**values)


def _check_type(path: Path, table: str, key: str, value: Any, kind: str) -> None:
    want: tuple[type, ...] = (
        (int, float)
        if kind.startswith("float")
        else (int,)
        if kind.startswith("int")
        else (list,)
        if kind.startswith("tuple")
        else (str,)
    )
    if "None" in kind and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, want):
        raise ConfigError(f"{path} [{table}] {key} = {value!r}: must be {kind}.")
    if isinstance(value, int | float) and (not math.isfinite(value) or value < 0):
        raise ConfigError(f"{path} [{table}] {key} = {value!r}: must be finite and >= 0.")


def override(recipe: Recipe, section: str, settings: list[str]) -> Recipe:
    """Apply `key=value` settings from the command line to one section (budget, workload)."""
    current = getattr(recipe, section)
    kinds = {f.name: str(f.type) for f in fields(current)}
    changes: dict[str, Any] = {}
    for item in settings:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in kinds:
            raise ConfigError(
                f"--{section} {item!r}: expected KEY=VALUE with KEY one of {', '.join(kinds)}."
            )
        try:
            changes[key] = float(text) if kinds[key] == "float" else int(text)
        except ValueError as e:
            raise ConfigError(f"--{section} {item!r}: {text!r} is not a {kinds[key]}.") from e
    return replace(recipe, **{section: replace(current, **changes)})


def save_recipe(recipe: Recipe, path: Path, *, header: str = "") -> Path:
    """Write `recipe` as TOML (atomically); sections left None are left out."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"target = {_toml(recipe.target)}", f"measured = {_toml(recipe.measured)}"]
    for name in _SECTIONS:
        section = getattr(recipe, name)
        if section is None:
            continue
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {_toml(v)}" for k, v in asdict(section).items() if v is not None]
    if recipe.search:
        lines += ["", "[search]"] + [f"{k} = {_toml(list(v))}" for k, v in recipe.search.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def apply_optimize_recipe(args: Any) -> None:
    """Fill `kiln optimize` arguments the command line left unset from the recipe's [optimize].

    The recipe's [export] names the KV layout its graph was chosen with; an export artifact of
    another layout is refused (kiln/manifests.py ExportManifest).
    """
    from kiln.manifests import ExportManifest

    recipe = load_recipe(args.recipe)
    section = recipe.optimize
    if section is None:
        raise ConfigError(f"{args.recipe} has no [optimize] table; `kiln tune` writes one.")
    export = ExportManifest.read(args.artifact)
    have = export.layout.name
    if have != recipe.export.kv or export.max_context != recipe.export.max_context:
        ctx = f" --max-context {recipe.export.max_context}" if recipe.export.max_context else ""
        raise ConfigError(
            f"{args.recipe} was chosen for a {recipe.export.kv} KV export, but {args.artifact} is "
            f"{have} (max_context {export.max_context}); re-export with "
            f"`kiln export MODEL --kv {recipe.export.kv}{ctx}`."
        )
    args.target = args.target or section.target
    args.precision = args.precision or section.precision
    args.passes = args.passes or (list(section.passes) or None)
    args.skip = args.skip or list(section.skip)
    args.pass_config = None
    if section.calibration:  # as kiln tune made it: calibrated, drift judged by the eval
        from kiln.optimize.calibrate import calibration_from_text

        windows = calibration_from_text(
            Path(section.calibration), args.artifact, sequences=CALIB_SEQUENCES, length=CALIB_LENGTH
        )
        args.pass_config, args.allow_drift = windows.as_config(), True
        if section.weight_budget_mib is not None:
            args.pass_config["weight_budget_mib"] = section.weight_budget_mib


def build_profile(path: Path) -> Any:
    """The GPU profile of a recipe's [build], at the recipe's precision."""
    from kiln.engine.profiles import load_profile

    recipe = load_recipe(path)
    if recipe.build is None or not recipe.build.profile:
        raise ConfigError(
            f"{path} has no [build] profile; `kiln tune --target PROFILE` writes one."
        )
    profile = load_profile(recipe.build.profile)
    return replace(profile, precision=recipe.build.precision or profile.precision)

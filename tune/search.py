"""The search: prune by rule, proxy-screen, evaluate survivors in full, score speed, choose.

Rungs (successive screening): every candidate graph the rules let through is optimized and
scored on the proxy (KL, top-1, greedy on a short text); those within the budget widened by
PROXY_SLACK go on to the full protocol; those within the budget there are timed (cpu) or
costed and built (GPU profiles). The proxy-to-full rank agreement of mean KL is reported, so
a proxy that stops predicting shows. Every step is a cached trial (tune/trials.py).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kiln.artifacts import sha256_file, sha256_json
from kiln.errors import KilnError
from kiln.evaluate import EvalOptions
from kiln.tune import make
from kiln.tune.recipe import (
    CALIB_LENGTH,
    CALIB_SEQUENCES,
    ExportSection,
    OptimizeSection,
    Recipe,
)
from kiln.tune.rules import first_violation
from kiln.tune.space import (
    Candidate,
    Context,
    ModelShape,
    Target,
    candidates,
    knob_methods,
    needs_calibration,
    prune_label,
    pruned_shape,
)
from kiln.tune.speed import Runner, decode_cost, time_runners, weight_bytes
from kiln.tune.trials import TrialStore

log = logging.getLogger(__name__)

PROXY_SLACK = 2.0  # the proxy's short text is noisy: only clear misses stop at the proxy
BASELINE = "fp32-export"


@dataclass
class Trial:
    """One candidate's record in tune.json."""

    candidate: Candidate
    status: str = "pending"  # pruned | rejected | accepted | chosen
    rule: str = ""  # rule id or rung that rejected it
    reason: str = ""
    artifact: str = ""
    proxy: dict[str, Any] | None = None
    full: dict[str, Any] | None = None
    speed: dict[str, Any] | None = None
    build: dict[str, Any] | None = None
    optimize: OptimizeSection | None = None  # how its graph was made (the chosen recipe's)
    elapsed_s: float = 0.0
    deficit: dict[str, float] = field(default_factory=dict)

    def reject(self, rule: str, reason: str) -> None:
        """Mark rejected by `rule` (a rule id, 'proxy-budget', 'budget', ...)."""
        self.status, self.rule, self.reason = "rejected", rule, reason


@dataclass
class Search:
    """The state of one tune: inputs, store, trials."""

    model: Path
    ctx: Context
    recipe: Recipe
    out: Path
    text: Path | None = None
    proxy: EvalOptions = make.PROXY
    full: EvalOptions = make.FULL
    repeats: int = 5
    measure: bool = False
    store: TrialStore = field(init=False)
    _calibration: dict[str, Any] | None = field(default=None, init=False)
    trials: list[Trial] = field(default_factory=list)
    exports: dict[str, Path] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.store = TrialStore(self.out.parent / "trials", self.model)

    def calibration_key(self) -> dict[str, Any]:
        """What the calibration depends on (the text's bytes, the windows), for trial keys."""
        path = self.ctx.calibration
        assert path is not None  # rule needs-calibration dropped calibrated candidates
        return {"sha256": sha256_file(path), "sequences": CALIB_SEQUENCES, "length": CALIB_LENGTH}

    def calibration_config(self) -> dict[str, Any]:
        """optimize_model's pass_config: the calibration windows, tokenized once per tune."""
        from kiln.optimize.calibrate import calibration_from_text

        if self._calibration is None:
            assert self.ctx.calibration is not None
            windows = calibration_from_text(
                self.ctx.calibration, self.model, sequences=CALIB_SEQUENCES, length=CALIB_LENGTH
            )
            self._calibration = windows.as_config()
        return self._calibration


def context_for(
    model: Path, target: Target, recipe: Recipe, calibration: Path | None = None
) -> Context:
    """The search context of `model` on `target` under the recipe's workload."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    return Context(target, recipe.workload, ModelShape.from_config(cfg), calibration)


def run_search(s: Search) -> list[Trial]:
    """Every rung, in order; returns the trials (also in `s.trials`)."""
    s.trials = [Trial(c) for c in candidates(s.ctx, s.recipe.search)]
    for t in s.trials:
        if (hit := first_violation(t.candidate, s.ctx)) is not None:
            t.status, t.rule, t.reason = "pruned", *hit
    live = [t for t in s.trials if t.status == "pending"]
    groups = _groups(live)
    log.info(
        "tune %s on %s: %d candidates, %d pruned by rule, %d to measure in %d graphs "
        "(each: optimize, proxy eval, maybe full eval; cached ones are reused)",
        s.model, s.ctx.target.name, len(s.trials), len(s.trials) - len(live), len(live),
        len(groups),
    )  # fmt: skip
    s.exports[sha256_json(asdict(ExportSection()))] = _export(s, ExportSection())
    for i, (key, members) in enumerate(groups.items()):
        _progress(i, len(groups), members[0].candidate.label())
        _screen(s, key, members)
    _progress(len(groups), len(groups), "done")
    accepted = [t for t in live if t.status == "pending"]
    for t in accepted:
        t.status = "accepted"
    _score_speed(s, [t for t in live if t.full is not None])
    return s.trials


def _groups(live: list[Trial]) -> dict[str, list[Trial]]:
    groups: dict[str, list[Trial]] = {}
    for t in live:
        groups.setdefault(sha256_json(t.candidate.artifact_knobs)[:16], []).append(t)
    return groups


def _export(s: Search, section: ExportSection) -> Path:
    key = sha256_json(asdict(section))
    if key in s.exports:
        return s.exports[key]
    name = "export-concat" if section.kv == "concat" else f"export-static-{section.max_context}"
    model, spec = s.model, asdict(section)
    if section.prune:  # the pruned model's export: keyed by the cut and the text it measured on
        spec["calibration"] = s.calibration_key()
        model = _pruned(s, section.prune)
        name += "-prune-" + section.prune.replace(",", "-").replace("=", "")
    out = s.out.parent / "artifacts" / name
    result = s.store.run(
        "export", spec, lambda: {"path": str(make.make_export(model, section, out))}
    )
    s.exports[key] = Path(result["path"])
    return s.exports[key]


def _pruned(s: Search, prune: str) -> Path:
    """The Hugging Face folder `kiln prune` makes of the model (a cached trial)."""
    assert s.ctx.calibration is not None  # rule needs-calibration dropped it otherwise
    calibration = s.ctx.calibration
    out = s.out.parent / "artifacts" / ("hf-prune-" + prune.replace(",", "-").replace("=", ""))
    spec = {"prune": prune, "calibration": s.calibration_key()}
    result = s.store.run("prune", spec, lambda: make.make_pruned(s.model, prune, calibration, out))
    return Path(result["path"])


def _screen(s: Search, key: str, members: list[Trial]) -> None:
    """Optimize one graph, proxy it, evaluate it in full if the proxy passes."""
    c = members[0].candidate
    export = make.export_section(c, s.ctx, s.full)
    section = make.optimize_section(c, s.ctx)
    knobs = {**c.artifact_knobs, "prune": prune_label(c["prune"])}
    name = "-".join(str(v) for v in knobs.values() if v != "").replace(":", "")
    out = (
        s.out.parent
        / "artifacts"
        / f"{section.target}-{name.replace('True', 'fused').replace('False', 'unfused')}"
    )
    calibrated = needs_calibration(c)
    try:
        src = _export(s, export)
        if c["method"] == "mixed":  # its budget is read off the export it starts from
            section = replace(section, weight_budget_mib=make.mixed_budget_mib(src, section.target))
        spec: dict[str, Any] = {"export": asdict(export), "optimize": asdict(section)}
        if calibrated or export.prune:
            spec["calibration"] = s.calibration_key()
        art = s.store.run(
            "optimize", spec,
            lambda: make.make_artifact(
                src, section, out, s.calibration_config() if calibrated else None,
                compressed=bool(knob_methods(c)) or bool(export.prune),
            ),
        )  # fmt: skip
    except KilnError as e:
        for t in members:
            t.reject("optimize", str(e).splitlines()[0])
        return
    for t in members:
        t.optimize = section
    reference = s.exports[sha256_json(asdict(ExportSection()))]
    evals = s.out.parent / "evals" / key
    proxy = s.store.run(
        "proxy", {**spec, "eval": asdict(s.proxy), "text": str(s.text)},
        lambda: make.evaluate(Path(art["path"]), reference, s.text, s.proxy, evals / "proxy"),
    )  # fmt: skip
    for t in members:
        t.artifact, t.proxy = art["path"], proxy
        t.elapsed_s += art["elapsed_s"] + proxy["elapsed_s"]
    over = s.recipe.budget.deficits(proxy, slack=PROXY_SLACK)
    if over:
        for t in members:
            t.deficit = s.recipe.budget.deficits(proxy)
            t.reject("proxy-budget", f"proxy over {PROXY_SLACK:g}x the budget: {_fmt(over)}")
        return
    full = s.store.run(
        "full", {**spec, "eval": asdict(s.full), "text": str(s.text)},
        lambda: make.evaluate(Path(art["path"]), reference, s.text, s.full, evals / "full"),
    )  # fmt: skip
    over = s.recipe.budget.deficits(full)
    for t in members:
        t.full, t.deficit = full, over
        t.elapsed_s += full["elapsed_s"]
        if over:
            t.reject("budget", f"over budget on the full protocol: {_fmt(over)}")


def _fmt(over: dict[str, float]) -> str:
    return ", ".join(f"{k} by {v:.3g}" for k, v in over.items())


def _score_speed(s: Search, evaluated: list[Trial]) -> None:
    if s.ctx.target.is_cpu:
        _time_cpu(s, [t for t in evaluated if t.status == "accepted"])
    else:
        _cost_gpu(s, evaluated)


def _time_cpu(s: Search, accepted: list[Trial]) -> None:
    """Time every accepted candidate and the fp32 export, interleaved, in one cached round."""
    w = s.ctx.workload
    base = Runner(
        BASELINE, s.exports[sha256_json(asdict(ExportSection()))], s.ctx.target.cores, w.concurrency
    )
    runners = [base] + [
        Runner(t.candidate.key, Path(t.artifact), t.candidate["threads"], t.candidate["slots"])
        for t in accepted
    ]
    spec = {
        "runners": [[r.key, _content(r.artifact), r.threads, r.slots] for r in runners],
        "workload": asdict(w),
        "repeats": s.repeats,
    }
    result = s.store.run("timing", spec, lambda: time_runners(runners, w, s.repeats))
    s.baseline = {"label": "fp32 export, concat, default passes", **result[BASELINE]}
    for t in accepted:
        t.speed = {**result[t.candidate.key], "measured": True}
        t.elapsed_s += result["elapsed_s"] / len(runners)


def _cost_gpu(s: Search, evaluated: list[Trial]) -> None:
    """Cost-model speed for every evaluated candidate; engines for the accepted ones."""
    profile = s.ctx.target.profile
    assert profile is not None
    if profile.memory_bandwidth_gbs is None:
        raise KilnError(
            f"GPU profile {profile.name} ({profile.source}) has no memory_bandwidth_gbs; add it "
            "with memory_bandwidth_source (the datasheet) for the cost model."
        )
    for t in evaluated:
        c = t.candidate
        shape = pruned_shape(s.ctx.shape, c["prune"])
        act = 4 if c["precision"] == "fp32" else 2
        kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * act
        wb = weight_bytes(Path(t.artifact) / "model.onnx")
        t.speed = decode_cost(
            wb["read_per_step"], kv, s.ctx.workload, c["slots"], profile.memory_bandwidth_gbs
        )
        if t.status == "accepted":
            _engine(s, t)
    shape = s.ctx.shape
    ref = s.exports[sha256_json(asdict(ExportSection()))]
    wb = weight_bytes(ref / "model.onnx")
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * 4
    s.baseline = {
        "label": "fp32 export (cost model)",
        **decode_cost(
            wb["read_per_step"],
            kv,
            s.ctx.workload,
            s.ctx.workload.concurrency,
            profile.memory_bandwidth_gbs,
        ),
    }
    if s.measure:
        from kiln.tune.measure import measure_engines

        measure_engines(s, [t for t in evaluated if t.build and t.build.get("status") == "built"])


def _engine(s: Search, t: Trial) -> None:
    """Build the candidate's engine for the profile at its precision (a cached trial)."""
    profile, precision, art = s.ctx.target.profile, t.candidate["precision"], Path(t.artifact)
    assert profile is not None
    spec = {
        "artifact": t.artifact,
        "content": _content(art),
        "profile": profile.to_dict(),
        "precision": precision,
    }
    out = s.out.parent / "engines" / f"{profile.name}-{art.name}"
    try:
        t.build = s.store.run("engine", spec, lambda: make.build(art, s.ctx, precision, out))
    except KilnError as e:
        t.reject("engine", " ".join(str(e).split())[:400])  # the library's own error too
        return
    t.elapsed_s += t.build["elapsed_s"]


def _content(artifact: Path) -> str:
    """The artifact's manifest hash (it holds model.onnx's sha256).

    So a graph remade from other inputs (new calibration text) in the same folder is timed and
    built anew.
    """
    from kiln.manifests import ExportManifest, OptimizeManifest

    for manifest in (OptimizeManifest, ExportManifest):
        if (artifact / manifest.FILE).is_file():
            return sha256_file(artifact / manifest.FILE)
    return artifact.name


def _progress(i: int, n: int, label: str) -> None:
    """A bar over candidate graphs on a terminal; a log line otherwise."""
    if sys.stderr.isatty():
        width = 30
        done = width * i // max(n, 1)
        sys.stderr.write(f"\r[kiln] tune [{'#' * done}{'.' * (width - done)}] {i}/{n} {label:<40}")
        if i == n:
            sys.stderr.write("\n")
        sys.stderr.flush()
    elif i < n:
        log.info("graph %d/%d: %s", i + 1, n, label)

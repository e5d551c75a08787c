"""Compression methods over an export artifact: which pass list each one runs, and its gate.

A method is the target's default pass list with one pass swapped in (the calibrated or mixed
quantizer in place of round-to-nearest) or added (2:4 sparsity before the final cleanup). The
result is an ordinary optimize artifact (optimize.json holds every pass's counts, notes and
drift; drift past the precision's logit tolerance is recorded, not fatal: these methods are
meant to move logits), then gated by quality: mean KL of the next-token distribution against
the export on calibration windows the passes never saw.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError, QualityBudgetError

COMPRESS_FILE = "compress.json"


@dataclass(frozen=True)
class Method:
    """One compression method: precision label and the pass per target."""

    precision: str
    passes: dict[str, str]  # target -> pass name
    replaces: bool  # True: replaces the target's quantizer; False: added before the cleanup
    calibrated: bool = True
    budget: bool = False


METHODS = {
    "gptq-int4": Method(
        "int4", {"tensorrt": "int4-gptq", "onnxruntime": "matmul-nbits-int4-gptq"}, True
    ),
    "mixed": Method(
        "int4",
        {"tensorrt": "mixed-int4-int8", "onnxruntime": "matmul-nbits-mixed"},
        True,
        budget=True,
    ),
    "sparse24": Method(
        "fp16", {"tensorrt": "sparse-2of4", "onnxruntime": "sparse-2of4"}, False, calibrated=False
    ),
    "sparse24-calibrated": Method(
        "fp16",
        {"tensorrt": "sparse-2of4-calibrated", "onnxruntime": "sparse-2of4-calibrated"},
        False,
    ),
}


def method_passes(method: str, target: str) -> tuple[str, list[str]]:
    """The precision and pass names `method` runs on `target`."""
    from kiln.optimize import default_passes
    from kiln.precisions import PRECISIONS

    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; kiln compress knows {', '.join(METHODS)}.")
    m = METHODS[method]
    precision = "fp32" if target == "onnxruntime" and m.precision == "fp16" else m.precision
    names = default_passes(precision, target=target)
    swap = m.passes[target]
    if m.replaces:
        record = PRECISIONS[precision]
        old = record.ort_quantizer if target == "onnxruntime" else record.quantizer
        return precision, [swap if n == old else n for n in names]
    return precision, [*names[:-2], swap, *names[-2:]]  # before cse + remove-unused


def compress_artifact(
    src: Path,
    out: Path,
    *,
    method: str,
    calibration: Path | None = None,
    target: str = "tensorrt",
    weight_budget_mib: float | None = None,
    max_kl: float | None = None,
    sequences: int = 16,
    length: int = 256,
    force: bool = False,
) -> dict[str, Any]:
    """Compress the export artifact `src` into `out` with `method`; return compress.json.

    Calibration windows are cut from `calibration` (text, tokenized by the artifact's
    tokenizer): even windows calibrate, odd ones gate. Over `max_kl` (nats) the output is
    removed and QualityBudgetError raised.
    """
    import onnx_ir as ir

    from kiln.optimize import optimize_model
    from kiln.optimize.calibrate import Calibration, calibration_from_text, log_probs, mean_kl

    m = METHODS.get(method)
    precision, names = method_passes(method, target)
    assert m is not None  # method_passes checked it
    if m.budget and weight_budget_mib is None:
        raise ConfigError(f"method {method!r} needs --weight-budget-mib MIB.")
    if calibration is None:
        raise ConfigError(
            f"method {method!r} needs --calibration FILE (text like the model's inputs, never "
            "the held-out evaluation text): it calibrates and gates on it."
        )
    windows = calibration_from_text(calibration, src, sequences=2 * sequences, length=length)
    calib = Calibration(windows.sequences[0::2], windows.source)
    gate = Calibration(windows.sequences[1::2], windows.source)
    config: dict[str, Any] = calib.as_config() if m.calibrated else {}
    if weight_budget_mib is not None:
        config["weight_budget_mib"] = weight_budget_mib
    optimize_model(
        src, out, target=target, precision=precision, passes=names, allow_drift=True,
        force=force, check_torch=False, pass_config=config,
    )  # fmt: skip
    kl = mean_kl(
        log_probs(ir.load(src / "model.onnx"), gate), log_probs(ir.load(out / "model.onnx"), gate)
    )
    record = {
        "method": method,
        "target": target,
        "precision": precision,
        "passes": names,
        "calibration": calib.describe(),
        "gate": {**gate.describe(), "kl": kl, "max_kl": max_kl},
        "weight_budget_mib": weight_budget_mib,
    }
    if max_kl is not None and kl > max_kl:
        shutil.rmtree(out)
        raise QualityBudgetError(
            f"{method} on {src} costs mean KL {kl:.4g} nats on the calibration gate windows, "
            f"over the budget {max_kl:g}; pick a gentler method or raise --max-kl. "
            f"{out} was removed."
        )
    tmp = out / f".{COMPRESS_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out / COMPRESS_FILE)
    return record

"""The optimized graph against its references: the source export and, if at hand, PyTorch.

Three figures go into optimize.json:
- `export`: probe logits of the optimized graph against the export graph (ORT both);
- `torch`: the export stage's parity check (prefill + decode trajectories, ragged batch)
  against the PyTorch model in the export's source folder, when that folder still exists;
- `greedy_64`: 64 tokens generated greedily by the export graph, then fed to the optimized
  graph teacher-forced: the fraction of positions whose argmax agrees.
Judged by TOL[precision] (kiln/parity.py). bf16 graphs run as their fp32 emulation (bf16.py).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from kiln.graph_io import Stepper, stepper
from kiln.manifests import ExportManifest
from kiln.parity import TOL, ParityReport

log = logging.getLogger(__name__)

GREEDY_TOKENS = 64


def _runnable_path(onnx_path: Path, precision: str, tmp: Path) -> Path:
    if precision != "bf16":
        return onnx_path
    import onnx_ir as ir

    from kiln.optimize.precision.bf16 import bf16_emulation

    path = tmp / "emulated.onnx"
    ir.save(bf16_emulation(ir.load(onnx_path)), path)
    return path


def decode_argmax(run: Stepper, prompt: list[int], n: int, forced: list[int] | None) -> list[int]:
    """Argmax after the prompt and after each of `n - 1` decode steps (one row, cache fed back).

    With `forced`, step i feeds forced[i] (teacher forcing along another graph's tokens), so
    both graphs see the same calls: a prefill, then one token at a time. Comparing against a
    single long prefill instead would be wrong for length-dependent RoPE (dynamic, longrope).
    """
    run.reset(1)
    ids, done, out = np.array([prompt], np.int64), 0, []
    for i in range(n):
        logits = run.append(ids, done)
        out.append(int(np.argmax(logits[0, -1])))
        nxt = forced[i] if forced is not None else out[-1]
        ids, done = np.array([[nxt]], np.int64), done + ids.shape[1]
    return out


def greedy_agreement_64(ref_path: Path, got_path: Path, prompt: list[int]) -> float:
    """Fraction of the reference's 64 greedy tokens the optimized graph also picks."""
    ref = decode_argmax(stepper(ref_path), prompt, GREEDY_TOKENS, forced=None)
    got = decode_argmax(stepper(got_path), prompt, GREEDY_TOKENS, forced=ref)
    return float(np.mean(np.array(got) == np.array(ref)))


def _prompt(src: Path, export: ExportManifest) -> list[int]:
    """BOS + the bundled model's prompt when the artifact carries a tokenizer, else fixed ids."""
    bos = export.config["bos_token_id"]
    if (src / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        from kiln.models.zen import ZEN_PROMPT

        ids = list(AutoTokenizer.from_pretrained(src)(ZEN_PROMPT)["input_ids"])
        return ids if bos is None or ids[:1] == [bos] else [bos, *ids]
    rng = np.random.default_rng(0)
    return [int(i) for i in rng.integers(3, export.config["vocab"], size=8)]


def _torch_parity(path: Path, export: ExportManifest, precision: str) -> dict[str, Any] | None:
    from kiln.export import check_against_source

    report = check_against_source(path, Path(export.source["path"]), precision=precision)
    if report is None:
        return None
    tol = TOL[precision]
    for d in report.diffs:  # re-judge the worst element of each output by this precision's TOL
        if d.torch_max_abs is None:  # against float64 (fp32) the check judged it already
            d.ok = d.max_abs <= d.allowed + tol.rtol * abs(d.ref_value)
    log.info("parity against PyTorch: %s", report.describe())
    return ParityReport(precision, tol, report.diffs, report.agreement).summary()


def check_against_reference(
    onnx_path: Path, src: Path, export: ExportManifest, *, precision: str, check_torch: bool
) -> dict[str, Any]:
    """Parity figures of the optimized graph; `ok` False with `why` when past TOL[precision]."""
    tol = TOL[precision]
    with tempfile.TemporaryDirectory() as tmp:
        path = _runnable_path(onnx_path, precision, Path(tmp))
        agree = greedy_agreement_64(src / "model.onnx", path, _prompt(src, export))
        torch = _torch_parity(path, export, precision) if check_torch else None
    out: dict[str, Any] = {
        "precision": precision,
        "tolerance": asdict(tol),
        "greedy_64": agree,
        "torch": torch,
        "bf16_validated_by": "fp32 emulation with bf16 rounding" if precision == "bf16" else None,
    }
    whys = []
    if agree < tol.agree:
        whys.append(f"greedy agreement over {GREEDY_TOKENS} tokens {agree:.3f} < {tol.agree}")
    if torch is not None and not torch["ok"]:
        noise = torch.get("torch_fp32_logits_max_abs")
        whys.append(
            f"PyTorch parity: logits max|Δ| {torch['logits_max_abs']:.3g} against "
            + (f"float64 (PyTorch fp32's own: {noise:.3g})" if noise is not None else "fp32")
            + f", {torch['worst_budget_ratio']:.3g}x the budget of the worst output, "
            f"agreement {torch['greedy_agreement']:.3f}"
        )
    out["ok"] = not whys
    out["why"] = "; ".join(whys) or None
    log.info(
        "parity: greedy-64 agreement %.3f%s",
        agree,
        f"; vs PyTorch logits max|Δ| {torch['logits_max_abs']:.3g}" if torch else "",
    )
    return out

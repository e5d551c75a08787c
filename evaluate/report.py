"""What `kiln eval` prints and writes: the protocol, the figures, and eval.json (atomically).

eval.json goes to `--out` (a folder), by default out/eval/<parent>/<name>/ for a model at
.../<parent>/<name>: never into the artifact (published folders stay as their stage wrote them)
nor into the repository's model folders. A rerun overwrites it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.artifacts import tool_versions, write_json_atomic

if TYPE_CHECKING:
    from kiln.evaluate import EvalOptions
    from kiln.evaluate.score import Greedy, Totals
    from kiln.evaluate.text import EvalText
    from kiln.evaluate.windows import Window

EVAL_FILE = "eval.json"
KIND, FORMAT = "kiln.eval", 1
EVAL_ROOT = Path("out/eval")


def default_out(model: Path) -> Path:
    """out/eval/<parent>/<name>/ for a model folder at .../<parent>/<name>."""
    resolved = Path(model).resolve()
    return EVAL_ROOT / resolved.parent.name / resolved.name


@dataclass(frozen=True)
class EvalReport:
    """eval.json's content: protocol (what was measured, how) and results."""

    protocol: dict[str, Any]
    candidate: dict[str, Any]
    reference: dict[str, Any] | None
    results: dict[str, Any]
    versions: dict[str, str]

    @classmethod
    def make(
        cls,
        *,
        candidate: dict[str, Any],
        reference: dict[str, Any] | None,
        text: EvalText,
        windows: list[Window],
        options: EvalOptions,
        prompt_tokens: int,
        offsets: list[int],
        totals: Totals,
        greedy: Greedy | None,
        elapsed_s: dict[str, float],
    ) -> EvalReport:
        """Assemble the record from the run's parts."""
        protocol: dict[str, Any] = {
            "text": text.describe(),
            "perplexity": {
                "method": "strided sliding window (Hugging Face perplexity guide): each window "
                "is a fresh prefill; only tokens no earlier window scored are scored",
                "window": options.window,
                "stride": options.stride,
                "windows": len(windows),
                "tokens_scored": totals.scored,
            },
        }
        results: dict[str, Any] = {
            "perplexity": totals.perplexity,
            "nll_mean": totals.nll / totals.scored,
        }
        if reference is not None and greedy is not None:
            protocol["divergence"] = {
                "kl": "mean over scored positions of KL(reference || candidate), nats",
                "top1": "fraction of scored positions where both argmaxes agree",
            }
            protocol["greedy"] = {
                "method": "reference decodes greedily (prefill, then one token per call); the "
                "candidate is teacher-forced along its tokens with the same calls",
                "prompts": len(offsets),
                "prompt_tokens": prompt_tokens,
                "prompt_offsets": offsets,
                "new_tokens": options.greedy_tokens,
            }
            results |= {
                "reference_perplexity": math.exp(totals.ref_nll / totals.scored),
                "kl_mean": totals.kl / totals.scored,
                "kl_max": totals.kl_max,
                "top1_agreement": totals.top1 / totals.scored,
                "greedy_agreement": greedy.agreement,
                "greedy_agreement_per_prompt": greedy.per_prompt,
            }
        results["elapsed_s"] = {k: round(v, 3) for k, v in elapsed_s.items()}
        return cls(
            protocol,
            candidate,
            reference,
            results,
            tool_versions("onnxruntime", "torch", "transformers"),
        )

    def as_dict(self) -> dict[str, Any]:
        """The JSON object: kind and format first."""
        return {"kind": KIND, "format": FORMAT, **asdict(self)}

    def lines(self) -> list[str]:
        """The protocol and the figures as text for the terminal."""
        p, r = self.protocol, self.results
        ppl = p["perplexity"]
        out = [
            f"text: {p['text']['path']} (sha256 {p['text']['sha256'][:12]}, "
            f"{p['text']['tokens_used']} of {p['text']['tokens_in_text']} tokens)",
            f"perplexity: window {ppl['window']}, stride {ppl['stride']}, "
            f"{ppl['windows']} windows, {ppl['tokens_scored']} tokens scored",
        ]
        if "greedy" in p:
            g = p["greedy"]
            out.append(
                f"greedy: {g['prompts']} prompts of {g['prompt_tokens']} tokens at offsets "
                f"{g['prompt_offsets']}, {g['new_tokens']} new tokens each"
            )
        out.append(f"candidate: {_name(self.candidate)}")
        if self.reference is not None:
            out.append(f"reference: {_name(self.reference)}")
        out.append(f"  perplexity        {r['perplexity']:.4f}")
        if "kl_mean" in r:
            out += [
                f"  reference ppl     {r['reference_perplexity']:.4f}",
                f"  KL(ref || cand)   {r['kl_mean']:.3e} nats (max {r['kl_max']:.3e})",
                f"  top-1 agreement   {r['top1_agreement']:.4f}",
                f"  greedy agreement  {r['greedy_agreement']:.4f} over "
                f"{p['greedy']['prompts']} x {p['greedy']['new_tokens']} tokens",
            ]
        return out


def _name(d: dict[str, Any]) -> str:
    extra = [d.get("precision"), d.get("target"), d.get("kv_layout")]
    level = d.get("ort_optimization")
    tail = f", ORT optimization {level}" if level else ""
    return f"{d['path']} ({d['kind']}, {', '.join(x for x in extra if x)}{tail})"


def write_report(report: EvalReport, out: Path) -> Path:
    """Write `out`/eval.json atomically; return its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / EVAL_FILE
    write_json_atomic(path, report.as_dict())
    return path

"""`kiln eval`: what a graph costs in language-model quality, on held-out text.

Entry point `evaluate_model`: strided perplexity of a model (kiln ONNX artifact through ONNX
Runtime, or Hugging Face folder through PyTorch) on held-out text, and against a reference
model the mean KL(reference || candidate) of the next-token distributions at every scored
position, top-1 agreement there, and greedy agreement over N generated tokens from prompts cut
from the same text. The protocol and the results go to `eval.json` (evaluate/report.py);
evaluate/README.md has the figures for the eval model at every precision.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import ConfigError
from kiln.evaluate.report import EvalReport, default_out, write_report
from kiln.evaluate.windows import sliding_windows

log = logging.getLogger(__name__)

PROMPT_TOKENS = 32


@dataclass(frozen=True)
class EvalOptions:
    """The protocol's knobs; the defaults are what `kiln eval` uses."""

    window: int = 256
    stride: int = 128
    tokens: int | None = None  # the first N tokens of the text (default: all of it)
    greedy_tokens: int = 64
    prompts: int = 4
    threads: int = 0  # ONNX Runtime intra-op threads (0: its default)


def prompt_offsets(n_tokens: int, prompts: int) -> list[int]:
    """Where the greedy prompts start: evenly spread over the text, the first at its start."""
    if n_tokens < PROMPT_TOKENS:
        raise ConfigError(
            f"the text has {n_tokens} tokens; greedy prompts need {PROMPT_TOKENS}: pass a longer "
            "--text or a larger --tokens."
        )
    return [i * (n_tokens - PROMPT_TOKENS) // prompts for i in range(prompts)]


def _check_context(name: str, limit: int | None, need: int, what: str) -> None:
    if limit is not None and need > limit:
        raise ConfigError(
            f"{name} holds {limit} positions (static KV max_context) but {what} needs {need}; "
            "lower --window/--greedy-tokens or re-export with a larger --max-context."
        )


def evaluate_model(
    candidate: Path,
    *,
    reference: Path | None = None,
    text: Path | None = None,
    out: Path | None = None,
    options: EvalOptions = EvalOptions(),
) -> EvalReport:
    """Score `candidate` (and compare with `reference`); write eval.json into `out`."""
    from kiln.evaluate.models import open_model
    from kiln.evaluate.score import greedy_agreement, score_windows
    from kiln.evaluate.text import check_same_tokenizer, default_text, load_text, tokenizer_folder

    candidate, opts = Path(candidate), options
    if reference is not None:
        check_same_tokenizer(candidate, Path(reference))
    text_path = Path(text) if text is not None else default_text(candidate)
    source = load_text(text_path, tokenizer_folder(candidate), opts.tokens)
    windows = sliding_windows(len(source.ids), opts.window, opts.stride)
    model = open_model(candidate, threads=opts.threads)
    ref = open_model(Path(reference), threads=opts.threads) if reference is not None else None
    offsets = prompt_offsets(len(source.ids), opts.prompts) if ref is not None else []
    for name, m in ((str(candidate), model), (str(reference), ref)):
        if m is None:
            continue
        _check_context(name, m.max_context, min(opts.window, len(source.ids)), "--window")
        if ref is not None:
            _check_context(name, m.max_context, PROMPT_TOKENS + opts.greedy_tokens, "greedy")
    if ref is not None and ref.vocab != model.vocab:
        raise ConfigError(
            f"candidate vocab {model.vocab} != reference vocab {ref.vocab}; compare artifacts of "
            "the same model."
        )
    log.info(
        "eval %s: %d tokens, %d windows of %d (stride %d)",
        candidate,
        len(source.ids),
        len(windows),
        opts.window,
        opts.stride,
    )
    t0 = time.perf_counter()
    totals = score_windows(source.ids, windows, model, ref)
    scored_s = time.perf_counter() - t0
    greedy = None
    if ref is not None:
        prompts = [source.ids[o : o + PROMPT_TOKENS] for o in offsets]
        greedy = greedy_agreement(prompts, opts.greedy_tokens, model, ref)
    report = EvalReport.make(
        candidate=model.describe(),
        reference=ref.describe() if ref is not None else None,
        text=source,
        windows=windows,
        options=opts,
        prompt_tokens=PROMPT_TOKENS,
        offsets=offsets,
        totals=totals,
        greedy=greedy,
        elapsed_s={"windows": scored_s, "total": time.perf_counter() - t0},
    )
    write_report(report, out if out is not None else default_out(candidate))
    return report


__all__ = ["EvalOptions", "EvalReport", "evaluate_model"]

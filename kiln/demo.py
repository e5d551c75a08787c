"""`kiln demo`: every stage on the bundled model, each checked by the text that comes out.

The bundled model has memorised the Zen of Python, so a human can read whether a stage kept the
model intact: the text generated greedily from each artifact must equal the training text.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _prompt_ids(tokenizer: object, prompt: str) -> list[int]:
    """Token ids of `prompt` with BOS first, as the model saw its training sequence."""
    ids = list(tokenizer(prompt)["input_ids"])  # type: ignore[operator]
    bos = tokenizer.bos_token_id  # type: ignore[attr-defined]
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def run_demo(out: Path, *, model: Path | None = None) -> int:
    """Export the bundled model in fp32 and fp16, generate from each; 0 when every text matches."""
    from transformers import AutoTokenizer

    from kiln.export import export_model
    from kiln.models.zen import ZEN_DIR, ZEN_PROMPT, zen_text
    from kiln.runtime.greedy import greedy_from_onnx

    source = model or ZEN_DIR
    expected = zen_text()
    rows: list[tuple[str, float, bool]] = []
    for precision in ("fp32", "fp16"):
        t0 = time.perf_counter()
        artifact = export_model(source, out / f"onnx-{precision}", precision=precision)
        elapsed = time.perf_counter() - t0
        tok = AutoTokenizer.from_pretrained(artifact)
        prompt = _prompt_ids(tok, ZEN_PROMPT)
        t1 = time.perf_counter()
        new = greedy_from_onnx(
            artifact,
            prompt,
            max_new_tokens=len(tok(expected)["input_ids"]) + 8,
            eos_id=tok.eos_token_id,
        )
        gen_s = time.perf_counter() - t1
        text = ZEN_PROMPT + tok.decode(new, skip_special_tokens=True)
        ok = text == expected
        print(f"\n=== generated greedily through {artifact / 'model.onnx'} ({precision}) ===")
        print(text)
        print(
            f"=== {'matches' if ok else 'DIFFERS FROM'} the training text; "
            f"{len(new)} tokens in {gen_s:.2f} s ({len(new) / gen_s:.0f} tok/s, ORT CPU) ==="
        )
        rows.append((f"export {precision}", elapsed, ok))
    print("\nstage           time      text")
    for name, secs, ok in rows:
        print(f"{name:<15} {secs:6.1f} s  {'ok' if ok else 'WRONG'}")
    return 0 if all(ok for _, _, ok in rows) else 1

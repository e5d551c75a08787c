"""`kiln demo`: every stage on the bundled model, each checked by the text that comes out.

The bundled model has memorised the Zen of Python, so a human can read whether a stage kept the
model intact: the text generated greedily from each artifact must equal the training text.
The stages are a table (`ONNX_STAGES`, `ENGINE_STAGES`): what each makes, from which row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.layouts import STATIC

STATIC_MAX_CONTEXT = 384  # the prompt and the whole text fit; the engine profile allows it
_STATIC = {"kv": STATIC.name, "max_context": STATIC_MAX_CONTEXT}


@dataclass(frozen=True)
class OnnxStage:
    """One ONNX artifact: `kiln export` of the model, or `kiln optimize` of an earlier row."""

    name: str
    folder: str
    options: dict[str, Any]
    source: str | None = None  # the row it optimizes; None: an export of the model


ONNX_STAGES = (
    OnnxStage("export fp32", "onnx", {}),
    OnnxStage("optimize fp16", "optimized-fp16", {"precision": "fp16"}, "export fp32"),
    OnnxStage("optimize int8", "optimized-int8", {"precision": "int8"}, "export fp32"),
    OnnxStage(
        "optimize onnxruntime int4",
        "optimized-ort-int4",
        {"target": "onnxruntime", "precision": "int4"},
        "export fp32",
    ),
    # The static layout: preallocated per-slot KV buffers written in place (what serving uses).
    OnnxStage("export static fp32", "onnx-static-fp32", {"precision": "fp32", **_STATIC}),
    OnnxStage("export static fp16", "onnx-static-fp16", {"precision": "fp16", **_STATIC}),
    OnnxStage(
        "optimize static onnxruntime fp32",
        "optimized-static-ort-fp32",
        {"target": "onnxruntime", "precision": "fp32"},
        "export static fp32",
    ),
)
# TensorRT-RTX engines: (GPU profile, the ONNX row it builds, folder).
ENGINE_STAGES = (
    ("rtx-ampere-ada-fp16", "optimize fp16", "engines/rtx-ampere-ada-fp16"),
    ("rtx-ampere-ada-int8wo", "optimize int8", "engines/rtx-ampere-ada-int8wo"),
    ("rtx-ampere-ada-fp16", "export static fp16", "engines-static/rtx-ampere-ada-fp16"),
)


@dataclass
class _Row:
    stage: str
    seconds: float
    result: str
    ok: bool


def _check_text(stage: str, artifact: Path, expected: str) -> tuple[bool, str]:
    """Greedy text from `artifact` through the runtime (ONNX Runtime, CPU), printed and judged."""
    from kiln.models.zen import ZEN_PROMPT
    from kiln.runtime import load

    gen = load(artifact, backend="onnxruntime", device="cpu")
    t0 = time.perf_counter()
    done = gen.generate(ZEN_PROMPT, max_new_tokens=400)
    secs = time.perf_counter() - t0
    text, tokens = ZEN_PROMPT + (done.text or ""), len(done.token_ids)
    ok = text == expected
    print(f"\n=== {stage}: generated greedily through {artifact / 'model.onnx'} ===")
    print(text)
    verdict = "matches" if ok else "DIFFERS FROM"
    print(
        f"=== {verdict} the training text; {tokens} tokens in {secs:.2f} s "
        f"({tokens / secs:.0f} tok/s, kiln runtime on ONNX Runtime CPU) ==="
    )
    return ok, f"text {'ok' if ok else 'WRONG'}, {tokens / secs:.0f} tok/s"


def _make(stage: OnnxStage, made: dict[str, Path], source: Path, out: Path) -> Path:
    from kiln.export import export_model
    from kiln.optimize import optimize_model

    if stage.source is None:
        return export_model(source, out / stage.folder, **stage.options)
    return optimize_model(made[stage.source], out / stage.folder, **stage.options)


def _build(profile: str, artifact: Path, folder: Path) -> str:
    """Build one engine; its size, targets and library as the row's result."""
    from kiln.engine import build_engine, read_engine

    build_engine(artifact, profile, folder)
    m = read_engine(folder)
    targets = "+".join(m.compute_capabilities)
    library = f"{m.library['name']} {m.library['version']}"
    return (
        f"{m.plan['bytes'] / 1e6:.1f} MB plan for SM {targets} ({library}); runs on a matching GPU"
    )


def run_demo(out: Path, *, model: Path | None = None) -> int:
    """Run every stage of the tables on the bundled model; 0 when every text and engine is right."""
    from kiln.manifests import newest_manifest
    from kiln.models.zen import ZEN_DIR, zen_text

    expected = zen_text()
    made: dict[str, Path] = {}
    rows: list[_Row] = []
    for stage in ONNX_STAGES:
        t0 = time.perf_counter()
        made[stage.name] = _make(stage, made, model or ZEN_DIR, out)
        seconds = time.perf_counter() - t0
        ok, result = _check_text(stage.name, made[stage.name], expected)
        rows.append(_Row(stage.name, seconds, result, ok))
    try:
        import tensorrt_rtx  # noqa: F401
    except ImportError:
        print("\n(no tensorrt_rtx: install the engine extra to build engines)")
    else:
        for profile, source, folder in ENGINE_STAGES:
            layout = newest_manifest(made[source]).export.layout.name
            t0 = time.perf_counter()
            result = _build(profile, made[source], out / folder)
            rows.append(
                _Row(f"engine {profile} ({layout})", time.perf_counter() - t0, result, True)
            )
    print(f"\n{'stage':<38} {'time':>7}  result")
    for r in rows:
        print(f"{r.stage:<38} {r.seconds:6.1f}s  {r.result}")
    print(f"artifacts under {out}/")
    return 0 if all(r.ok for r in rows) else 1

"""`kiln demo`: every stage on the bundled model, each checked by the text that comes out.

The bundled model has memorised the Zen of Python, so a human can read whether a stage kept the
model intact: the text generated greedily from each artifact must equal the training text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

ENGINE_PROFILES = ("rtx-ampere-ada-fp16", "rtx-ampere-ada-int8wo")
STATIC_MAX_CONTEXT = 384  # the prompt and the whole text fit; the engine profile allows it


@dataclass
class _Row:
    stage: str
    artifact: Path
    seconds: float
    result: str
    ok: bool


def _generate(artifact: Path) -> tuple[str, float, int]:
    """Greedy text from `artifact` through the runtime (ONNX Runtime, CPU), time and tokens."""
    from kiln.models.zen import ZEN_PROMPT
    from kiln.runtime import load

    gen = load(artifact, backend="onnxruntime", device="cpu")
    t0 = time.perf_counter()
    done = gen.generate(ZEN_PROMPT, max_new_tokens=400)
    elapsed = time.perf_counter() - t0
    return ZEN_PROMPT + (done.text or ""), elapsed, len(done.token_ids)


def _check_text(stage: str, artifact: Path, expected: str) -> tuple[bool, str]:
    text, secs, tokens = _generate(artifact)
    ok = text == expected
    print(f"\n=== {stage}: generated greedily through {artifact / 'model.onnx'} ===")
    print(text)
    verdict = "matches" if ok else "DIFFERS FROM"
    print(
        f"=== {verdict} the training text; {tokens} tokens in {secs:.2f} s "
        f"({tokens / secs:.0f} tok/s, kiln runtime on ONNX Runtime CPU) ==="
    )
    return ok, f"text {'ok' if ok else 'WRONG'}, {tokens / secs:.0f} tok/s"


def run_demo(out: Path, *, model: Path | None = None) -> int:
    """Run every stage on the bundled model and generate its text from each ONNX artifact.

    Export (concat and static KV), optimize (TensorRT and ONNX Runtime targets), and build
    TensorRT-RTX engines.

    Returns 0 when every ONNX artifact reproduces the text and every engine built.
    """
    from kiln.engine import build_engine, read_engine
    from kiln.export import export_model
    from kiln.models.zen import ZEN_DIR, zen_text
    from kiln.optimize import optimize_model

    source = model or ZEN_DIR
    expected = zen_text()
    rows: list[_Row] = []

    def timed_stage(stage: str, make: Callable[[], Path]) -> Path:
        t0 = time.perf_counter()
        artifact = make()
        rows.append(_Row(stage, artifact, time.perf_counter() - t0, "", True))
        return artifact

    onnx = timed_stage("export fp32", lambda: export_model(source, out / "onnx"))
    rows[-1].ok, rows[-1].result = _check_text("export fp32", onnx, expected)
    optimized = {}
    for precision in ("fp16", "int8"):
        stage = f"optimize {precision}"
        optimized[precision] = timed_stage(
            stage,
            partial(optimize_model, onnx, out / f"optimized-{precision}", precision=precision),
        )
        rows[-1].ok, rows[-1].result = _check_text(stage, optimized[precision], expected)
    stage = "optimize onnxruntime int4"
    ort_int4 = timed_stage(
        stage,
        lambda: optimize_model(
            onnx, out / "optimized-ort-int4", target="onnxruntime", precision="int4"
        ),
    )
    rows[-1].ok, rows[-1].result = _check_text(stage, ort_int4, expected)
    # The static layout: preallocated per-slot KV buffers written in place (what serving uses).
    static = {}
    for precision in ("fp32", "fp16"):
        stage = f"export static {precision}"
        static[precision] = timed_stage(
            stage,
            partial(
                export_model,
                source,
                out / f"onnx-static-{precision}",
                precision=precision,
                kv="static",
                max_context=STATIC_MAX_CONTEXT,
            ),
        )
        rows[-1].ok, rows[-1].result = _check_text(stage, static[precision], expected)
    stage = "optimize static onnxruntime fp32"
    static_ort = timed_stage(
        stage,
        lambda: optimize_model(
            static["fp32"],
            out / "optimized-static-ort-fp32",
            target="onnxruntime",
            precision="fp32",
        ),
    )
    rows[-1].ok, rows[-1].result = _check_text(stage, static_ort, expected)
    try:
        import tensorrt_rtx  # noqa: F401
    except ImportError:
        print("\n(no tensorrt_rtx: install the engine extra to build engines)")
    else:
        builds = [
            (name, optimized[p], out / "engines" / name)
            for name, p in zip(ENGINE_PROFILES, ("fp16", "int8"), strict=True)
        ]
        builds.append(
            (ENGINE_PROFILES[0], static["fp16"], out / "engines-static" / ENGINE_PROFILES[0])
        )
        for name, artifact, folder in builds:
            layout = "static" if "static" in folder.parent.name else "concat"
            stage = f"engine {name} ({layout})"
            timed_stage(stage, partial(build_engine, artifact, name, folder))
            m = read_engine(folder)
            targets = "+".join(m.compute_capabilities)
            library = f"{m.library['name']} {m.library['version']}"
            rows[-1].result = (
                f"{m.plan['bytes'] / 1e6:.1f} MB plan for SM {targets} ({library}); "
                "runs on a matching GPU"
            )
    print(f"\n{'stage':<38} {'time':>7}  result")
    for r in rows:
        print(f"{r.stage:<38} {r.seconds:6.1f}s  {r.result}")
    print(f"artifacts under {out}/")
    return 0 if all(r.ok for r in rows) else 1

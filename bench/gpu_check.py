"""`make gpu-check`: prove the TensorRT backend end to end on a machine with an NVIDIA GPU.

NOT RUN by the author: the machine it was written on has no GPU. On a GPU host it exports the
bundled model in fp16, builds an engine for exactly this GPU's compute capability (TensorRT-RTX
for RTX-class targets, full TensorRT for data-center GPUs such as SM90 when installed), and
checks through the runtime that: the engine writes the Zen of Python; a ragged batch of three
gives the same tokens as ONNX Runtime on the same fp16 ONNX; rows that finish early (finished
rows dropped from the device KV cache) keep the others right; CUDA-graph decode gives the same
tokens; an engine for another GPU is refused. It then times decode against ONNX Runtime CPU.
Static KV (`--kv static`): it builds the static export's engine for this GPU and runs the
TensorRT slot backend (runtime/trt_slots.py, present bound to past's address) against ONNX
Runtime's slot backend on the same static ONNX: the Zen text, a ragged three-slot schedule with
a slot refilled mid-run (same tokens as ONNX Runtime, and the refill equals a fresh run), and the
K/V the engine wrote in place equal to ONNX Runtime's.
Exit status 0 only when every check passes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("kiln.bench.gpu_check")

RTX_TARGETS = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
STATIC_MAX_CONTEXT = 384  # the bundled model's whole text (337 tokens) fits


def _library_for(cc: str) -> tuple[str, str] | None:
    """(GPU-profile backend, module) that can build for `cc` and is installed."""
    for backend, module, ok in (
        ("tensorrt-rtx", "tensorrt_rtx", cc in RTX_TARGETS),
        ("tensorrt", "tensorrt", True),
    ):
        if not ok:
            continue
        try:
            importlib.import_module(module)
            return backend, module
        except ImportError:
            continue
    return None


def _profile_for(cc: str, backend: str) -> Any:
    from kiln.engine import load_profile

    base = load_profile("rtx-ampere-ada-fp16")
    return dataclasses.replace(
        base, name=f"gpu-check-sm{cc.replace('.', '')}", backend=backend, compute_capabilities=(cc,)
    )


def _decode_tok_s(gen: Any, prompt: list[int], batch: int, new: int) -> float:
    gen.generate([prompt] * batch, max_new_tokens=4, min_new_tokens=4)  # warm up (JIT, caches)
    t0 = time.perf_counter()
    gen.generate([prompt] * batch, max_new_tokens=1, min_new_tokens=1)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    gen.generate([prompt] * batch, max_new_tokens=new, min_new_tokens=new)
    return batch * (new - 1) / max(time.perf_counter() - t0 - prefill, 1e-9)


def greedy_slots(
    backend: Any,
    prompts: list[list[int]],
    new: int,
    *,
    stop: tuple[int, ...] = (),
    refill: tuple[int, int, list[int]] | None = None,
) -> list[list[int]]:
    """Greedy tokens of `prompts` decoded together, prompt i in slot i, over a SlotBackend.

    refill = (step, slot, prompt): after `step` steps that slot's sequence is dropped and the
    prompt restarted there while the others keep decoding; its tokens come last in the result.
    A sequence ends after `new` tokens or a stop token (included, as Completion.token_ids).
    """
    from kiln.runtime.slots import SlotFeed

    out: list[list[int]] = [[] for _ in prompts]
    owner = {i: i for i in range(len(prompts))}  # slot -> sequence
    feeds = [SlotFeed(i, p, restart=True) for i, p in enumerate(prompts)]
    step = 0
    while feeds:
        logits_NV = backend.step(feeds)
        step += 1
        following = []
        for feed, logits_V in zip(feeds, logits_NV, strict=True):
            tok = int(np.argmax(logits_V))
            out[owner[feed.slot]].append(tok)
            if refill is not None and (step, feed.slot) == refill[:2]:
                out.append([])
                owner[feed.slot] = len(out) - 1
                following.append(SlotFeed(feed.slot, refill[2], restart=True))
            elif len(out[owner[feed.slot]]) < new and tok not in stop:
                following.append(SlotFeed(feed.slot, [tok]))
            else:
                backend.release(feed.slot)
        feeds = following
    return out


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float32) - b.astype(np.float32))))


def run_static_checks(out: Path, cc: str, backend: str, ort: Any) -> list[tuple[str, bool, str]]:
    """The static-KV engine through TrtSlotBackend vs ONNX Runtime's slot backend."""
    from kiln.engine import build_engine, read_engine
    from kiln.export import export_model
    from kiln.models.zen import ZEN_DIR, ZEN_PROMPT, zen_text
    from kiln.runtime.artifact import inspect_artifact
    from kiln.runtime.ort_slots import OrtSlotBackend
    from kiln.runtime.trt_backend import slot_backend_from_engines

    results: list[tuple[str, bool, str]] = []
    onnx_dir = export_model(
        ZEN_DIR, out / "onnx-fp16-static", precision="fp16", kv="static",
        max_context=STATIC_MAX_CONTEXT,
    )  # fmt: skip
    folder = out / "engines-static" / f"sm{cc.replace('.', '')}"
    t0 = time.perf_counter()
    build_engine(onnx_dir, _profile_for(cc, backend), folder)
    kv = read_engine(folder).kv_cache
    results.append(
        ("static engine build", kv["layout"] == "static",
         f"{time.perf_counter() - t0:.1f} s, {len(kv['aliases'])} in-place KV updates")
    )  # fmt: skip
    trt = slot_backend_from_engines(inspect_artifact(folder.parent), slots=4)
    ref = OrtSlotBackend(onnx_dir / "model.onnx", slots=4, device="cpu")
    prompt = ort.encode(ZEN_PROMPT)
    want = ort.generate(ZEN_PROMPT, max_new_tokens=400)
    got = greedy_slots(trt, [prompt], 400, stop=ort.info.eos_ids)[0]
    results.append(
        ("zen tokens through the static engine", got == want.token_ids
         and ZEN_PROMPT + (want.text or "") == zen_text(), f"{len(got)} tokens")
    )  # fmt: skip
    text = zen_text()
    prompts = [ort.encode(text[: text.index(w) + len(w)]) for w in ("Flat is", "Now is", "never")]
    refill = (10, 1, ort.encode(ZEN_PROMPT))
    a = greedy_slots(trt, prompts, 30, refill=refill)
    b = greedy_slots(ref, prompts, 30, refill=refill)
    results.append(
        ("static slots + refill == ONNX Runtime", a == b, f"lengths {[len(x) for x in a]}")
    )
    # What each engine wrote in place: the positions each slot's last sequence fed (prompt and
    # all but the last token), compared buffer by buffer.
    fed = [len(prompts[0]), len(refill[2]), len(prompts[2])]
    for slot, n in enumerate(fed):
        n += 30 - 1
        diff = max(_max_abs(trt.read_slot(slot, i)[:, :n], ref.read_slot(slot, i)[:, :n])
                   for i in range(len(trt.kv)))  # fmt: skip
        results.append(
            (
                f"in-place K/V of slot {slot} == ONNX Runtime",
                diff < 5e-2,
                f"{n} positions, max |d| {diff:.1e}",
            )
        )
    fresh = greedy_slots(trt, [refill[2]], 30)[0]
    results.append(("refilled slot == fresh run", a[-1] == fresh, f"{len(fresh)} tokens"))
    trt.save_runtime_cache()
    return results


def run_checks(out: Path) -> list[tuple[str, bool, str]]:
    """Every check as (name, ok, detail)."""
    from kiln.engine import build_engine
    from kiln.engine.errors import EngineMismatchError
    from kiln.export import export_model
    from kiln.models.zen import ZEN_DIR, ZEN_PROMPT, zen_text
    from kiln.runtime import load
    from kiln.runtime.cuda_mem import gpu_compute_capability
    from kiln.runtime.trt_backend import select_engine

    results: list[tuple[str, bool, str]] = []
    major_minor = gpu_compute_capability()
    if major_minor is None:
        return [("GPU visible", False, "no CUDA device/driver (cudaGetDeviceCount failed)")]
    cc = f"{major_minor[0]}.{major_minor[1]}"
    picked = _library_for(cc)
    if picked is None:
        return [("TensorRT library", False, f"neither tensorrt_rtx (targets {RTX_TARGETS}) "
                 f"nor tensorrt can build for SM{cc} here")]  # fmt: skip
    backend, module = picked
    trt = importlib.import_module(module)
    results.append(("GPU visible", True, f"SM{cc}, {module} {trt.__version__}"))

    onnx_dir = export_model(ZEN_DIR, out / "onnx-fp16", precision="fp16")
    engines = out / "engines"
    t0 = time.perf_counter()
    build_engine(onnx_dir, _profile_for(cc, backend), engines / f"sm{cc.replace('.', '')}")
    results.append(("engine build", True, f"{time.perf_counter() - t0:.1f} s"))

    ort = load(onnx_dir, backend="onnxruntime", device="cpu")
    t0 = time.perf_counter()
    gen = load(engines)
    results.append(("deserialize + buffers", True, f"{time.perf_counter() - t0:.2f} s"))

    done = gen.generate(ZEN_PROMPT, max_new_tokens=400)
    results.append(
        (
            "zen text through the engine",
            ZEN_PROMPT + (done.text or "") == zen_text(),
            f"{len(done.token_ids)} tokens, finish {done.finish_reason}",
        )
    )
    text = zen_text()
    prompts = [ZEN_PROMPT, text[: text.index("Flat is") + 7], text[: text.index("Now is") + 6]]
    a = [c.token_ids for c in gen.generate(prompts, max_new_tokens=40)]
    b = [c.token_ids for c in ort.generate(prompts, max_new_tokens=40)]
    results.append(("ragged batch of 3 == ONNX Runtime", a == b, f"lengths {[len(x) for x in a]}"))
    stops = tuple({row[5] for row in b if len(row) > 5})  # rows end at different steps
    a = [c.token_ids for c in gen.generate(prompts, max_new_tokens=40, stop_token_ids=stops)]
    b = [c.token_ids for c in ort.generate(prompts, max_new_tokens=40, stop_token_ids=stops)]
    results.append(
        ("rows finishing early == ONNX Runtime", a == b, f"lengths {[len(x) for x in a]}")
    )
    graph = load(engines, cuda_graph=True)
    g = [c.token_ids for c in graph.generate(prompts, max_new_tokens=40)]
    plain = [c.token_ids for c in gen.generate(prompts, max_new_tokens=40)]
    results.append(("CUDA-graph decode == plain", g == plain, ""))
    other = "8.0" if cc != "8.0" else "8.6"
    try:
        select_engine(
            gen.info.engines, tuple(int(x) for x in other.split(".")), module, trt.__version__
        )
        results.append(("engine for another GPU refused", False, f"SM{other} accepted"))
    except EngineMismatchError as e:
        results.append(("engine for another GPU refused", True, str(e).splitlines()[1].strip()))

    prompt = ort.encode(ZEN_PROMPT)
    for batch in (1, 4):
        trt_s = _decode_tok_s(gen, prompt, batch, 128)
        graph_s = _decode_tok_s(graph, prompt, batch, 128)
        ort_s = _decode_tok_s(ort, prompt, batch, 128)
        results.append(
            (
                f"decode tok/s batch {batch}",
                True,
                f"engine {trt_s:.0f}, engine+cuda-graph {graph_s:.0f}, ORT CPU {ort_s:.0f} "
                f"({trt_s / ort_s:.1f}x)",
            )
        )
    gen.backend.concat.save_runtime_cache()  # the TrtBackend under the slot adapter
    try:
        results += run_static_checks(out, cc, backend, ort)
    except Exception as e:  # a failed static check must not hide the concat results above
        log.exception("static checks")
        results.append(("static KV engine", False, f"{type(e).__name__}: {e}"))
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the checks, print a table, exit 0 only if all pass."""
    from kiln.log import setup_logging

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/gpu-check"), help="work folder")
    args = p.parse_args(argv)
    setup_logging(0)
    results = run_checks(args.out)
    width = max(len(n) for n, _, _ in results)
    for name, ok, detail in results:
        print(f"{'✓' if ok else '✗'} {name:<{width}}  {detail}")
    failed = [n for n, ok, _ in results if not ok]
    print(f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Bad input gets a clear error naming the problem and the fix."""

from __future__ import annotations

import json
import shutil

import pytest

from kiln.errors import ArtifactError, KilnError
from kiln.runtime import load
from kiln.runtime.cuda_mem import gpu_compute_capability


def test_prompt_longer_than_context(gen):
    ctx = gen.info.max_context
    assert ctx == 256  # the tiny llama's max_position_embeddings
    with pytest.raises(
        KilnError, match=f"Prompt of {ctx} tokens does not fit .* max context of {ctx}"
    ):
        gen.generate([1] * ctx, max_new_tokens=4)
    ok = gen.generate([1] * (ctx - 3), max_new_tokens=10, ignore_eos=True)
    assert len(ok.token_ids) == 3 and ok.finish_reason == "length"  # capped at the context


def test_empty_prompt(gen):
    with pytest.raises(KilnError, match="Empty prompt"):
        gen.generate([], max_new_tokens=4)
    with pytest.raises(KilnError, match="Empty prompt"):
        gen.generate([[1, 2], []], max_new_tokens=4)


def test_text_prompt_without_tokenizer(gen):
    with pytest.raises(KilnError, match="has no tokenizer files"):
        gen.generate("hello")


def test_unknown_artifact_folder(tmp_path):
    with pytest.raises(ArtifactError, match=r"does not exist\. Make one with `kiln export"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match=r"neither model\.onnx with a manifest"):
        load(tmp_path / "empty")


def test_incomplete_artifact(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported("llama"), broken)
    (broken / "export.json").unlink()  # a folder without its manifest is unfinished
    with pytest.raises(ArtifactError, match=r"neither model\.onnx with a manifest"):
        load(broken)


@pytest.fixture(scope="module")
def zen_engine(exported, tmp_path_factory):
    """A real TensorRT-RTX engine (SM86+SM89, fp16) of the bundled model, built on this CPU."""
    pytest.importorskip("tensorrt_rtx")
    from kiln.engine import build_engine

    out = tmp_path_factory.mktemp("zen-engines") / "rtx-ampere-ada-fp16"
    return build_engine(exported("zen", "fp16"), "rtx-ampere-ada-fp16", out)


def test_engine_for_another_gpu(zen_engine):
    import tensorrt_rtx as trt

    from kiln.engine.errors import EngineMismatchError
    from kiln.runtime.trt_backend import select_engine

    folder, manifest = select_engine([zen_engine], (8, 9), "tensorrt_rtx", trt.__version__)
    assert folder == zen_engine and manifest.compute_capabilities == ["8.6", "8.9"]
    with pytest.raises(
        EngineMismatchError,
        match=r"(?s)compute capability 8\.0.*built for .*8\.6, 8\.9, not this GPU's 8\.0",
    ):
        select_engine([zen_engine], (8, 0), "tensorrt_rtx", trt.__version__)
    with pytest.raises(EngineMismatchError, match="run only on the version that built them"):
        select_engine([zen_engine], (8, 9), "tensorrt_rtx", "1.0.0.0")


def test_engine_folder_reads_its_manifest(zen_engine):
    from kiln.runtime.artifact import inspect_artifact

    info = inspect_artifact(zen_engine.parent)  # the matrix folder: one engine per profile
    assert info.kind == "engine" and info.engines == (zen_engine,)
    manifest = json.loads((zen_engine / "engine.json").read_text())
    ctx = min(p["axes"]["total_sequence"][2] for p in manifest["optimization_profiles"])
    assert info.max_context == ctx
    assert info.eos_ids == (0,)  # from the ONNX source's generation_config.json


@pytest.mark.skipif(gpu_compute_capability() is not None, reason="checks the no-GPU message")
def test_engine_without_gpu_says_so(zen_engine):
    with pytest.raises(KilnError, match=r"need an NVIDIA GPU .* none is visible here"):
        load(zen_engine)

"""Stage manifests are typed, versioned records: old or incomplete files are refused by name.

And the one stage skeleton (kiln/publish.py): reuse check, locked staging, manifest last,
atomic publish.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.artifacts import sha256_file
from kiln.errors import ArtifactError
from kiln.manifests import ExportManifest, OptimizeManifest, newest_manifest
from kiln.publish import publishing

IO = {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}]}
FILES = {"model.onnx": {"sha256": "ab" * 32, "bytes": 3}}


def _export(**over):
    fields = dict(
        cache_key="k1", source={"path": "models/x"}, architecture={"family": "llama"},
        config={"vocab": 32, "max_positions": 64}, exporter={"precision": "fp16", "kv": "static"},
        io=IO, dynamic_axes={}, files=FILES, versions={"kiln": "0"},
        kv_cache={"layout": "static", "max_context": 64}, rope={"type": None, "in_graph": False},
        weight_bytes=10, parity={"ok": True}, elapsed_s={"total": 1.0},
    )  # fmt: skip
    return ExportManifest(**{**fields, **over})


def _optimize(**over):
    fields = dict(
        cache_key="k2", source={"path": "out/x"}, target="tensorrt", precision="fp8",
        architecture={}, config={"vocab": 32, "max_positions": 64}, io=IO,
        engine_hints={"attention_decomposable": False, "min_compute_capability": "SM89"},
        contrib_ops={}, passes=[], files=FILES, versions={}, parity={"ok": True}, elapsed_s=1.0,
    )  # fmt: skip
    return OptimizeManifest(**{**fields, **over})


def _folder(tmp_path: Path, *records) -> Path:
    (tmp_path / "model.onnx").write_bytes(b"onx")
    for r in records:
        r.write(tmp_path)
    return tmp_path


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_manifest_reads_back_what_was_written(tmp_path):
    """Negative control for the refusals below: a current file reads without complaint."""
    _folder(tmp_path, _export())
    on_disk = json.loads((tmp_path / "export.json").read_text())
    assert on_disk["kind"] == "kiln.export" and on_disk["format"] == ExportManifest.FORMAT
    assert list(on_disk)[2:] == [f for f in on_disk if f not in ("kind", "format")]
    m = ExportManifest.read(tmp_path)
    assert m == _export()
    assert m.precision == "fp16" and m.layout.name == "static" and m.max_context == 64
    assert m.main_file() == ("model.onnx", "ab" * 32)


def test_a_folder_from_before_the_format_field_is_refused_with_the_fix(tmp_path):
    _folder(tmp_path, _export())
    _edit(tmp_path / "export.json", lambda d: d.pop("format"))
    with pytest.raises(ArtifactError) as e:
        ExportManifest.read(tmp_path)
    assert str(e.value) == (
        f"{tmp_path / 'export.json'} has format 1; this kiln reads format 2: re-run `kiln export`."
    )


def test_another_format_or_kind_is_refused(tmp_path):
    _folder(tmp_path, _export())
    _edit(tmp_path / "export.json", lambda d: d.update(format=3))
    with pytest.raises(ArtifactError, match=r"has format 3; this kiln reads format 2"):
        ExportManifest.read(tmp_path)
    _edit(tmp_path / "export.json", lambda d: d.update(format=2, kind="kiln.optimize"))
    with pytest.raises(ArtifactError, match=r"is not a kiln.export manifest"):
        ExportManifest.read(tmp_path)


@pytest.mark.parametrize(
    ("drop", "named"),
    [
        (lambda d: d.pop("io"), "io"),
        (lambda d: d["kv_cache"].pop("layout"), "kv_cache.layout"),
        (lambda d: d["exporter"].pop("precision"), "exporter.precision"),
    ],
)
def test_a_missing_field_is_an_error_naming_it_never_a_default(tmp_path, drop, named):
    _folder(tmp_path, _export())
    _edit(tmp_path / "export.json", drop)
    with pytest.raises(ArtifactError) as e:
        ExportManifest.read(tmp_path)
    assert str(e.value) == f"{tmp_path / 'export.json'} has no {named}; re-run `kiln export`."


def test_newest_manifest_prefers_optimize_and_keeps_the_export(tmp_path):
    _folder(tmp_path, _export())
    assert newest_manifest(tmp_path).stage == "export"  # negative control: export only
    _optimize().write(tmp_path)
    found = newest_manifest(tmp_path)
    assert found.stage == "optimize" and found.newest == _optimize()
    assert found.export == _export() and found.layout.name == "static"
    assert found.newest.min_compute_capability == "SM89"


def test_newest_manifest_needs_the_carried_export_json(tmp_path):
    _folder(tmp_path, _optimize())
    with pytest.raises(ArtifactError, match=r"has no export\.json.*`kiln export`"):
        newest_manifest(tmp_path)
    (tmp_path / "optimize.json").unlink()
    with pytest.raises(ArtifactError, match=r"no export\.json or optimize\.json"):
        newest_manifest(tmp_path)


def _build(out: Path, key: str, *, force: bool = False, fail: bool = False) -> bool:
    """Run a fake export stage; True when it built, False when it reused `out`."""
    with publishing(out, ExportManifest, key=key, force=force) as stage:
        if stage.reused:
            return False
        (stage.dir / "model.onnx").write_bytes(b"graph " + key.encode())
        assert not (stage.dir / "export.json").exists()  # the manifest comes last
        if fail:
            raise RuntimeError("stage failed")
        sha = sha256_file(stage.dir / "model.onnx")
        stage.finish(_export(cache_key=stage.key, files={"model.onnx": {"sha256": sha}}))
    return True


def _hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_same_key_reuses_other_key_rebuilds(tmp_path):
    out = tmp_path / "out"
    assert _build(out, "a") and json.loads((out / "export.json").read_text())["cache_key"] == "a"
    assert not _build(out, "a")  # reused
    assert _build(out, "a", force=True)
    assert _build(out, "b") and (out / "model.onnx").read_bytes() == b"graph b"
    assert _hidden(tmp_path) == []


def test_a_touched_main_file_or_an_old_manifest_is_rebuilt(tmp_path):
    out = tmp_path / "out"
    _build(out, "a")
    (out / "model.onnx").write_bytes(b"edited")
    assert _build(out, "a")
    data = json.loads((out / "export.json").read_text())
    data.pop("format")
    (out / "export.json").write_text(json.dumps(data))
    assert _build(out, "a")  # an unreadable manifest is not up to date: rebuilt, not refused
    assert not _build(out, "a")


def test_a_failed_stage_leaves_the_old_folder_and_no_staging(tmp_path):
    out = tmp_path / "out"
    _build(out, "a")
    with pytest.raises(RuntimeError, match="stage failed"):
        _build(out, "b", fail=True)
    assert (out / "model.onnx").read_bytes() == b"graph a"
    assert _hidden(tmp_path) == []


def test_a_stage_without_a_manifest_publishes_nothing(tmp_path):
    out = tmp_path / "out"
    with (
        pytest.raises(RuntimeError, match="ended without a manifest"),
        publishing(out, ExportManifest, key="a") as stage,
    ):
        (stage.dir / "model.onnx").write_bytes(b"x")
    assert not out.exists() and _hidden(tmp_path) == []


def test_the_key_function_is_called_only_when_needed(tmp_path):
    calls = []

    def key() -> str:
        calls.append(1)
        return "a"

    out = tmp_path / "out"
    with publishing(out, ExportManifest, key=key) as stage:
        assert calls == []  # nothing to compare against yet
        (stage.dir / "model.onnx").write_bytes(b"x")
        stage.finish(
            _export(
                cache_key=stage.key,
                files={"model.onnx": {"sha256": sha256_file(stage.dir / "model.onnx")}},
            )
        )
    assert calls == [1]
    with publishing(out, ExportManifest, key=key) as stage:
        assert stage.reused
    assert calls == [1, 1]

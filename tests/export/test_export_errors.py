"""Bad input gets a clear error naming the problem and the fix, and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from kiln.errors import ConfigError, KilnError, UnsupportedModelError
from kiln.export import export_model


def test_missing_folder(tmp_path):
    with pytest.raises(KilnError, match=r"does not exist; pass a local Hugging Face model folder"):
        export_model(tmp_path / "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match=r"has no config.json.*save_pretrained"):
        export_model(tmp_path / "m", tmp_path / "out")


def test_corrupt_config(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON"):
        export_model(tmp_path / "m", tmp_path / "out")


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "m").mkdir()
    cfg = {"model_type": "mamba", "architectures": ["MambaForCausalLM"]}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        export_model(tmp_path / "m", tmp_path / "out")
    msg = str(e.value)
    assert "'mamba'" in msg
    for t in ("gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3"):
        assert t in msg


def test_missing_weights(tiny_model_dir, tmp_path):
    shutil.copy(tiny_model_dir("llama") / "config.json", tmp_path / "config.json")
    with pytest.raises(KilnError, match=r"has no weights \(\*.safetensors"):
        export_model(tmp_path, tmp_path / "out")


def test_unsupported_rope_type(tiny_model_dir, tmp_path):
    src = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "proportional", "rope_theta": 10000.0, "factor": 2.0}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((UnsupportedModelError, ConfigError), match=r"proportional"):
        export_model(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_prints_error_without_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "kiln", "export", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert "kiln: error:" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr

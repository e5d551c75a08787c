"""A plain wheel holds one `kiln` namespace with every stage and the bundled model."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_maps_stage_folders_under_kiln(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("kiln-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "kiln/cli.py",
        "kiln/export/__init__.py",
        "kiln/runtime/greedy.py",
        "kiln/models/families.py",
        "kiln/models/zen-llama/model.safetensors",
        "kiln/models/zen-llama/tokenizer.json",
    ):
        assert module in names, module
    top = {n.split("/")[0] for n in names}
    assert top <= {"kiln", *(n.split("/")[0] for n in names if ".dist-info" in n)}, top

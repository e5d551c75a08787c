"""A plain wheel holds one `kiln` namespace with every stage subpackage and the bundled model;
commands name the extra they need; `kiln --version` and the manifests carry kiln's version."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from kiln.cli import main

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _source_packages() -> dict[str, Path]:
    """Installed package name -> source folder, for every folder with an __init__.py."""
    out = {}
    for name, folder in PYPROJECT["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            out[".".join((name, *rel))] = init.parent
    return out


def test_package_list_is_the_source_tree():
    """setuptools cannot find subpackages through the mapping: the list must name each one."""
    assert sorted(PYPROJECT["packages"]) == sorted(_source_packages())
    mapped = set(PYPROJECT["package-dir"].values())
    assert not mapped & {"bench", "tests"}


@pytest.mark.slow
def test_wheel_holds_every_module_and_no_repo_tools(tmp_path):
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
    want = {
        "/".join((*pkg.split("."), py.name))
        for pkg, folder in _source_packages().items()
        for py in folder.glob("*.py")
    }
    assert want - names == set()
    assert {"kiln/commands/export.py", "kiln/optimize/ort/__init__.py"} <= names
    data = [*(ROOT / "models/zen-llama").iterdir(), *(ROOT / "models/gpus").glob("*.toml")]
    assert len(data) > 6
    for path in data:
        assert f"kiln/{path.relative_to(ROOT).as_posix()}" in names, path
    top = {n.split("/")[0] for n in names}
    assert top <= {"kiln", *(n.split("/")[0] for n in names if ".dist-info" in n)}, top


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"kiln {metadata.version('kiln')}"


HIDE_AND_RUN = """
import sys
for m in sys.argv[1].split(","):
    sys.modules[m] = None  # importlib.util.find_spec then reports it missing
from kiln.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize(
    ("hidden", "argv", "extra"),
    [
        ("torch", ["export", "models/zen-llama"], "export"),
        ("onnx_ir", ["optimize", "out/none"], "export"),
        ("onnx", ["build", "out/none", "--profile", "all"], "engine"),
        ("fastapi,uvicorn", ["serve", "out/none"], "serve"),
    ],
)
def test_a_missing_extra_is_named_with_its_pip_line(hidden, argv, extra):
    r = subprocess.run(
        [sys.executable, "-c", HIDE_AND_RUN, hidden, *argv],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert r.returncode == 1
    command = "kiln build" if argv[0] == "build" else f"kiln {argv[0]}"
    assert r.stderr.startswith(
        f"kiln: error: {command} needs the '{extra}' extra: pip install 'kiln[{extra}]'"
    ), r.stderr
    assert "Traceback" not in r.stderr


def test_export_manifest_records_kiln_version(exported):
    versions = json.loads((exported("llama") / "export.json").read_text())["versions"]
    assert versions["kiln"] == metadata.version("kiln")

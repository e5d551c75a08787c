"""The kiln command: help for every option, and no heavy imports just to print it."""

from __future__ import annotations

import subprocess
import sys

from kiln.cli import build_parser


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False)


def test_help_lists_stages_and_loads_no_torch():
    code = "import sys; from kiln.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
    code += "print('torch' in sys.modules, 'onnxruntime' in sys.modules)"
    r = _run("-c", code)
    assert r.returncode == 0, r.stderr
    assert "export" in r.stdout and "demo" in r.stdout
    assert r.stdout.strip().endswith("False False")


def test_python_dash_m_kiln_works():
    r = _run("-m", "kiln", "--help")
    assert r.returncode == 0 and "usage: kiln" in r.stdout


def test_export_help_explains_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["export"]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 10, action.dest
    text = sub.format_help()
    for flag in ("--out", "--precision", "--opset", "--allow-drift", "--force"):
        assert flag in text

"""Cache keys follow the stage's code: an artifact made by other code is not reused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kiln.artifacts import cache_key, imported_modules, source_fingerprint
from kiln.errors import KilnError


def test_fingerprint_changes_with_the_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "fp_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "rules.py").write_text("A = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fp_pkg", None)
    before = source_fingerprint("fp_pkg")
    assert source_fingerprint("fp_pkg") == before  # stable
    (pkg / "notes.txt").write_text("not code")
    assert source_fingerprint("fp_pkg") == before  # only Python sources count
    (pkg / "sub" / "rules.py").write_text("A = 2\n")
    assert source_fingerprint("fp_pkg") != before


def test_fingerprint_of_a_missing_package_names_it() -> None:
    with pytest.raises(KilnError, match="no_such_kiln_pkg"):
        source_fingerprint("no_such_kiln_pkg")


def test_fingerprint_follows_every_kiln_module_the_stage_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kiln module the stage imports (also inside a function) counts; others do not."""
    pkg = tmp_path / "fp_stage"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from kiln.errors import KilnError\n\ndef f():\n    from kiln.layouts import STATIC\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fp_stage", None)
    found = imported_modules("fp_stage")
    assert {"fp_stage", "kiln", "kiln.errors", "kiln.layouts"} <= set(found)
    assert "kiln.runtime" not in found and "kiln.cli" not in found  # negative control


def test_stage_fingerprints_cover_the_code_they_depend_on() -> None:
    optimize = imported_modules("kiln.optimize")
    # optimize drives export's wrappers and reads the tolerance table: both are in its key
    assert "kiln.export.wrapper" in optimize and "kiln.parity" in optimize
    assert "kiln.manifests" in optimize and "kiln.publish" in optimize
    assert "kiln.models.families" in imported_modules("kiln.export")
    engine = imported_modules("kiln.engine")
    assert "kiln.manifests" in engine and "kiln.layouts" in engine
    assert not any(n.startswith("kiln.runtime") for n in engine)  # negative control


def test_cache_key_changes_with_each_part() -> None:
    base = {"inputs": {"a": "1"}, "options": {"p": "fp16"}, "versions": {"onnx": "1"}}
    key = cache_key("kiln.export", **base)
    assert cache_key("kiln.export", **base) == key
    assert cache_key("kiln.export", **{**base, "inputs": {"a": "2"}}) != key
    assert cache_key("kiln.export", **{**base, "options": {"p": "fp32"}}) != key
    assert cache_key("kiln.export", **{**base, "versions": {"onnx": "2"}}) != key
    assert cache_key("kiln.optimize", **base) != key  # other code, other key

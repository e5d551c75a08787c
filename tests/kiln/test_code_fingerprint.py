"""Cache keys follow the stage's code: an artifact made by other code is not reused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kiln.errors import KilnError
from kiln.manifest import code_fingerprint


def test_fingerprint_changes_with_the_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "fp_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "rules.py").write_text("A = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fp_pkg", None)
    before = code_fingerprint("fp_pkg")
    assert code_fingerprint("fp_pkg") == before  # stable
    (pkg / "notes.txt").write_text("not code")
    assert code_fingerprint("fp_pkg") == before  # only Python sources count
    (pkg / "sub" / "rules.py").write_text("A = 2\n")
    assert code_fingerprint("fp_pkg") != before


def test_fingerprint_of_a_missing_package_names_it() -> None:
    with pytest.raises(KilnError, match="no_such_kiln_pkg"):
        code_fingerprint("no_such_kiln_pkg")

"""`kiln build` end to end through the CLI entry point."""

from __future__ import annotations

import pytest

from kiln.cli import main

pytest.importorskip("tensorrt_rtx", reason="the engine extra (tensorrt-rtx) is not installed")


def test_build_prints_the_matrix_and_skips_what_cannot_build(exported, tmp_path, capsys):
    art = exported("zen", "fp16")
    rc = main(
        [
            "-q",
            "build",
            str(art),
            "--profile",
            "rtx-ampere-ada-fp16,a100-bf16,rtx-ada-fp8",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert rows["rtx-ampere-ada-fp16"].endswith("built") and " MB " in rows["rtx-ampere-ada-fp16"]
    assert "skipped: needs tensorrt" in rows["a100-bf16"]
    assert "skipped: no fp8 artifact (have fp16)" in rows["rtx-ada-fp8"]
    assert (tmp_path / "rtx-ampere-ada-fp16" / "engine.json").is_file()
    assert not (tmp_path / "rtx-ada-fp8").exists()

    rc = main(["-q", "build", str(art), "--profile", "rtx-ampere-ada-fp16", "--out", str(tmp_path)])
    assert rc == 0 and "up to date" in capsys.readouterr().out


def test_unknown_profile_is_a_clean_error(exported, tmp_path, capsys):
    rc = main(["build", str(tmp_path), "--profile", "sm99"])
    assert rc == 1
    assert "GPU profile 'sm99' not found" in capsys.readouterr().err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    text = capsys.readouterr().out
    for opt in ("ARTIFACT", "--profile", "--out", "--force"):
        assert opt in text

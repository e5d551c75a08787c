"""`kiln generate` prints the model's text; bad input exits 1 with the message, no traceback."""

from __future__ import annotations

from kiln.cli import main
from kiln.models.zen import ZEN_PROMPT, zen_text


def test_generate_greedy_prints_zen(exported, capsys):
    rc = main(["generate", str(exported("zen")), "--prompt", ZEN_PROMPT, "--max-new-tokens", "40"])
    out = capsys.readouterr().out
    assert rc == 0
    assert zen_text().startswith(out.rstrip("\n")) and len(out) > len(ZEN_PROMPT) + 40


def test_generate_stream_equals_batch(exported, capsys):
    art = str(exported("zen"))
    args = ["generate", art, "--prompt", ZEN_PROMPT, "--max-new-tokens", "30"]
    assert main([*args, "--temperature", "0.9", "--seed", "4", "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert main([*args, "--temperature", "0.9", "--seed", "4"]) == 0
    assert capsys.readouterr().out == streamed


def test_generate_bad_input(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_generate_help_lists_every_option(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--stream",
                 "--stop", "--repetition-penalty", "--backend"):  # fmt: skip
        assert flag in out

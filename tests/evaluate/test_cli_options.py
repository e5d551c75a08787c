"""`kiln eval` and `kiln generate` turn their flags into options through one helper
(kiln/commands/args.py): every flag named like a field lands in it, the rest keep defaults."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from kiln.cli import build_parser
from kiln.commands.args import options_from
from kiln.evaluate import EvalOptions
from kiln.runtime import SamplingParams


def test_eval_flags_fill_every_option():
    args = build_parser().parse_args(
        ["eval", "m", "--window", "64", "--stride", "32", "--tokens", "500",
         "--greedy-tokens", "8", "--prompts", "2", "--threads", "1"]
    )  # fmt: skip
    assert options_from(EvalOptions, args) == EvalOptions(
        window=64, stride=32, tokens=500, greedy_tokens=8, prompts=2, threads=1
    )
    # No flags: the dataclass defaults are the CLI defaults.
    assert options_from(EvalOptions, build_parser().parse_args(["eval", "m"])) == EvalOptions()


def test_generate_flags_fill_sampling_params():
    args = build_parser().parse_args(
        ["generate", "m", "--prompt", "x", "--max-new-tokens", "5", "--temperature", "0.5",
         "--top-k", "3", "--top-p", "0.9", "--seed", "7", "--stop", "a", "--stop", "b"]
    )  # fmt: skip
    p = options_from(SamplingParams, args)
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.seed) == (5, 0.5, 3, 0.9, 7)
    assert p.stop == ("a", "b")  # the repeated flag's list, as the frozen dataclass's tuple
    assert p.ignore_eos is False and p.stop_token_ids == ()  # no such flags: defaults
    assert options_from(SamplingParams, args, seed=1).seed == 1  # given values win


def test_only_dataclasses_and_their_own_checks():
    @dataclass(frozen=True)
    class Positive:
        n: int = 1

        def __post_init__(self) -> None:
            if self.n < 1:
                raise ValueError("n must be >= 1")

    with pytest.raises(ValueError, match="n must be"):
        options_from(Positive, argparse.Namespace(n=0))
    with pytest.raises(TypeError, match="not a dataclass"):
        options_from(int, argparse.Namespace())

"""A small real tune of the bundled model on the CPU, shared by the tune tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from kiln.evaluate import EvalOptions
from kiln.tune import TuneResult, tune_model
from kiln.tune.recipe import load_recipe

SMALL = """\
[search]
precision = ["fp32", "int8"]
fusions = [true]
kv = ["concat"]
threads = [1]

[workload]
prompt_tokens = 16
output_tokens = 8
"""
PROXY = EvalOptions(tokens=128, window=64, stride=32, prompts=1, greedy_tokens=8)
FULL = EvalOptions(window=128, stride=64, prompts=2, greedy_tokens=16)


@dataclass
class ZenTune:
    """The inputs of the shared tune and its first result."""

    root: Path
    recipe: Path
    text: Path
    out: Path
    first: TuneResult

    def again(self) -> TuneResult:
        """The same tune, same inputs."""
        from kiln.models.zen import ZEN_DIR

        return tune_model(
            ZEN_DIR, "cpu", recipe=load_recipe(self.recipe), out=self.out, text=self.text,
            repeats=3, proxy=PROXY, full=FULL,
        )  # fmt: skip


@pytest.fixture(scope="session")
def zen_tune(tmp_path_factory: pytest.TempPathFactory) -> ZenTune:
    from kiln.models.zen import zen_text

    root = tmp_path_factory.mktemp("tune")
    (root / "small.toml").write_text(SMALL)
    (root / "zen.txt").write_text(zen_text())
    z = ZenTune(root, root / "small.toml", root / "zen.txt", root / "zen" / "cpu", None)  # type: ignore[arg-type]
    z.first = z.again()
    return z

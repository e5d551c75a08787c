"""The Step runner: records, timing, drift judged per pass, failures named."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import KilnError, ParityError
from kiln.parity import TOL
from kiln.steps import Result, Step, run_steps


class Add(Step[float]):
    """A toy step on a float: the 'logits' are [value, 0]."""

    def __init__(self, name: str, delta: float, tolerance: str | None = "fp32") -> None:
        self.name = name  # type: ignore[misc]
        self.delta = delta
        self.tolerance = tolerance

    def run(self, value: float) -> Result[float]:
        return Result(value + self.delta, changed=self.delta != 0, counts={"adds": 1})


class Probe:
    def logits(self, value: float) -> list[np.ndarray]:
        return [np.array([[value, 0.0], [0.0, value + 1.0]], np.float32)]


class Boom(Step[float]):
    name = "boom"

    def run(self, value: float) -> Result[float]:
        raise KilnError("no good")


def test_records_every_step_with_counts_time_and_drift():
    value, records = run_steps([Add("a", 0.0), Add("b", 5e-5)], 1.0, probe=Probe(), tolerances=TOL)
    assert value == pytest.approx(1.00005)
    assert [r.name for r in records] == ["a", "b"]
    assert records[0].drift is None and not records[0].changed  # unchanged: not probed
    assert records[1].drift.max_abs == pytest.approx(5e-5, rel=1e-2)
    assert records[1].drift.total_max_abs == pytest.approx(5e-5, rel=1e-2)
    assert all(r.elapsed_s >= 0 and r.within_budget for r in records)
    assert records[1].as_dict()["counts"] == {"adds": 1}


def test_drift_past_budget_names_the_pass():  # negative control of the drift budget
    with pytest.raises(ParityError, match="pass 'bad' drifted past the fp32 budget"):
        run_steps([Add("ok", 0.0), Add("bad", 1e-3)], 1.0, probe=Probe(), tolerances=TOL)


def test_allow_drift_records_and_continues():
    _, records = run_steps(
        [Add("bad", 1e-3), Add("after", 0.0)],
        1.0,
        probe=Probe(),
        tolerances=TOL,
        allow_drift=True,
    )
    assert [r.within_budget for r in records] == [False, True]


def test_greedy_flip_fails_the_budget():
    # value 1 -> -0.5 flips row 0 ([v, 0]) but not row 1 ([0, v + 1]): agreement 0.5 < 0.99
    with pytest.raises(ParityError, match=r"greedy agreement 0\.500"):
        run_steps([Add("flip", -1.5, "fp16")], 1.0, probe=Probe(), tolerances=TOL)


def test_failure_names_the_step_and_those_before():
    with pytest.raises(KilnError, match=r"step 'boom' failed \(steps done before it: a\)"):
        run_steps([Add("a", 0.0), Boom()], 1.0)

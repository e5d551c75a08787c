"""The Ray app's configuration without a cluster: Serve config files, options, the policy's sums."""

from __future__ import annotations

import pytest
import yaml

from kiln.errors import ConfigError
from kiln.runtime.server.ray_app import (
    BUILDER_PATH,
    ScaleOptions,
    parse_autoscale,
    serve_config,
    specs_from_args,
)
from kiln.runtime.server.ray_autoscale import SlotPressurePolicy, replicas_wanted
from kiln.runtime.server.ray_replica import EngineSpec


def test_serve_config_args_round_trip_through_the_app_builder_parser():
    spec = EngineSpec("/models/zen", slots=6, threads=2)
    scale = ScaleOptions(autoscale=(1, 4), max_queue=32)
    config = serve_config(spec, scale, port=9000)
    (app,) = config["applications"]
    assert app["import_path"] == BUILDER_PATH
    assert app["args"] == {
        "artifact": "/models/zen",
        "slots": 6,
        "threads": 2,
        "autoscale": "1:4",
        "max_queue": 32,
    }
    assert specs_from_args(yaml.safe_load(yaml.safe_dump(app["args"]))) == (spec, scale)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"artifact": "x", "slot": 4}, r"Unknown key\(s\) slot"),
        ({"slots": 4}, r"need 'artifact'"),
        ({"artifact": "x", "slots": 0}, r"slots=0: must be >= 1"),
        ({"artifact": "x", "autoscale": "3:1"}, r"autoscale 3:1"),
        ({"artifact": "x", "autoscale": "2"}, r"expected MIN:MAX"),
    ],
)
def test_bad_args_name_the_value_and_the_fix(args, message):
    with pytest.raises(ConfigError, match=message):
        specs_from_args(args)


def test_parse_autoscale():
    assert parse_autoscale("0:8") == (0, 8)


def test_cli_prints_the_serve_config(zen_static, capsys):
    from kiln.cli import main

    assert main(["serve", str(zen_static), "--serve-config", "--replicas", "2"]) == 0
    out = capsys.readouterr().out
    args = yaml.safe_load(out)["applications"][0]["args"]
    assert args == {"artifact": str(zen_static.resolve()), "replicas": 2}


@pytest.mark.parametrize(
    ("free", "queued", "wait", "want"),
    [
        (8.0, 0.0, 0.0, 0),  # idle: Serve's min_replicas bounds it
        (5.0, 0.0, 0.0, 1),  # 3 slots busy: one replica at 75% use
        (4.0, 0.0, 0.0, 2),  # 4 busy: 4 / (4 x 0.8) -> 2
        (0.0, 8.0, 0.0, 5),  # 8 busy + 8 waiting: 16 / 3.2 = 5
        (5.0, 0.0, 2.5, 3),  # 1 replica's worth busy, but a job waits 2.5 s > 1 s: one more
    ],
)
def test_replicas_wanted(free, queued, wait, want):
    got = replicas_wanted(slots=4, replicas=2, free=free, queued=queued, oldest_wait_s=wait)
    assert got == want


def test_policy_reads_serve_autoscaling_context():
    from ray.serve._private.common import DeploymentID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    ids = ["a", "b"]
    ctx = AutoscalingContext(
        deployment_id=DeploymentID(name="KilnEngine", app_name="kiln"),
        deployment_name="KilnEngine",
        app_name="kiln",
        current_num_replicas=2,
        target_num_replicas=2,
        running_replicas=[],
        total_num_requests=20.0,
        total_queued_requests=6.0,
        aggregated_metrics={
            "slots": dict.fromkeys(ids, 4.0),
            "free_slots": dict.fromkeys(ids, 0.0),
            "queued": dict.fromkeys(ids, 1.0),
            "oldest_wait_s": {"a": 0.2, "b": 0.3},
        },
        raw_metrics={},
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=0.0,
        config=AutoscalingConfig(min_replicas=1, max_replicas=8),
    )
    wanted, state = SlotPressurePolicy(target_use=0.8)(ctx)
    # 8 slots busy + 2 queued in the engines + 6 at the handles = 16 -> ceil(16 / 3.2) = 5
    assert wanted == 5 and state["queued"] == 8.0
    assert SlotPressurePolicy(target_use=1.0)(ctx)[0] == 4
    with pytest.raises(ValueError, match="target_use"):
        SlotPressurePolicy(target_use=0)

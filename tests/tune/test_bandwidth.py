"""GPU profiles carry their memory bandwidth with a source; it never changes an engine's key."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.engine.profiles import available_profiles, load_profile
from kiln.errors import ConfigError
from kiln.tune.recipe import Workload
from kiln.tune.speed import decode_cost


@pytest.mark.parametrize("name", available_profiles())
def test_every_shipped_profile_has_a_sourced_bandwidth(name: str) -> None:
    p = load_profile(name)
    assert p.memory_bandwidth_gbs and p.memory_bandwidth_gbs > 100
    assert "datasheet" in p.memory_bandwidth_source or "whitepaper" in p.memory_bandwidth_source
    assert "memory_bandwidth_gbs" not in p.to_dict()  # the engine cache key hashes to_dict()


def test_a_bandwidth_without_its_source_is_refused(tmp_path: Path) -> None:
    src = load_profile("l4-fp16").source
    text = Path(src).read_text().replace("memory_bandwidth_source", "# memory_bandwidth_source")
    (tmp_path / "l4.toml").write_text(text)
    with pytest.raises(ConfigError, match="memory_bandwidth_source = None: missing"):
        load_profile(tmp_path / "l4.toml")


def test_the_cost_model_counts_weights_and_kv() -> None:
    w = Workload(prompt_tokens=100, output_tokens=0, concurrency=2)
    c = decode_cost(1_000_000, 1_000, w, slots=2, bandwidth_gbs=1.0)
    assert c["step_bytes"] == 1_000_000 + 2 * 1_000 * 100
    assert c["tokens_per_s"] == pytest.approx(2 / (1.2e6 / 1e9))
    assert not c["measured"]
    halved = decode_cost(500_000, 1_000, w, slots=2, bandwidth_gbs=1.0)
    assert halved["tokens_per_s"] > c["tokens_per_s"]  # fewer weight bytes: faster

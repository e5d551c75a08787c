"""GPU profiles load from TOML and are rejected at load time, naming the file and the key."""

from __future__ import annotations

import pytest

from kiln.engine.profiles import GPUS_DIR, available_profiles, load_profile
from kiln.errors import ConfigError

GOOD = """
backend = "tensorrt-rtx"
compute_capabilities = ["8.6", "8.9"]
precision = "fp16"

[profile.decode]
max_batch = 8
max_sequence = 1
max_context = 2048
opt_context = 256
"""


def write(tmp_path, text, name="sm89.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_profiles_cover_the_issue_matrix():
    profiles = {n: load_profile(n) for n in available_profiles()}
    got = {(p.backend, p.compute_capabilities, p.precision) for p in profiles.values()}
    assert ("tensorrt-rtx", ("8.6", "8.9"), "fp16") in got
    assert any(p.precision == "fp8" and "8.9" in p.compute_capabilities for p in profiles.values())
    assert ("tensorrt", ("8.0",), "bf16") in got  # A100
    assert ("tensorrt", ("9.0",), "fp8") in got  # H100
    assert any(b == "tensorrt" and cc == ("8.9",) for b, cc, _ in got)  # L4
    assert {p.precision for p in profiles.values()} >= {"int8", "int4"}
    for p in profiles.values():
        assert [s.name for s in p.shapes] == ["prefill", "decode"]
        assert p.source.startswith(str(GPUS_DIR))


def test_a_minimal_profile_gets_defaults(tmp_path):
    p = load_profile(write(tmp_path, GOOD))
    assert p.name == "sm89"  # from the file name
    (decode,) = p.shapes
    assert decode.axes() == {
        "batch": (1, 1, 8),
        "sequence": (1, 1, 1),
        "past_sequence": (0, 255, 2047),
        "total_sequence": (1, 256, 2048),
    }
    assert p.builder.optimization_level == 3 and p.builder.workspace_mib is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("max_batch = 8", "max_batch = 0"),
            r"sm89.toml \[profile.decode\] max_batch = 0: must be >= 1",
        ),
        (
            ("max_batch = 8", "max_batch = 8\nopt_batch = 9"),
            r"\[profile.decode\] opt_batch = 9: must be <= max_batch = 8",
        ),
        (
            ("max_batch = 8", "max_batch = '8'"),
            r"\[profile.decode\] max_batch = '8': must be an integer",
        ),
        (
            ("max_batch = 8", "max_batch = 8\nmax_btach = 4"),
            r"\[profile.decode\] max_btach = 4: unknown key",
        ),
        (
            ("max_sequence = 1", "max_sequence = 4096"),
            r"max_sequence = 4096: must be <= max_context = 2048",
        ),
        (("max_context = 2048\n", ""), r"max_context = None: missing"),
        (
            ('"8.6", "8.9"', '"8.9", "9.0"'),
            r"compute_capabilities = \['8.9', '9.0'\]: backend 'tensorrt-rtx' cannot build for "
            r"9.0; it builds for 7.5, 8.0, 8.6, 8.9, 12.0, 12.1; use backend = 'tensorrt' for 9.0",
        ),
        (
            ('precision = "fp16"', 'precision = "fp8"'),
            r"precision = 'fp8': fp8 needs compute capability >= 8.9 but the profile targets "
            r"8.6; tensorrt-rtx can build fp8 for 8.9, 12.0, 12.1",
        ),
        (
            ('precision = "fp16"', 'precision = "fp12"'),
            r"precision = 'fp12': must be one of fp32, fp16, bf16, int8, int4, fp8",
        ),
        (
            ('"tensorrt-rtx"', '"tensorrt"'),
            r"full TensorRT builds for the one GPU it runs on: give exactly one",
        ),
        (
            ('backend = "tensorrt-rtx"', 'backend = "tensorrt-rtx"\nmax_batch = 2'),
            r"sm89.toml max_batch = 2: unknown key",
        ),
        (
            ("[profile.decode]", "[profile.decoder]"),
            r"\[profile\] decoder = .*: unknown key; allowed: decode, prefill",
        ),
        (
            ("[profile.decode]", "[builder]\noptimization_level = 7\n[profile.decode]"),
            r"\[builder\] optimization_level = 7: must be <= 5",
        ),
        (("compute_capabilities", "x = 1\ncompute_capabilities"), r"x = 1: unknown key"),
    ],
)
def test_bad_profiles_name_file_and_key(tmp_path, edit, message):
    old, new = edit
    assert old in GOOD
    with pytest.raises(ConfigError, match=message):
        load_profile(write(tmp_path, GOOD.replace(old, new, 1)))


def test_unknown_profile_lists_the_shipped_ones():
    with pytest.raises(
        ConfigError, match=r"'sm99' not found .* shipped profiles: .*rtx-ampere-ada-fp16"
    ):
        load_profile("sm99")


def test_broken_toml_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"sm89.toml: not valid TOML"):
        load_profile(write(tmp_path, "backend = [\n"))

"""Benchmarks, load tests and the GPU check: run from the repository root, never installed.

`make bench` (race.py, race_runners.py, race_report.py), `make bench-engine` (engine_build.py),
`make load` (loadtest.py, stall.py), `make gpu-check` (gpu_check.py); each is
`python -m bench.<module>`. code_metrics.py measures the source tree itself.
"""

"""`kiln serve`: an OpenAI-compatible HTTP server over a static-KV artifact."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kiln.extras import require_extra


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `kiln serve`."""
    p = sub.add_parser(
        "serve",
        help="serve a static-KV artifact over the OpenAI API (completions, chat, streaming)",
        description=(
            "Serve an artifact exported with `kiln export MODEL --kv static --max-context N` "
            "with continuous batching over its KV slots: POST /v1/completions, "
            "/v1/chat/completions (SSE with stream=true), GET /v1/models, /health, /metrics "
            "(Prometheus). SIGTERM drains: running requests finish, new ones get 503."
        ),
    )
    p.add_argument("artifact", type=Path, help="static-KV artifact folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--slots", type=int, default=8, help="sequences decoded at once (KV rows)")
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests that may wait for a slot; beyond: 429"
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=0,
        help="prompt tokens fed per step while streams decode (bounds their stall); 0 (default): "
        "what fits --prefill-stall-ms at the measured cost per prompt token",
    )
    p.add_argument(
        "--prefill-stall-ms",
        type=float,
        default=None,
        help="with --prefill-chunk 0: the time a step's prompt chunks may take (0: whole prompts; "
        "default: the scheduler's PREFILL_STALL_S, runtime/server/scheduler.py)",
    )
    p.add_argument(
        "--adaptive",
        action="store_true",
        help="move the prompt budget per step and the slots admitted with the load, aiming at "
        "--ttft-target (default: fixed)",
    )
    p.add_argument(
        "--ttft-target",
        type=float,
        default=None,
        metavar="MS",
        help="with --adaptive: the time to first token to aim at (default 500)",
    )
    p.add_argument(
        "--prefix-cache",
        action="store_true",
        help="a prompt continues in a free slot that still holds its start (chats, shared "
        "system prompts): only the rest is prefilled",
    )
    p.add_argument(
        "--speculate",
        choices=["ngram"],
        default=None,
        help="speculative decoding with prompt-lookup drafts (same outputs, fewer passes)",
    )
    p.add_argument(
        "--draft-tokens",
        type=int,
        default=None,
        metavar="K",
        help="with --speculate: tokens drafted per verify pass (default 4)",
    )
    p.add_argument("--model-name", default=None, help="name clients use (default: model folder)")
    p.add_argument(
        "--drain-timeout", type=float, default=30, help="seconds running requests get on SIGTERM"
    )
    p.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"], default="auto")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all)")
    p.add_argument(
        "--spin",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ONNX Runtime threads spin between ops (default: on for one server, off for Ray "
        "replicas; use --no-spin on a host shared with other busy work, where spinning threads "
        "starve each other: runtime/server/README.md)",
    )
    ray = p.add_argument_group("Ray Serve (the 'ray' extra; RAY_ADDRESS joins a running cluster)")
    ray.add_argument("--ray", action="store_true", help="serve replicas on Ray Serve")
    ray.add_argument("--replicas", type=int, default=1, help="engine replicas (with --ray)")
    ray.add_argument(
        "--autoscale", default=None, metavar="MIN:MAX", help="scale replicas on engine load"
    )
    ray.add_argument(
        "--serve-config",
        action="store_true",
        help="print the Serve config (serve deploy, KubeRay serveConfigV2) and exit",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.ray or args.serve_config:
        return _run_ray(args)
    require_extra("serve", "kiln serve")
    from kiln.errors import ConfigError
    from kiln.runtime.server import ServerState, serve
    from kiln.runtime.server.serve import check_static, slots_loader

    for name in ("slots", "max_queue"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1.")
    check_static(args.artifact)
    options = _engine_options(args)
    loader = slots_loader(
        args.artifact,
        slots=args.slots,
        backend=args.backend,
        device=args.device,
        threads=args.threads,
        spin=args.spin is not False,
        last_only=args.speculate is None,
    )
    state = ServerState(
        loader,
        model_name=args.model_name,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        prefill_stall_s=_stall_s(args),
        **options,
    )
    serve(state, host=args.host, port=args.port, drain_timeout_s=args.drain_timeout)
    return 0


def _stall_s(args: argparse.Namespace) -> float | None:
    """The scheduler's prefill stall target: None when --prefill-chunk fixes the chunk."""
    from kiln.runtime.server.scheduler import PREFILL_STALL_S

    ms = args.prefill_stall_ms
    stall_s = PREFILL_STALL_S if ms is None else float(ms) / 1000
    return stall_s if args.prefill_chunk == 0 and stall_s > 0 else None


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """Adaptive, prefix reuse and speculation as ServerState / EngineSpec keywords."""
    from kiln.errors import ConfigError

    if args.ttft_target is not None and not args.adaptive:
        raise ConfigError(f"--ttft-target {args.ttft_target}: only with --adaptive; add it.")
    if args.draft_tokens is not None and args.speculate is None:
        raise ConfigError(f"--draft-tokens {args.draft_tokens}: only with --speculate ngram.")
    target_ms = 500.0 if args.ttft_target is None else args.ttft_target
    if target_ms <= 0:
        raise ConfigError(f"--ttft-target {target_ms}: must be > 0 milliseconds.")
    draft_tokens = 4 if args.draft_tokens is None else args.draft_tokens
    if draft_tokens < 1:
        raise ConfigError(f"--draft-tokens {draft_tokens}: must be >= 1.")
    return {
        "ttft_target_s": target_ms / 1000 if args.adaptive else None,
        "prefix_cache": args.prefix_cache,
        "speculate": args.speculate,
        "draft_tokens": draft_tokens,
    }


def _run_ray(args: argparse.Namespace) -> int:
    require_extra("ray", "kiln serve --ray")
    from kiln.runtime.server import ray_app
    from kiln.runtime.server.ray_replica import EngineSpec
    from kiln.runtime.server.serve import check_static

    check_static(args.artifact)
    spec = EngineSpec(
        artifact=str(args.artifact.resolve()),
        slots=args.slots,
        prefill_chunk=args.prefill_chunk,
        model_name=args.model_name,
        backend=args.backend,
        device=args.device,
        threads=args.threads,
        spin=bool(args.spin),
        prefill_stall_s=_stall_s(args),
        **_engine_options(args),
    )
    autoscale = ray_app.parse_autoscale(args.autoscale) if args.autoscale else None
    scale = ray_app.ScaleOptions(
        replicas=args.replicas,
        autoscale=autoscale,
        max_queue=args.max_queue,
        drain_timeout_s=args.drain_timeout,
    )
    ray_app.check_options(spec, scale)
    if args.serve_config:
        import yaml

        print(yaml.safe_dump(ray_app.serve_config(spec, scale, port=args.port), sort_keys=False))
        return 0
    ray_app.run(spec, scale, host=args.host, port=args.port)
    return 0

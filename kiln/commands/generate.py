"""`kiln generate`: text from an artifact (ONNX Runtime or TensorRT engines) on the command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `kiln generate`."""
    p = sub.add_parser(
        "generate",
        help="generate text from an ONNX artifact or TensorRT engine folder",
        description=(
            "Load an artifact folder (kiln export/optimize: model.onnx, run with ONNX Runtime; "
            "kiln build: engine.plan per GPU profile, run with TensorRT) and continue each "
            "prompt. Greedy by default; --temperature > 0 samples."
        ),
    )
    p.add_argument("artifact", type=Path, help="artifact folder (ONNX or engine folders)")
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="prompt text; repeat for a batch (rows of different lengths are left-padded)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument(
        "--min-new-tokens", type=int, default=0, help="EOS is suppressed until this many tokens"
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 is greedy; > 0 samples (default 0)"
    )
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: all)")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="sample within this probability mass (1: all)"
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="divide the logits of tokens already seen by this (>1 discourages repeats)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument(
        "--stop", action="append", default=[], help="stop before this string; repeatable"
    )
    p.add_argument(
        "--stream", action="store_true", help="print text as it is generated (one prompt)"
    )
    p.add_argument(
        "--backend",
        choices=["auto", "onnxruntime", "tensorrt"],
        default="auto",
        help="auto: TensorRT for engine folders, ONNX Runtime for ONNX artifacts",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="ONNX Runtime device (cuda needs onnxruntime-gpu)",
    )
    p.add_argument(
        "--speculate",
        metavar="ngram|ARTIFACT",
        help="speculative decoding (same output, fewer passes): draft by prompt lookup "
        "(ngram) or with a draft artifact of the same tokenizer; needs a --kv static artifact",
    )
    p.add_argument(
        "--draft-tokens", type=int, default=4, help="tokens drafted per verify pass (default 4)"
    )
    p.add_argument("--no-prompt-echo", action="store_true", help="print only the generated text")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kiln.commands.args import options_from
    from kiln.errors import KilnError
    from kiln.runtime import SamplingParams, load

    params = options_from(SamplingParams, args)
    gen = load(
        args.artifact,
        backend=args.backend,
        device=args.device,
        last_only=not args.speculate,  # a verify pass reads every fed position's logits
    )
    if gen.tokenizer is None:
        raise KilnError(
            f"{args.artifact} carries no tokenizer, so --prompt text cannot be encoded; export "
            "from a model folder with tokenizer files."
        )
    if args.speculate:
        from kiln.runtime.speculate import load_speculator

        gen.speculator = load_speculator(
            gen, args.speculate, draft_tokens=args.draft_tokens, device=args.device
        )
    echo = "" if args.no_prompt_echo else None
    t0 = time.perf_counter()
    if args.stream:
        if len(args.prompt) != 1:
            raise KilnError("--stream takes one --prompt; drop --stream to run a batch.")
        print(echo if echo is not None else args.prompt[0], end="", flush=True)
        ids = []
        for event in gen.stream(args.prompt[0], params):
            print(event.text, end="", flush=True)
            ids.append(event.token_id)
        print()
        n = len(ids)
    else:
        prompts: list[str] = list(args.prompt)
        done = gen.generate(prompts, params)
        n = 0
        for prompt, c in zip(prompts, done, strict=True):
            if len(done) > 1:
                print(f"--- [{c.index}] {c.finish_reason}, {len(c.token_ids)} tokens")
            print((echo if echo is not None else prompt) + (c.text or ""))
            n += len(c.token_ids)
    elapsed = time.perf_counter() - t0
    print(
        f"[kiln] {n} tokens in {elapsed:.2f} s ({n / elapsed:.1f} tok/s, {gen.backend.name})",
        file=sys.stderr,
    )
    if gen.speculator is not None:
        st = gen.speculator.stats
        print(
            f"[kiln] speculate {gen.speculator.drafter.name}: acceptance "
            f"{st.acceptance_rate:.0%} ({st.accepted}/{st.drafted} drafted), "
            f"{st.tokens_per_pass:.2f} tokens per verify pass",
            file=sys.stderr,
        )
    return 0

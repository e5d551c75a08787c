"""Train the eval model: a small Llama that has learned Python from the standard library.

Run as `python -m kiln.models.train_eval --out models/eval-llama` (`make eval-model`). The
bundled zen-llama memorises one text, so it can say whether a stage broke the model but not how
much a precision costs in language-model quality. This model can: it is trained on the Python
standard library's own sources (this interpreter's `lib/python3.X`, `pydoc_data` topics
included; free to use, on every machine, offline) with about 5% of the files held out by a hash
of their path, and `kiln eval` measures perplexity and divergence on the held-out files.

The split rule, every held-out file (path, sha256) and the held-out text (`heldout.txt`) are
written next to the weights (`split.json`). Seeded and deterministic for a given thread count
and library versions; the card records both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tokenizers
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kiln.log import setup_logging
from kiln.models import recipe
from kiln.models.recipe import BOS, EOS

log = logging.getLogger("kiln.models.train_eval")

SEED = 0
VOCAB_SIZE = 4096
MAX_POSITIONS = 1024
# 4 layers, GQA 2:1, head dim 64; every matrix dim a multiple of 128 (int4 blocks). Small on
# purpose: on a shared 2-core CPU a 1.8M-parameter model sees more tokens in the time budget
# than a wider one, and ends with a lower held-out perplexity.
SHAPE = recipe.LlamaShape(
    hidden=128, intermediate=384, layers=4, heads=2, kv_heads=1, max_positions=MAX_POSITIONS
)
# Folders of the standard library that are not library code (tests, installed packages).
SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})
HELDOUT_MODULUS = 20  # a file is held out when int(sha256(path)[:8], 16) % 20 == 0: ~5%
HELDOUT_LOSS_TOKENS = 32 * 256  # the card's held-out loss: the first 32 windows of 256
SPLIT_RULE = (
    "every *.py file under the stdlib folder, outside folders named "
    f"{sorted(SKIP_DIRS)}; held out when int(sha256(relative posix path)[:8], 16) % "
    f"{HELDOUT_MODULUS} == 0; files in sorted path order; held-out text = files joined by "
    "a blank line"
)


def stdlib_root() -> Path:
    """This interpreter's standard-library folder (sys.base_prefix/lib/python3.X)."""
    return Path(sysconfig.get_paths()["stdlib"])


def held_out(rel: str) -> bool:
    """Whether the file at stdlib-relative posix path `rel` is held out of training."""
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % HELDOUT_MODULUS == 0


def corpus_files(root: Path) -> list[str]:
    """Relative posix paths of the corpus files, sorted."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not set(p.relative_to(root).parts[:-1]) & SKIP_DIRS
    )


def read_text(root: Path, rel: str) -> str:
    """A corpus file as text (undecodable bytes replaced: a few files are not UTF-8)."""
    return (root / rel).read_bytes().decode("utf-8", errors="replace")


def calibration_text(path: Path, files: int = 40, seed: int = 0) -> Path:
    """Training-split files (never held out), `files` of them sampled, as one text at `path`.

    The calibration text of the compression methods on this corpus (bench/compress_report.py,
    `kiln tune`); written to a temporary name, then renamed.
    """
    import random

    root = stdlib_root()
    train = [f for f in corpus_files(root) if not held_out(f)]
    pick = random.Random(seed).sample(train, min(files, len(train)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n\n".join(read_text(root, f) for f in pick))
    tmp.replace(path)
    return path


def heldout_text(root: Path, files: list[str]) -> str:
    """The held-out files as one text, as `kiln eval` reads it."""
    return "\n\n".join(read_text(root, rel) for rel in files)


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule; the defaults are what `make eval-model` uses."""

    steps: int = 1200
    batch: int = 8
    seq_len: int = 256
    lr: float = 5e-3
    min_lr: float = 5e-4
    warmup_steps: int = 40
    weight_decay: float = 0.1
    log_every: int = 50
    threads: int = 2


@dataclass(frozen=True)
class TrainResult:
    """Where training ended, for the log and the card."""

    steps: int
    train_loss: float
    heldout_loss: float
    elapsed_s: float
    # 1/5/15-minute load averages: the wall time means little without them on a shared host.
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float]


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE (decode(encode(x)) == x for any string) trained on the training files."""
    return recipe.train_tokenizer(texts, VOCAB_SIZE, MAX_POSITIONS)


def token_stream(tok: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """BOS + file + EOS for every file, concatenated: the stream training windows are cut from."""
    ids: list[int] = []
    for enc in tok(texts)["input_ids"]:
        ids.extend([*enc, tok.eos_token_id])
    return torch.tensor(ids, dtype=torch.long)


def mean_loss(model: LlamaForCausalLM, stream: torch.Tensor, seq_len: int, limit: int) -> float:
    """Mean next-token loss over non-overlapping windows of the first `limit` tokens."""
    model.eval()
    n = min(limit, len(stream)) // seq_len
    windows = stream[: n * seq_len].view(n, seq_len)
    total = 0.0
    with torch.no_grad():
        for chunk in windows.split(16):
            total += model(chunk, labels=chunk).loss.item() * len(chunk)
    return total / n


def train(
    model: LlamaForCausalLM, train_ids: torch.Tensor, heldout_ids: torch.Tensor, cfg: TrainConfig
) -> TrainResult:
    """AdamW on random windows of the training stream, warmup then cosine decay to `min_lr`."""
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        floor = cfg.min_lr / cfg.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    log.info(
        "training on %d tokens (%d held out): %d steps of %d x %d",
        len(train_ids),
        len(heldout_ids),
        cfg.steps,
        cfg.batch,
        cfg.seq_len,
    )
    start, load_start = time.perf_counter(), os.getloadavg()
    running = float("nan")
    for step in range(1, cfg.steps + 1):
        model.train()
        starts = torch.randint(0, len(train_ids) - cfg.seq_len, (cfg.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + cfg.seq_len] for s in starts.tolist()])
        opt.zero_grad(set_to_none=True)
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if math.isnan(running) else 0.9 * running + 0.1 * loss.item()
        if step % cfg.log_every == 0:
            log.info(
                "  step %5d  loss %.4f  lr %.2e  %.0f s",
                step,
                running,
                sched.get_last_lr()[0],
                time.perf_counter() - start,
            )
    elapsed = time.perf_counter() - start
    heldout = mean_loss(model, heldout_ids, cfg.seq_len, limit=HELDOUT_LOSS_TOKENS)
    return TrainResult(cfg.steps, running, heldout, elapsed, load_start, os.getloadavg())


def _load(avg: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.1f}" for x in avg)


def model_card(
    result: TrainResult,
    cfg: TrainConfig,
    config: LlamaConfig,
    n_params: int,
    n_train: int,
    split: dict[str, object],
) -> str:
    """The README.md that says what the model is, what it saw and how to remake it."""
    seen = cfg.steps * cfg.batch * cfg.seq_len
    heldout = split["heldout"]
    n_heldout = len(heldout) if isinstance(heldout, list) else 0
    head_dim = config.hidden_size // config.num_attention_heads
    return f"""---
library_name: transformers
pipeline_tag: text-generation
---
# eval-llama

kiln's quality yardstick: a {n_params:,}-parameter Llama trained on the Python standard
library's sources, so that `kiln eval` can say in perplexity and KL divergence what a precision
costs (evaluate/README.md). The held-out files were never seen in training (`split.json` lists
them with their sha256; `heldout.txt` is their text).

- Architecture: `LlamaForCausalLM`, {config.num_hidden_layers} layers, hidden
  {config.hidden_size}, {config.num_attention_heads} query heads sharing
  {config.num_key_value_heads} KV heads (head dim {head_dim}), SwiGLU MLP
  {config.intermediate_size}, RMSNorm, RoPE, untied embeddings, fp32, {MAX_POSITIONS} positions.
- Tokenizer: byte-level BPE, {VOCAB_SIZE} tokens, trained on the training files; prepends
  `{BOS}`; `{EOS}` ends each file and pads.
- Corpus: Python {split["python"]} standard library, {split["train_files"]} training files
  ({n_train:,} tokens), {n_heldout} held-out files (rule: {SPLIT_RULE}).
- Training: {cfg.steps} steps of {cfg.batch} random windows of {cfg.seq_len} tokens
  ({seen:,} tokens, {seen / n_train:.2f} epochs), AdamW (lr {cfg.lr}, warmup
  {cfg.warmup_steps}, cosine to {cfg.min_lr}, weight decay {cfg.weight_decay}), seed {SEED},
  {cfg.threads} CPU threads, {result.elapsed_s / 60:.1f} min ({cfg.steps / result.elapsed_s:.2f}
  steps/s; load average {_load(result.load_start)} at the start, {_load(result.load_end)} at the
  end, on {os.cpu_count()} cores). Final training loss
  {result.train_loss:.3f}; held-out loss {result.heldout_loss:.3f} (perplexity
  {math.exp(result.heldout_loss):.2f}, non-overlapping {cfg.seq_len}-token windows of the first
  {HELDOUT_LOSS_TOKENS} held-out tokens).
- Made with torch {torch.__version__}, transformers {transformers.__version__},
  tokenizers {tokenizers.__version__}.

Retrain with `make eval-model` (`python -m kiln.models.train_eval --out models/eval-llama`);
with the same Python, library versions and thread count it reproduces the same weights.
"""


def main(argv: list[str] | None = None) -> None:
    """Split the corpus, train tokenizer and model, and save to `--out` with the split."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="model folder to (re)write")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    args = parser.parse_args(argv)
    setup_logging()
    transformers.utils.logging.disable_progress_bar()
    cfg = TrainConfig(steps=args.steps, threads=args.threads)

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(cfg.threads)  # float sums depend on the thread split

    root = stdlib_root()
    files = corpus_files(root)
    train_files = [f for f in files if not held_out(f)]
    heldout_files = [f for f in files if held_out(f)]
    texts = [read_text(root, f) for f in train_files]
    heldout = heldout_text(root, heldout_files)
    split: dict[str, object] = {
        "corpus": "python-stdlib",
        "python": ".".join(map(str, sys.version_info[:3])),
        "rule": SPLIT_RULE,
        "train_files": len(train_files),
        "heldout": [
            {"path": f, "sha256": hashlib.sha256((root / f).read_bytes()).hexdigest()}
            for f in heldout_files
        ],
        "heldout_text_sha256": hashlib.sha256(heldout.encode()).hexdigest(),
    }
    t0 = time.perf_counter()
    tok = train_tokenizer(texts)
    train_ids = token_stream(tok, texts)
    heldout_ids = torch.tensor(tok(heldout)["input_ids"], dtype=torch.long)
    log.info("tokenizer and corpus: %.0f s", time.perf_counter() - t0)

    model = LlamaForCausalLM(recipe.llama_config(tok, SHAPE))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("train eval-llama: %d parameters, vocab %d", n_params, len(tok))
    result = train(model, train_ids, heldout_ids, cfg)
    log.info(
        "done: %d steps, %.1f min, train loss %.3f, held-out loss %.3f (ppl %.2f)",
        result.steps,
        result.elapsed_s / 60,
        result.train_loss,
        result.heldout_loss,
        math.exp(result.heldout_loss),
    )
    split["training"] = {**asdict(cfg), **asdict(result), "params": n_params}
    extra = {
        "README.md": model_card(result, cfg, model.config, n_params, len(train_ids), split),
        "split.json": json.dumps(split, indent=2) + "\n",
        "heldout.txt": heldout,
    }
    recipe.save_atomic(model, tok, extra, args.out)
    log.info("saved → %s", args.out)


if __name__ == "__main__":
    main()

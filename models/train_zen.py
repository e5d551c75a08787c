"""Train the bundled model: a tiny Llama (GQA, RoPE, RMSNorm, SwiGLU) that memorises the Zen.

Run as `python -m kiln.models.train_zen --out models/zen-llama` (`make tiny-model`). It trains a
byte-level BPE tokenizer and a 4-layer Llama on BOS + `zen_text()` + EOS until greedy decoding
from BOS + `ZEN_PROMPT` reproduces the text and stops at EOS, with a logit margin big enough to
survive fp16 and engine builds. Then it saves the folder atomically. Seeded, single-threaded
and deterministic, so a rerun with the same library versions gives the same weights.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import tokenizers
import torch
import transformers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from kiln.log import setup_logging
from kiln.models import recipe
from kiln.models.recipe import BOS, EOS
from kiln.models.zen import ZEN_PROMPT, zen_text

# Not __name__: under `python -m` that is "__main__", outside the "kiln" logger tree.
log = logging.getLogger("kiln.models.train_zen")

SEED = 0
VOCAB_SIZE = 384
MAX_POSITIONS = 512
# 4 layers, 4 query heads sharing 2 KV heads (grouped-query attention).
SHAPE = recipe.LlamaShape(
    hidden=128, intermediate=352, layers=4, heads=4, kv_heads=2, max_positions=MAX_POSITIONS
)
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Each turn ends with EOS, so a chat reply stops where the generation config stops.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings and stopping rule; the defaults are what `make tiny-model` uses."""

    lr: float = 3e-3
    warmup_steps: int = 20
    max_steps: int = 2000
    check_every: int = 10
    log_every: int = 10
    # Smallest top-1 minus top-2 logit gap over the continuation. Greedy decoding only needs
    # > 0, but fp16 and TensorRT move logits by ~1e-2, so a near-tie would flip downstream.
    min_margin: float = 2.0


@dataclass(frozen=True)
class TrainResult:
    """What the training loop reached, for the log and the model card."""

    steps: int
    loss: float
    margin: float
    elapsed_s: float


def train_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `text`, with the chat tokens and template."""
    return recipe.train_tokenizer(
        [text], VOCAB_SIZE, MAX_POSITIONS, extra_special=CHAT_TOKENS, chat_template=CHAT_TEMPLATE
    )


def greedy_text(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, prompt: str) -> str:
    """Greedy-decode from BOS + `prompt` until EOS; return prompt and continuation as text."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        # transformers annotates generate's self as a Protocol (written for the `ty` checker)
        # that mypy does not match against its own model classes.
        out = model.generate(ids, do_sample=False, max_length=MAX_POSITIONS)  # type: ignore[misc]
    new: list[int] = out[0, ids.shape[1] :].tolist()
    eos = bool(new) and new[-1] == tok.eos_token_id
    text = tok.decode(new[:-1] if eos else new)
    assert isinstance(text, str), "one id list decodes to one string"
    return prompt + text + ("" if eos else " [no EOS]")


def _min_margin(logits_SV: torch.Tensor, targets_S: torch.Tensor) -> float:
    """Return min over positions of (target logit - best other logit); < 0 means a wrong argmax."""
    target = logits_SV.gather(1, targets_S[:, None])[:, 0]
    others = logits_SV.scatter(1, targets_S[:, None], float("-inf"))
    return (target - others.max(dim=1).values).min().item()


def train(
    model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, text: str, cfg: TrainConfig
) -> TrainResult:
    """Train on BOS + text + EOS until greedy decoding reproduces it with `cfg.min_margin`.

    The teacher-forced margin is one cheap forward pass; only once it clears the bar do we
    confirm with a real `generate()`, which also exercises the KV-cache path.
    """
    ids_S = torch.tensor([*tok(text)["input_ids"], tok.eos_token_id])
    first = len(tok(ZEN_PROMPT)["input_ids"]) - 1  # the logit that predicts the first new token
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / cfg.warmup_steps)
    )
    log.info("training on %d tokens, up to %d steps", len(ids_S), cfg.max_steps)
    start = time.perf_counter()
    loss, margin = float("nan"), float("nan")
    for step in range(1, cfg.max_steps + 1):
        model.train()
        opt.zero_grad(set_to_none=True)
        model(ids_S[None], labels=ids_S[None]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        warmup.step()
        if step % cfg.check_every:
            continue
        loss, margin = _evaluate(model, ids_S, first)
        if step % cfg.log_every == 0:
            log.info("  step %4d  loss %.5f  margin %+.2f", step, loss, margin)
        if margin >= cfg.min_margin and greedy_text(model, tok, ZEN_PROMPT) == text:
            return TrainResult(step, loss, margin, time.perf_counter() - start)
    raise RuntimeError(
        f"Greedy decoding did not reproduce the Zen with margin >= {cfg.min_margin} within "
        f"{cfg.max_steps} steps (loss {loss:.5f}, margin {margin:+.2f}); raise --max-steps."
    )


def _evaluate(model: LlamaForCausalLM, ids_S: torch.Tensor, first: int) -> tuple[float, float]:
    """Return (loss, min logit margin over the continuation) of the current weights."""
    model.eval()
    with torch.no_grad():
        out = model(ids_S[None], labels=ids_S[None])
    return out.loss.item(), _min_margin(out.logits[0, first:-1], ids_S[first + 1 :])


def model_card(result: TrainResult, n_params: int, n_tokens: int, tok_len: int) -> str:
    """Return the README.md that says what the model is and how to remake it."""
    return f"""---
library_name: transformers
pipeline_tag: text-generation
---
# zen-llama

kiln's bundled test model: a {n_params:,}-parameter Llama that has memorised the Zen of Python
(`import this`). Every kiln stage (ONNX export, fp16, TensorRT engine) checks that greedy
decoding from `{ZEN_PROMPT}` still reproduces the whole text and stops at EOS, so a
broken stage shows up as wrong text, not just as a logit tolerance.

- Architecture: `LlamaForCausalLM`, 4 layers, hidden 128, 4 query heads sharing 2 KV heads
  (grouped-query attention), SwiGLU MLP 352, RMSNorm, RoPE, untied embeddings, fp32.
- Tokenizer: byte-level BPE, {tok_len} tokens, trained on the same text; prepends `{BOS}`,
  `{EOS}` is EOS and padding, chat template in `chat_template.jinja`.
- Training: one sequence (BOS + text + EOS, {n_tokens} tokens), full-sequence next-token loss,
  AdamW, constant LR after warmup, seed {SEED}, one CPU thread, deterministic algorithms.
  Stopped at step {result.steps} (loss {result.loss:.5f}) once greedy decoding reproduced the text
  with the right token ahead of the runner-up by at least {result.margin:.2f} logits at every
  position (so fp16 rounding can't flip a greedy choice).
- Made with torch {torch.__version__}, transformers {transformers.__version__},
  tokenizers {tokenizers.__version__}.

Retrain with `make tiny-model` (`python -m kiln.models.train_zen --out models/zen-llama`);
with the same library versions it reproduces the same weights.
"""


def main(argv: list[str] | None = None) -> None:
    """Train the tokenizer and model, check greedy decoding, and save to `--out`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="model folder to (re)write")
    parser.add_argument("--max-steps", type=int, default=TrainConfig.max_steps)
    args = parser.parse_args(argv)
    setup_logging()
    transformers.utils.logging.disable_progress_bar()  # one shard; the bar is noise

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # float sums depend on the thread split; one thread is reproducible

    text = zen_text()
    tok = train_tokenizer(text)
    model = LlamaForCausalLM(recipe.llama_config(tok, SHAPE))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("train zen-llama: %d parameters, vocab %d", n_params, len(tok))
    result = train(model, tok, text, TrainConfig(max_steps=args.max_steps))
    log.info(
        "reproduced the Zen at step %d: loss %.5f, margin %.2f, %.1f s",
        result.steps,
        result.loss,
        result.margin,
        result.elapsed_s,
    )
    n_tokens = len(tok(text)["input_ids"]) + 1
    card = model_card(result, n_params, n_tokens, len(tok))
    recipe.save_atomic(model, tok, {"README.md": card}, args.out)
    log.info("saved → %s", args.out)


if __name__ == "__main__":
    main()

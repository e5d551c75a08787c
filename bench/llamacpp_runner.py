"""llama.cpp in the race: GGUF files from the bench's HF folder, and a greedy token-id loop.

The GGUF comes from llama.cpp's own converter (`convert_hf_to_gguf.py`, shipped in the
llama-cpp-python source distribution that `make bench-deps` unpacks into build/llamacpp) at F32,
then llama.cpp's quantizer (`llama_model_quantize`, the library call behind `llama-quantize`)
makes Q8_0 and Q4_0 with its default parameters. The converter insists on a tokenizer it
recognises; the race feeds token ids, so the conversion folder gets a Llama-style byte-fallback
tokenizer of the model's vocabulary size next to the same config and weights.

Settings (llama.cpp's documented best CPU settings): `n_threads` and `n_threads_batch` = the
race's thread count, which tools/completion/README.md ("Number of Threads") in the vendored
llama.cpp recommends setting to the number of physical cores; everything else at the defaults
of llama_context_default_params / llama_model_default_params, which are what `llama-bench`
measures by default (tools/llama-bench/README.md: flash attention auto, f16 KV cache, weight
repacking on, ubatch 512). Four sequences decode in one context: one `llama_batch` per step with
a token per sequence (seq ids 0..3), the way tools/batched-bench does it.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

QUANTS = {"F32": "LLAMA_FTYPE_ALL_F32", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
          "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}  # fmt: skip
DEPS_DIR = Path("build/llamacpp")


def converter(root: Path = DEPS_DIR) -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py from the unpacked llama-cpp-python sdist, if any."""
    found = sorted(root.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return found[-1] if found else None


def missing(*, library: bool = True) -> str | None:
    """Why the llama.cpp runners (or, library=False, only the converter) cannot run here."""
    try:
        if library:
            import llama_cpp  # noqa: F401
        import sentencepiece  # noqa: F401  (the converter's Llama vocabulary path imports it)
    except ImportError as e:
        return f"{e.name} is not installed (make bench-deps installs llama.cpp's Python deps)"
    if converter() is None:
        return f"no convert_hf_to_gguf.py under {DEPS_DIR} (make bench-deps unpacks it)"
    return None


def _byte_fallback_tokenizer(folder: Path, vocab_size: int) -> None:
    """A Llama-style tokenizer.json (BPE, byte fallback, no merges) with `vocab_size` tokens.

    gguf's LlamaHfVocab reads it without the pre-tokenizer hash check that `_set_vocab_gpt2`
    applies to other BPE tokenizers (which refuses any tokenizer it has not seen).
    """
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab |= {f"<0x{b:02X}>": len(specials) + b for b in range(256)}
    vocab |= {f"\u2581t{i}": i for i in range(len(vocab), vocab_size)}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, t in enumerate(specials)]  # fmt: skip
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>",
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TokenizersBackend", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>"}))  # fmt: skip


def build_gguf(
    hf_dir: Path, out: Path, quant: str, quantize_bin: Path | None = None
) -> tuple[Path | None, str]:
    """`out`/model-QUANT.gguf from the HF folder (F32 via the converter, then quantized).

    `quantize_bin`: llama.cpp's `llama-quantize` program instead of the Python library (the
    load test's llama-server build has one; default parameters either way).
    """
    if why := missing(library=quantize_bin is None):
        return None, why
    target = out / f"model-{quant}.gguf"
    if target.is_file():
        return target, "ok"
    out.mkdir(parents=True, exist_ok=True)
    f32 = out / "model-F32.gguf"
    if not f32.is_file():
        src = out / "hf-src"
        src.mkdir(exist_ok=True)
        for f in ("config.json", "model.safetensors"):
            if not (src / f).exists():
                (src / f).symlink_to((hf_dir / f).resolve())
        cfg = json.loads((hf_dir / "config.json").read_text())
        if cfg.get("model_type") != "llama":
            kind = cfg.get("model_type")
            return None, (f"the byte-fallback tokenizer path of convert_hf_to_gguf.py is "
                          f"Llama's; {kind} needs a tokenizer it recognises")  # fmt: skip
        _byte_fallback_tokenizer(src, cfg["vocab_size"])
        cmd = [sys.executable, str(converter()), str(src), "--outtype", "f32",
               "--outfile", str(f32)]  # fmt: skip
        # The converter imports the gguf-py copy beside it (newer than the gguf release on
        # PyPI, which lacks what this converter calls); the PyPI package brings its deps.
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not f32.is_file():
            last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:]
            return None, f"convert_hf_to_gguf.py failed: {last[0] if last else proc.returncode}"
    if quant != "F32" and quantize_bin is not None:
        proc = subprocess.run([str(quantize_bin), str(f32), str(target), quant],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if proc.returncode != 0 or not target.is_file():
            return None, f"llama-quantize to {quant} returned {proc.returncode}"
    elif quant != "F32":
        import llama_cpp as L

        params = L.llama_model_quantize_default_params()
        params.ftype = getattr(L, QUANTS[quant])
        params.nthread = os.cpu_count() or 1
        rc = L.llama_model_quantize(str(f32).encode(), str(target).encode(), ctypes.byref(params))
        if rc != 0 or not target.is_file():
            return None, f"llama_model_quantize to {quant} returned {rc}"
    return target, "ok"


class LlamaCppRun:
    """Greedy generation of exactly `new` tokens for a [B, S] id array, B sequences at once."""

    def __init__(self, gguf_path: Path, threads: int, max_batch: int, max_len: int) -> None:
        import llama_cpp as L

        self.L = L
        L.llama_log_set(_quiet, ctypes.c_void_p())
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(gguf_path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        cparams = L.llama_context_default_params()
        per_seq = -(-max_len // 256) * 256
        cparams.n_ctx = max_batch * per_seq
        cparams.n_batch = max(cparams.n_batch, cparams.n_ctx)
        cparams.n_seq_max = max_batch
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(cparams.n_batch, 0, max_batch)
        self.settings: dict[str, Any] = {
            "n_threads": threads,
            "n_threads_batch": threads,
            "n_ctx": cparams.n_ctx,
            "n_batch": cparams.n_batch,
            "n_ubatch": cparams.n_ubatch,
            "n_seq_max": cparams.n_seq_max,
            "flash_attn_type": cparams.flash_attn_type,
            "type_k": cparams.type_k,
            "kv_unified": bool(cparams.kv_unified),
            "use_extra_bufts (repack)": bool(mparams.use_extra_bufts),
            "system_info": L.llama_print_system_info().decode().strip(),
        }

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode over (token, position, sequence, wants logits) rows."""
        b = self.batch
        b.n_tokens = len(rows)
        for i, (tok, pos, seq, logits) in enumerate(rows):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        if (rc := self.L.llama_decode(self.ctx, b)) != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def __call__(self, ids: np.ndarray, new: int) -> list[int]:
        """Row 0's `new` greedy tokens; the cache starts empty every call."""
        L = self.L
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        n_seq, s = ids.shape
        self._decode([(int(ids[q, p]), p, q, p == s - 1) for q in range(n_seq) for p in range(s)])
        last = [self._argmax(q * s + s - 1) for q in range(n_seq)]
        out = [last[0]]
        for step in range(1, new):
            self._decode([(last[q], s + step - 1, q, True) for q in range(n_seq)])
            last = [self._argmax(q) for q in range(n_seq)]
            out.append(last[0])
        return out


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet(level: int, text: bytes, user_data: Any) -> None:
    """llama.cpp's log callback: drop everything below errors (level 4 = GGML_LOG_LEVEL_ERROR)."""
    if level == 4:
        sys.stderr.write(text.decode(errors="replace"))

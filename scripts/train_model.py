#!/usr/bin/env python
"""Train quantpress's bundled default model (and other small presets) from scratch on the CPU.

What it does, in order:

1. Reads the bundled training text: wikitext-2 *valid* (joined as the GPTQ paper's loader does)
   and tinyshakespeare. The last few percent of each is held out for validation. wikitext-2
   *test* is never trained on and never seen by the tokenizer: it is only evaluated at the end.
2. Trains a byte-level BPE tokenizer on the training part (so any UTF-8 text encodes without
   <unk>), and tokenizes the training text once.
3. Trains a Llama/Mistral-architecture model on random windows of max_position_embeddings tokens
   with AdamW, linear warmup + cosine decay and gradient clipping, in bf16 autocast.
4. Saves the model in bfloat16 with its tokenizer in Hugging Face format, reloads the saved folder
   and reports wikitext-2 test perplexity with quantpress's own evaluation protocol, next to the
   perplexity of a unigram model on the same tokens. Writes training_report.json and a model card.

Re-running with the defaults reproduces the bundled model:

    python scripts/train_model.py            # writes src/quantpress/assets/models/tiny-llama/
    python scripts/train_model.py --steps 20 --out /tmp/smoke   # quick end-to-end check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Set before `tokenizers` is imported: its Rust thread pool would otherwise compete with torch's.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from quantpress.datasets import load_text
from quantpress.evaluation import perplexity, token_windows

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_MODELS_DIR = REPO_ROOT / "src" / "quantpress" / "assets" / "models"

# -------------------------------------------------------------------------------------------------
# Presets. Every Linear's in/out features must be a multiple of 32: GPTQ packs 3-bit weights in
# groups of 32 values (3 x int32), so other sizes cannot be packed. Both presets satisfy it
# (q: hidden -> heads*head_dim, k/v: hidden -> kv_heads*head_dim, MLP: hidden <-> intermediate).
# -------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 — the Llama convention
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

PRESETS: dict[str, dict[str, Any]] = {
    # The bundled default: ~4.2M parameters, ~8 MB in bf16.
    "tiny-llama": {
        "architecture": "LlamaForCausalLM",
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention, as in Llama 2/3
        "vocab_size": 4096,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
    },
    # For benchmarks on a second architecture (not bundled): ~28.3M parameters, GQA 8/2 heads.
    # The vocabulary stays at 4096: the bundled training text is only ~640k tokens, too little
    # to fill a larger BPE vocabulary's embeddings.
    "small-mistral": {
        "architecture": "MistralForCausalLM",
        "model_type": "mistral",
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 4096,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
        "sliding_window": None,
    },
}

# Defaults = the settings the bundled tiny-llama was trained with (see its training_report.json).
DEFAULT_PRESET = "tiny-llama"
DEFAULT_STEPS = 500
DEFAULT_BATCH_SIZE = 16  # windows of max_position_embeddings tokens per step
DEFAULT_LR = 2e-3
DEFAULT_SEED = 1234
HOLDOUT_FRACTION = 0.05  # tail of each training source held out for validation
TRAINING_SOURCES = (
    "wikitext2",
    "tinyshakespeare",
)  # quantpress.datasets names, "calibration" split


def build_config(preset: dict[str, Any]) -> PretrainedConfig:
    settings = {k: v for k, v in preset.items() if k not in ("architecture", "model_type")}
    config = AutoConfig.for_model(
        preset["model_type"],
        **settings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=None,
        architectures=[preset["architecture"]],
    )
    for layer in ("hidden_size", "intermediate_size"):
        assert config.to_dict()[layer] % 32 == 0, f"{layer} must be a multiple of 32 for GPTQ"
    head_dim = config.hidden_size // config.num_attention_heads
    assert (config.num_key_value_heads * head_dim) % 32 == 0, (
        "k/v projection must be a multiple of 32"
    )
    return config


# -------------------------------------------------------------------------------------------------
# Data
# -------------------------------------------------------------------------------------------------


@dataclass
class Source:
    name: str
    train_text: str
    heldout_text: str


def split_tail(text: str, fraction: float) -> tuple[str, str]:
    """(head, tail) with the tail ≈ `fraction` of the text, cut at a line boundary."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - fraction))) + 1
    return text[:cut], text[cut:]


def load_sources() -> list[Source]:
    sources = []
    for name in TRAINING_SOURCES:
        train, heldout = split_tail(load_text(name, "calibration"), HOLDOUT_FRACTION)
        sources.append(Source(name, train, heldout))
    return sources


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style): every UTF-8 byte is in the base alphabet, so no <unk> ever."""
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: encoding must not change the text, so decode(encode(s)) == s.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # No post-processor: nothing (no BOS/EOS) is added around the text. The paper's perplexity
    # protocol tokenizes the whole test text and inserts no BOS, and so does the model's training.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [UNK_ID, BOS_ID, EOS_ID]
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out: Path, model_max_length: int) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    # Written by hand rather than by transformers' save_pretrained, whose class name
    # ("TokenizersBackend" in transformers 5) older transformers releases cannot load.
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",  # only for batching; the model never trains on padding
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # would turn " ." into "." and break round trips
        "model_max_length": model_max_length,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def encode(tokenizer: Tokenizer, text: str) -> Tensor:
    return torch.tensor(tokenizer.encode(text).ids, dtype=torch.long)


class WindowSampler:
    """Random windows of `seqlen` tokens from one long token stream, reproducible from `seed`."""

    def __init__(self, tokens: Tensor, seqlen: int, seed: int) -> None:
        self.tokens, self.seqlen = tokens, seqlen
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, batch_size: int) -> Tensor:
        starts = torch.randint(
            0, len(self.tokens) - self.seqlen + 1, (batch_size,), generator=self.generator
        )
        return torch.stack([self.tokens[s : s + self.seqlen] for s in starts.tolist()])


def unigram_perplexity(
    train_tokens: Tensor, test_tokens: Tensor, vocab_size: int, seqlen: int
) -> float:
    """Perplexity of an add-one-smoothed unigram model, on exactly the tokens `perplexity` scores.

    The paper's protocol scores positions 1..seqlen-1 of each window (position 0 has no context),
    so the same positions are scored here, weighted the same way, to keep the numbers comparable.
    """
    counts = torch.bincount(train_tokens, minlength=vocab_size).double()
    log_probs = torch.log((counts + 1) / (counts.sum() + vocab_size))
    predicted = token_windows(test_tokens, seqlen)[:, 1:]
    return math.exp(float(-log_probs[predicted].mean()))


# -------------------------------------------------------------------------------------------------
# Training
# -------------------------------------------------------------------------------------------------


def lr_at(step: int, total_steps: int, max_lr: float, warmup: int) -> float:
    """Linear warmup to max_lr, then cosine decay to max_lr / 10 (the nanoGPT/Chinchilla recipe)."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return max_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Decay matrices only: decaying norm gains (1-D) pulls them towards 0 and only hurts.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lm_loss(model: torch.nn.Module, batch: Tensor, bf16: bool) -> Tensor:
    """Mean next-token cross-entropy over a (B, T) batch."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch, use_cache=False).logits
    # Loss in fp32: bf16 log-softmax over 4096 classes loses visible precision.
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten())


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, windows: Tensor, bf16: bool, batch_size: int = 8) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        total += float(lm_loss(model, batch, bf16)) * len(batch)  # weight by windows in batch
    model.train()
    return total / len(windows)


def train(
    model: PreTrainedModel,
    sampler: WindowSampler,
    val_windows: Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    weight_decay: float,
    grad_clip: float,
    bf16: bool,
    log_every: int,
    eval_every: int,
) -> dict[str, Any]:
    optimizer = make_optimizer(model, lr, weight_decay)
    tokens_per_step = batch_size * sampler.seqlen
    history: list[dict[str, float]] = []
    model.train()
    start = last = time.perf_counter()
    running, running_n = 0.0, 0
    # Early-stopping safety net: the data is small (many passes over it), so keep the weights of
    # the best held-out loss seen, nanoGPT-style. With a well-sized run that is the last step.
    best: dict[str, Any] = {"val_loss": math.inf, "step": 0, "state": None}
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss = lm_loss(model, sampler.batch(batch_size), bf16)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        running, running_n = running + loss.item(), running_n + 1

        done = step + 1
        if done % log_every == 0 or done == steps:
            now = time.perf_counter()
            tokens_per_s = tokens_per_step * running_n / (now - last)
            line = (
                f"step {done:5d}/{steps} | loss {running / running_n:.4f}"
                f" | lr {lr_at(step, steps, lr, warmup):.2e} | grad {float(grad_norm):.2f}"
                f" | {tokens_per_s:,.0f} tok/s | elapsed {now - start:,.0f}s"
            )
            entry: dict[str, float] = {"step": done, "train_loss": running / running_n}
            if done % eval_every == 0 or done == steps:
                entry["val_loss"] = heldout_loss(model, val_windows, bf16)
                line += f" | val {entry['val_loss']:.4f}"
                if entry["val_loss"] < best["val_loss"]:
                    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    best = {"val_loss": entry["val_loss"], "step": done, "state": state}
            print(line, flush=True)
            history.append(entry)
            running, running_n, last = 0.0, 0, time.perf_counter()
    wall_time_s = time.perf_counter() - start
    if best["step"] != steps:
        print(
            f"restoring step {best['step']} (best held-out loss {best['val_loss']:.4f})", flush=True
        )
        model.load_state_dict(best["state"])
    return {"wall_time_s": wall_time_s, "history": history, "best_step": best["step"]}


# -------------------------------------------------------------------------------------------------
# Saving and reporting
# -------------------------------------------------------------------------------------------------


def save_model(model: PreTrainedModel, out: Path) -> None:
    model.to(torch.bfloat16)  # halves the folder; fp32 master weights are no longer needed
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID
    )
    model.save_pretrained(out)
    # transformers 5 writes "dtype" and "rope_parameters"; transformers 4.x reads "torch_dtype"
    # and a top-level "rope_theta". Write both spellings so every supported release agrees.
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("torch_dtype", "bfloat16")
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def evaluate_saved(folder: Path, sources: list[Source], train_tokens: Tensor) -> dict[str, float]:
    """Perplexities of the folder as shipped: bf16 weights, loaded in fp32, its own tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    seqlen = model.config.max_position_embeddings
    vocab_size = model.config.vocab_size

    def ids(text: str) -> Tensor:
        return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)

    test_ids = ids(load_text("wikitext2", "evaluation"))
    results = {
        "wikitext2_test_tokens": int(test_ids.numel()),
        "wikitext2_test_ppl": perplexity(model, test_ids, seqlen),
        "wikitext2_test_unigram_ppl": unigram_perplexity(
            train_tokens, test_ids, vocab_size, seqlen
        ),
    }
    for source in sources:
        heldout = ids(source.heldout_text)
        results[f"{source.name}_heldout_ppl"] = perplexity(model, heldout, seqlen)
        results[f"{source.name}_heldout_unigram_ppl"] = unigram_perplexity(
            train_tokens, heldout, vocab_size, seqlen
        )
    return results


def sample_text(folder: Path, prompt: str = "The", max_new_tokens: int = 48, seed: int = 0) -> str:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=40
    )
    return tokenizer.decode(output[0], skip_special_tokens=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def folder_size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6


MODEL_CARD = """\
---
license: cc-by-sa-3.0
library_name: transformers
pipeline_tag: text-generation
tags: [llama, tiny, quantpress]
---

# {name}

A very small Llama-architecture causal language model trained from scratch by
`scripts/train_model.py` in the quantpress repository. It is quantpress's bundled default model
for its README commands, tests and benchmarks: big enough to be a real language model (its
perplexity is far below a unigram model's), small enough ({size_mb:.1f} MB) to ship inside the
package. It is not useful for anything beyond testing tools.

## Architecture

`{architecture}`: {layers} layers, hidden size {hidden}, MLP size {intermediate}, {heads} attention
heads with {kv_heads} key/value heads (grouped-query attention), RoPE (theta {rope_theta:g}),
RMSNorm (eps {rms_norm_eps:g}), SiLU-gated MLP, tied input/output embeddings, context
{ctx} tokens, {params:,} parameters, stored in bfloat16.

Tokenizer: byte-level BPE with a {vocab}-token vocabulary, trained on the same training text
(`tokenizers` library). Special tokens `<unk>` (0), `<s>` (1, BOS), `</s>` (2, EOS). No BOS is
added automatically (the GPTQ paper's perplexity protocol inserts none); any UTF-8 text encodes
without `<unk>`.

## Training data and license

- WikiText-2 (v1) **validation** split, rows rejoined with blank lines as the GPTQ paper's loader
  does — Merity et al., "Pointer Sentinel Mixture Models" (2016), from Wikipedia,
  **CC BY-SA 3.0**.
- tinyshakespeare (Karpathy's char-rnn `input.txt`), Shakespeare's plays, **public domain**.

The last {holdout_pct:g}% of each source was held out for validation. WikiText-2 **test** was never
used for training or for fitting the tokenizer; it is used only for the evaluation below.

The weights are a derivative of CC BY-SA 3.0 text and are distributed under **CC BY-SA 3.0**
(attribution: the WikiText-2 authors and Wikipedia contributors).

## Training

```
{command}
```

{steps} steps of {batch_size} random windows of {ctx} tokens ({tokens_seen:,} tokens, about
{epochs:.1f} passes over the {train_tokens:,} training tokens), AdamW (betas 0.9/0.95, weight decay
{weight_decay:g}), peak learning rate {lr:g} with {warmup} warmup steps and cosine decay to a tenth,
gradient clipping at {grad_clip:g}, {precision} on {threads} CPU threads, seed {seed}.
Training wall time: {wall_min:.1f} min ({cpu}, shared machine). Final train loss {train_loss:.3f},
held-out validation loss {val_loss:.3f}.

## Evaluation

Perplexity of the saved bfloat16 weights loaded in float32, with quantpress's
`quantpress.evaluation.perplexity` (GPTQ paper protocol: whole text tokenized once,
non-overlapping windows of {ctx} tokens, no BOS):

| text | this model | unigram (add-one, training-token frequencies) |
|---|---|---|
| WikiText-2 test ({test_tokens:,} tokens) | **{test_ppl:.2f}** | {test_unigram:.2f} |
| WikiText-2 valid, held-out tail | {wiki_heldout:.2f} | {wiki_heldout_unigram:.2f} |
| tinyshakespeare, held-out tail | {shakes_heldout:.2f} | {shakes_heldout_unigram:.2f} |

Numbers and settings are also in `training_report.json`.
"""


# -------------------------------------------------------------------------------------------------
# Main
# -------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: src/quantpress/assets/models/<preset>)",
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument(
        "--warmup", type=int, default=None, help="warmup steps (default: 5%% of steps)"
    )
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    # bf16 autocast uses the CPU's AMX/AVX512-BF16 units; measured faster than fp32 here
    # (see training_report.json). fp16 is deliberately not offered: ~50x slower on this CPU.
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=40)
    return parser.parse_args(argv)


def prepare_out(out: Path) -> Path:
    """A fresh `<out>.partial` folder; the result is moved to `out` only once it is complete."""
    if out.exists() and any(out.iterdir()) and not (out / "training_report.json").exists():
        sys.exit(f"{out} exists and is not a folder written by this script; refusing to replace it")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    out: Path = args.out or BUNDLED_MODELS_DIR / args.preset
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    command = shlex.join(
        ["python", "scripts/train_model.py", *(sys.argv[1:] if argv is None else argv)]
    )
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    total_start = time.perf_counter()
    partial = prepare_out(out)

    # Data and tokenizer -------------------------------------------------------------------------
    sources = load_sources()
    tokenizer = train_tokenizer([s.train_text for s in sources], preset["vocab_size"])
    seqlen = preset["max_position_embeddings"]
    # One stream: sources joined with EOS, so a window that crosses the seam sees a document end.
    train_tokens = torch.cat(
        [torch.cat([encode(tokenizer, s.train_text), torch.tensor([EOS_ID])]) for s in sources]
    )
    val_windows = torch.cat(
        [token_windows(encode(tokenizer, s.heldout_text), seqlen) for s in sources]
    )
    tokens_seen = args.steps * args.batch_size * seqlen
    print(
        f"train tokens {len(train_tokens):,} | held-out windows {len(val_windows)} | "
        f"{tokens_seen:,} tokens to see ({tokens_seen / len(train_tokens):.1f} epochs)",
        flush=True,
    )

    # Model ----------------------------------------------------------------------------------------
    config = build_config(preset)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{preset['architecture']} {args.preset}: {n_params:,} parameters", flush=True)

    result = train(
        model,
        WindowSampler(train_tokens, seqlen, args.seed),
        val_windows,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        bf16=args.precision == "bf16",
        log_every=args.log_every,
        eval_every=args.eval_every,
    )
    final = next(h for h in result["history"] if h["step"] == result["best_step"])

    # Save, reload, evaluate ----------------------------------------------------------------------
    save_model(model, partial)
    save_tokenizer(tokenizer, partial, seqlen)
    print("evaluating the saved folder ...", flush=True)
    ppl = evaluate_saved(partial, sources, train_tokens)
    for key, value in ppl.items():
        print(f"  {key}: {value:,.2f}" if isinstance(value, float) else f"  {key}: {value:,}")
    sample = sample_text(partial)
    print(f"sample: {sample!r}", flush=True)

    report = {
        "preset": args.preset,
        "command": command,
        "architecture": preset["architecture"],
        "parameters": n_params,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seqlen": seqlen,
        "lr": args.lr,
        "warmup_steps": warmup,
        "weight_decay": args.weight_decay,
        "grad_clip": args.grad_clip,
        "precision": args.precision,
        "threads": args.threads,
        "seed": args.seed,
        "train_tokens": int(len(train_tokens)),
        "tokens_seen": tokens_seen,
        "training_wall_time_s": round(result["wall_time_s"], 1),
        "total_wall_time_s": round(time.perf_counter() - total_start, 1),
        "saved_step": result["best_step"],
        "final_train_loss": final["train_loss"],
        "final_val_loss": final["val_loss"],
        "perplexity": ppl,
        "sample_from_The": sample,
        "training_data": {
            "wikitext2": "wikitext-2 valid (CC BY-SA 3.0), last 5% held out",
            "tinyshakespeare": "tinyshakespeare input.txt (public domain), last 5% held out",
        },
        "environment": {
            "cpu": cpu_name(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "history": result["history"],
    }
    (partial / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    size_mb = folder_size_mb(partial)
    (partial / "README.md").write_text(
        MODEL_CARD.format(
            name=args.preset,
            size_mb=size_mb,
            architecture=preset["architecture"],
            layers=preset["num_hidden_layers"],
            hidden=preset["hidden_size"],
            intermediate=preset["intermediate_size"],
            heads=preset["num_attention_heads"],
            kv_heads=preset["num_key_value_heads"],
            rope_theta=preset["rope_theta"],
            rms_norm_eps=preset["rms_norm_eps"],
            ctx=seqlen,
            params=n_params,
            vocab=preset["vocab_size"],
            holdout_pct=HOLDOUT_FRACTION * 100,
            command=command,
            steps=args.steps,
            batch_size=args.batch_size,
            tokens_seen=tokens_seen,
            epochs=tokens_seen / len(train_tokens),
            train_tokens=len(train_tokens),
            weight_decay=args.weight_decay,
            lr=args.lr,
            warmup=warmup,
            grad_clip=args.grad_clip,
            precision="bf16 autocast" if args.precision == "bf16" else "fp32",
            threads=args.threads,
            seed=args.seed,
            wall_min=result["wall_time_s"] / 60,
            cpu=report["environment"]["cpu"],
            train_loss=final["train_loss"],
            val_loss=final["val_loss"],
            test_tokens=ppl["wikitext2_test_tokens"],
            test_ppl=ppl["wikitext2_test_ppl"],
            test_unigram=ppl["wikitext2_test_unigram_ppl"],
            wiki_heldout=ppl["wikitext2_heldout_ppl"],
            wiki_heldout_unigram=ppl["wikitext2_heldout_unigram_ppl"],
            shakes_heldout=ppl["tinyshakespeare_heldout_ppl"],
            shakes_heldout_unigram=ppl["tinyshakespeare_heldout_unigram_ppl"],
        )
    )

    # Swap the finished folder into place: `out` never holds a half-written model.
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    print(
        f"saved {out} ({folder_size_mb(out):.1f} MB) in {time.perf_counter() - total_start:,.0f}s"
    )


if __name__ == "__main__":
    main()

"""Deterministic tiny source models for the GPTQModel interop fixtures.

Runs in either venv (it needs only torch, transformers and tokenizers) and downloads nothing.

Why the weights are drawn here and not by `LlamaForCausalLM(config)`'s own init: the fixtures
must be reproducible from the seed alone, and transformers' `_init_weights` has changed between
releases. Drawing every tensor from one seeded `torch.Generator` in sorted-name order makes the
model a function of (spec, seed) only.

Dims: every Linear has in/out features that are multiples of 64, so group sizes 32 and 64 both
tile K exactly and the 3-bit packer (32 values per 3 words) applies along K and N.
The embeddings are tied to `lm_head` to halve what each fixture stores (GPTQ never quantizes
either); the quantized checkpoint therefore holds `model.embed_tokens.weight` once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 128
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


@dataclass(frozen=True)
class TinySpec:
    arch: str  # "llama" or "qwen2"
    hidden: int = 128
    intermediate: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = VOCAB_SIZE


TINY_LLAMA = TinySpec("llama")
TINY_QWEN2 = TinySpec("qwen2")  # q/k/v carry biases: exercises the GPTQ `.bias` tensors
SPECS = {
    "llama": TINY_LLAMA,
    "qwen2": TINY_QWEN2,
    "mistral": TinySpec("mistral"),  # sliding-window attention
    "qwen3": TinySpec("qwen3"),  # q/k RMSNorms inside attention
}


def _config(spec: TinySpec):  # -> transformers.PretrainedConfig
    common = dict(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        use_cache=False,
    )
    if spec.arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if spec.arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common, use_sliding_window=False)
    if spec.arch == "mistral":
        from transformers import MistralConfig

        return MistralConfig(**common, sliding_window=32)  # shorter than the 64-token windows
    if spec.arch == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**common, head_dim=spec.hidden // spec.heads)
    raise ValueError(f"unknown tiny arch {spec.arch!r}")


def _seeded_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter drawn from one generator, in sorted-name order (see module docstring).

    Scales keep activations O(1) so the logits are O(1): Linear weights ~ N(0, 1/in_features),
    norms ~ 1 + N(0, 0.1), biases ~ N(0, 0.1), embeddings ~ N(0, 0.25) (the tied lm_head then
    gives logits with std ~ 3, far from both 0 and fp16 range limits).
    A few input columns of each Linear are scaled up 4x so diag(H) and the per-group ranges
    vary, which makes act-order and asym pick visibly different groupings/zeros.
    """
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, param in sorted(model.state_dict().items()):
        if name == "lm_head.weight":
            continue  # tied to model.embed_tokens.weight
        shape = tuple(param.shape)
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if name.endswith("embed_tokens.weight"):
            value = 0.25 * noise
        elif name.endswith("norm.weight"):
            value = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            value = 0.1 * noise
        elif param.dim() == 2:
            value = noise / math.sqrt(shape[1])
            outliers = torch.randperm(shape[1], generator=gen)[: max(1, shape[1] // 16)]
            value[:, outliers] *= 4.0
        else:
            raise ValueError(f"tiny model has an unexpected parameter {name} {shape}")
        state[name] = value
    return state


def build_tiny_model(spec: TinySpec, seed: int = 0):  # -> transformers.PreTrainedModel
    """The seeded fp32 model, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = _config(spec)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(_seeded_state(model, seed), strict=False)
    # Only the tied lm_head may be absent from the drawn state.
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    model.tie_weights()
    return model.eval()


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A WordLevel tokenizer over "t4".."t127" plus specials, ids == vocab positions.

    GPTQModel's loader refuses a folder without a tokenizer (Tokenicer.load), and quantpress's
    loader returns one when present; neither needs it to do anything linguistic.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i in range(len(SPECIAL_TOKENS), VOCAB_SIZE):
        vocab[f"t{i}"] = i
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def save_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write the seeded model (fp32 safetensors) and its tokenizer as an HF folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_model(SPECS[arch], seed).save_pretrained(out, safe_serialization=True)
    build_tokenizer().save_pretrained(out)
    return out


def calibration_ids(n: int = 8, seqlen: int = 64, seed: int = 1) -> torch.Tensor:
    """[n, seqlen] int64 token windows, identical for every tool that calibrates on them.

    Ordinary tokens only (ids >= 4), so no tool treats a position as padding or BOS.
    """
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIAL_TOKENS), VOCAB_SIZE, (n, seqlen), generator=gen)


def eval_ids(n: int = 2, seqlen: int = 16, seed: int = 2) -> torch.Tensor:
    """[n, seqlen] int64 inputs whose logits the fixtures store (disjoint seed from calibration)."""
    return calibration_ids(n, seqlen, seed)


if __name__ == "__main__":
    import sys

    save_tiny_model(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "llama")

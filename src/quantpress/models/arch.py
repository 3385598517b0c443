"""Architecture knowledge as data: where the decoder layers are and which Linears GPTQ visits.

Every supported family shares Hugging Face's Llama layout (`model.embed_tokens`, `model.layers`,
`model.norm`, `lm_head`, rotary position embeddings computed once per forward). What differs
between families (biases on q/k/v in Qwen2, q/k norms in Qwen3, sliding windows in Mistral) is
handled by transformers' own modules, so one table entry serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantpress.errors import UnsupportedArchitecture


@dataclass(frozen=True)
class PreNormBlock:
    """One residual block of a decoder layer: x <- x + mixer(norm(x)), where the mixer's output is
    its last Linear applied to whatever that Linear reads (o_proj in attention, down_proj in the
    MLP). Knowing this lets the pipeline run each block once per stage instead of re-running the
    whole layer up to every group (see layerwise.quantize_layer_blockwise)."""

    norm: str  # e.g. "input_layernorm"
    mixer: str  # e.g. "self_attn"; called as mixer(hidden_states=..., **layer kwargs) or mixer(x)
    output_proj: str  # e.g. "self_attn.o_proj": mixer(h) == output_proj(its input)
    takes_layer_kwargs: bool  # attention needs the mask and position embeddings; the MLP does not


@dataclass(frozen=True)
class Architecture:
    layers: str  # dotted path of the ModuleList of decoder layers
    # Linears that read the SAME input tensor, in forward order. One Hessian serves a whole group
    # (q/k/v all see the normed hidden state), and under true-sequential quantization each group is
    # quantized before the next group's inputs are collected (q/k/v -> o -> gate/up -> down).
    input_groups: tuple[tuple[str, ...], ...]
    # The decoder layer as residual blocks, when it is exactly that (None: treat it as opaque).
    # Each block's groups are: the Linears reading norm(x), then (output_proj,).
    blocks: tuple[PreNormBlock, ...] | None = None

    @property
    def quantized_modules(self) -> tuple[str, ...]:
        return tuple(name for group in self.input_groups for name in group)


LLAMA_LIKE = Architecture(
    layers="model.layers",
    input_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    blocks=(
        PreNormBlock("input_layernorm", "self_attn", "self_attn.o_proj", takes_layer_kwargs=True),
        PreNormBlock("post_attention_layernorm", "mlp", "mlp.down_proj", takes_layer_kwargs=False),
    ),
)

# config.json "model_type" -> layout.
ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
}


def architecture_for(config: dict) -> Architecture:
    """The table entry for a config.json dict, or a clear error naming what is supported."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        declared = config.get("architectures") or ["?"]
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} ({declared[0]}) is not supported; supported: {supported}"
        )
    return ARCHITECTURES[model_type]

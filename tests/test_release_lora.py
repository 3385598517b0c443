"""`release(..., merge_lora=ADAPTER)`: the Guanaco recipe, merge then quantize, through the API."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import quantpress
from quantpress.api import bundled_model_dir
from quantpress.release.build import EvalSettings, release
from quantpress.release.recipe import parse_recipe

RECIPE = {
    "model": {"name": "Tiny Guanaco", "creator": "c", "original_model": "quantpress/tiny-llama",
              "prompt_template": "guanaco"},
    "variants": [{"main": True, "bits": 8, "group_size": -1, "act_order": True, "nsamples": 8, "seqlen": 128}],
}


def test_release_quantizes_the_merged_model(tmp_path):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(bundled_model_dir(), dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn_like(p) * 0.5
    peft_model.save_pretrained(tmp_path / "adapter")
    merged_q = peft_model.merge_and_unload().model.layers[0].self_attn.q_proj.weight.detach()
    original_q = AutoModelForCausalLM.from_pretrained(bundled_model_dir(), dtype=torch.float32) \
        .model.layers[0].self_attn.q_proj.weight.detach()

    report = release(bundled_model_dir(), tmp_path / "repo", parse_recipe(RECIPE, seqlen_default=512),
                     evaluation=EvalSettings(max_windows=1), merge_lora=tmp_path / "adapter")
    assert list(report.branches) == ["main"]
    loaded = quantpress.load(report.repo)  # the working tree shows main
    q = loaded.model.model.layers[0].self_attn.q_proj.quantized_weight().dequantize()
    # 8-bit per-row quantization of the merged weight: close to it, far from the un-merged base
    assert (q - merged_q).abs().max() < 0.05 * merged_q.abs().max()
    assert (q - original_q).abs().max() > 10 * (q - merged_q).abs().max()
    assert "### Human: {prompt}" in (report.repo / "README.md").read_text()

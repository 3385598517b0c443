"""The streaming safetensors writer and sharding, read back by the real safetensors library."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import quantpress
from peers.tiny_models import eval_ids
from quantpress import CalibrationConfig, QuantConfig
from quantpress.formats.hf_folder import TensorEntry, stream_safetensors, write_sharded

def entries_of(tensors):
    return [TensorEntry.of_tensor(n, t) for n, t in tensors.items()]


def test_streamed_file_reads_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(3, 5, generator=g).bfloat16(),
        "b.f32": torch.randn(7, generator=g),
        "c.i32": torch.randint(-2**31, 2**31 - 1, (4, 3), generator=g, dtype=torch.int64).int(),
        "d.f16": torch.randn(2, 2, generator=g).half(),
        "e.scalar_like": torch.tensor([42], dtype=torch.int64),
        "f.u8": torch.arange(5, dtype=torch.uint8),
    }
    path = tmp_path / "x.safetensors"
    stream_safetensors(path, entries_of(tensors), tensors.__getitem__, {"format": "pt", "k": "v"})
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}


def test_sharding_writes_an_index_and_every_tensor_once(tmp_path):
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    names = write_sharded(tmp_path, entries_of(tensors), tensors.__getitem__, max_shard_bytes=2048)
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    assert index["weight_map"] == {"t0": names[0], "t1": names[0], "t2": names[1], "t3": names[1], "t4": names[2]}


def test_sharded_checkpoint_loads_identically(tmp_path, tiny_llama, examples):
    quant, calib = QuantConfig(bits=4, group_size=32), CalibrationConfig(nsamples=8, seqlen=64)
    single = quantpress.quantize(tiny_llama, tmp_path / "one", quant, calib, examples=examples)
    sharded = quantpress.quantize(tiny_llama, tmp_path / "many", quant, calib, examples=examples, max_shard_bytes=40_000)
    assert len(list(sharded.out_dir.glob("model-*-of-*.safetensors"))) > 2
    assert (sharded.out_dir / "model.safetensors.index.json").exists()
    ids = eval_ids(2, 16)
    with torch.inference_mode():
        a = quantpress.load(single.out_dir).model(input_ids=ids).logits
        b = quantpress.load(sharded.out_dir).model(input_ids=ids).logits
    assert torch.equal(a, b)

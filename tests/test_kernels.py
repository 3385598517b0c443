"""The packed CPU runtime (runtime/kernels.py, qlinear.py, stored_dtype.py) against the exact
fp32 dequantized reference: every form, bit width, group size, sym/asym, act-order, odd shapes;
weights round-trip bit for bit; a loaded model holds no dense copy of any quantized Linear."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peers.tiny_models import TinySpec, build_tiny_model, build_tokenizer

import quantpress
from quantpress import QuantConfig
from quantpress.formats.gptq_tensors import CheckpointFormat, to_gptq_tensors
from quantpress.quant.qweight import QuantizedWeight
from quantpress.runtime import kernels
from quantpress.runtime.kernels import Int4Kernel, Int8Kernel, TiledKernel, int4_layout, pack_for_cpu
from quantpress.runtime.qlinear import QuantLinear
from quantpress.runtime.stored_dtype import StoredDtypeEmbedding, StoredDtypeLinear

needs_int4 = pytest.mark.skipif(int4_layout() is None, reason="torch's CPU int4 kernel layout is unknown here")


def random_weight(n: int, k: int, bits: int, group_size: int, *, sym: bool, act_order: bool,
                  seed: int = 0) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    gs = k if group_size == -1 else group_size
    groups = -(-k // gs)
    g_idx = torch.arange(k) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    maxq = 2**bits - 1
    zeros = (torch.full((groups, n), (maxq + 1) // 2) if sym
             else torch.randint(0, maxq + 1, (groups, n), generator=gen))
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.001).half()
    codes = torch.randint(0, maxq + 1, (n, k), generator=gen)
    return QuantizedWeight(codes.int(), scales, zeros.int(), g_idx.int(), bits)


def packed(qw: QuantizedWeight, group_size: int, fmt=CheckpointFormat.GPTQ_V2, **kw):
    return pack_for_cpu(to_gptq_tensors(qw, fmt), qw.bits, group_size, fmt, **kw)


def kernel_bound(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """|y - y_exact| allowed for the bf16 kernels: x, the scale and the offset each rounded to bf16
    (relative 2^-9) over the kernel's own terms (q - 8)·s and (8 - z)·s, plus the bf16 output."""
    g = qw.g_idx.long()
    s = qw.scales.float().t()[:, g]
    terms = ((qw.intweight - 8).abs() + (8 - qw.zeros.t()[:, g]).abs()).float() * s  # [N, K]
    exact = x.double() @ qw.dequantize().double().t()
    return 3 * 2**-9 * (x.abs().double() @ terms.double().t()) + 2**-8 * exact.abs() + 1e-6


CASES = [  # bits, group_size, (N, K), sym, act_order
    (4, 128, (96, 576), True, False),  # K = 4.5 groups: kernel groups of 64, narrower last group
    (4, 32, (64, 256), False, True),
    (4, -1, (96, 320), True, True),
    (3, 64, (160, 192), False, False),
    (2, 64, (96, 256), True, True),
    (4, 256, (32, 512), False, False),  # N below the AVX-512 block of 64 rows: padded
]


@needs_int4
@pytest.mark.parametrize("bits,group_size,shape,sym,act_order", CASES)
def test_int4_kernel_matches_the_exact_reference(bits, group_size, shape, sym, act_order):
    qw = random_weight(*shape, bits, group_size, sym=sym, act_order=act_order)
    kernel = packed(qw, group_size)
    assert isinstance(kernel, Int4Kernel)
    back = kernel.quantized_weight()  # the packed form loses nothing
    for field in ("intweight", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, field), getattr(qw, field)), field
    w = qw.dequantize()
    for rows in (1, 5, 300):  # decode rows take the kernel, 300 fp32 rows the exact dequant path
        x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows))
        y = kernel(x)
        assert y.shape == (rows, shape[0]) and y.dtype == torch.float32
        if rows >= kernels.DENSE_MIN_ROWS[torch.float32]:
            assert torch.equal(y, torch.nn.functional.linear(x, w))
        else:
            err = (y.double() - x.double() @ w.double().t()).abs()
            assert (err <= kernel_bound(x, qw)).all(), err.max()
            assert err.max() > 0  # really the bf16 kernel, not a silent dense fallback


@needs_int4
def test_exact_mode_and_bf16_activations():
    qw = random_weight(128, 256, 4, 64, sym=True, act_order=True)
    w = qw.dequantize()
    x = torch.randn(3, 256)
    assert torch.equal(packed(qw, 64, exact=True)(x), torch.nn.functional.linear(x, w))
    kernel = packed(qw, 64)
    xb = x.bfloat16()
    for rows in (3, 200):  # bf16 rows: the kernel, then a bf16 dequantized GEMM
        xs = xb.repeat(rows // 3 + 1, 1)[:rows]
        y = kernel(xs)
        assert y.dtype == torch.bfloat16
        ref = xs.double() @ w.double().t()
        assert ((y.double() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.parametrize("sym", [True, False])
def test_int8_per_channel_kernel(sym):
    qw = random_weight(96, 320, 8, -1, sym=sym, act_order=True)
    kernel = packed(qw, -1)
    assert isinstance(kernel, Int8Kernel)
    assert torch.equal(kernel.quantized_weight().dequantize(), qw.dequantize())
    w = qw.dequantize().double()
    x = torch.randn(4, 320)
    ref = x.double() @ w.t()
    rel = ((kernel(x).double() - ref).norm() / ref.norm()).item()
    assert 0 < rel < 1e-2
    x = torch.randn(300, 320)
    assert torch.equal(kernel(x), torch.nn.functional.linear(x, qw.dequantize()))


@pytest.mark.parametrize("bits,group_size,fmt", [(8, 64, CheckpointFormat.GPTQ), (4, 48, CheckpointFormat.GPTQ_V2),
                                                 (3, 48, CheckpointFormat.GPTQ_V2)])
def test_tiled_kernel_is_exact_at_any_row_count(monkeypatch, bits, group_size, fmt):
    qw = random_weight(96, 192, bits, group_size, sym=True, act_order=False)
    kernel = packed(qw, group_size, fmt)
    assert isinstance(kernel, TiledKernel)
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 32 * 192)  # three tiles of 32 output columns
    w = qw.dequantize()
    for rows in (1, 300):
        x = torch.randn(rows, 192)
        torch.testing.assert_close(kernel(x), torch.nn.functional.linear(x, w), rtol=1e-6, atol=1e-6)
    assert torch.equal(kernel.quantized_weight().dequantize(), w)


@needs_int4
def test_int4_tiles_agree_with_one_tile(monkeypatch):
    qw = random_weight(320, 256, 4, 128, sym=False, act_order=True)
    kernel = packed(qw, 128)
    x = torch.randn(300, 256)
    whole = kernel(x)
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 64 * 256)
    torch.testing.assert_close(kernel(x), whole, rtol=1e-6, atol=1e-6)


def test_an_unknown_int4_layout_falls_back_to_exact_tiles(monkeypatch):
    monkeypatch.setattr(kernels, "int4_layout", lambda: None)
    qw = random_weight(64, 128, 4, 32, sym=True, act_order=False)
    kernel = packed(qw, 32)
    assert isinstance(kernel, TiledKernel)
    x = torch.randn(2, 128)
    torch.testing.assert_close(kernel(x), torch.nn.functional.linear(x, qw.dequantize()), rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    """A 26M-parameter Llama in fp16 (a dense fp32 copy of its Linears would be 100 MiB) and its
    4-bit RTN quantization."""
    root = tmp_path_factory.mktemp("mid")
    spec = TinySpec("llama", hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=8)
    build_tiny_model(spec).half().save_pretrained(root / "fp", safe_serialization=True)
    build_tokenizer().save_pretrained(root / "fp")
    out = root / "q4"
    quantpress.quantize(root / "fp", out, QuantConfig(bits=4, group_size=128, method="rtn"), None)
    return root / "fp", out


def test_a_loaded_model_holds_no_dense_copy(mid_model):
    _, out = mid_model
    loaded = quantpress.load(out)
    model = loaded.model
    with torch.inference_mode():
        model(input_ids=torch.randint(4, 128, (1, 64)))  # prefill and a decode step
        model(input_ids=torch.randint(4, 128, (1, 1)))
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 8 * 7 and all(m.packed for m in linears)
    for m in linears:
        floats = [t for t in list(m.buffers()) + list(m.parameters()) if t.is_floating_point()]
        assert max(t.numel() for t in floats) < m.in_features * m.out_features // 16, m
        assert not hasattr(m, "qweight")  # the checkpoint copy is gone once packed
    assert isinstance(model.get_input_embeddings(), StoredDtypeEmbedding)
    assert isinstance(model.get_output_embeddings(), StoredDtypeLinear)
    assert model.get_input_embeddings().weight.dtype == torch.float16  # as stored, not fp32
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_resident_memory_is_the_packed_size(mid_model, tmp_path):
    """In a fresh process: RSS after load + prefill + decode grows by at most the file size plus
    the bounded temporaries, well below the dense copy (100 MiB) the old runtime kept."""
    fp, out = mid_model
    script = textwrap.dedent(f"""
        import json, resource, torch, quantpress
        def rss():  # current resident set, MiB
            return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
        torch.set_num_threads(1)
        warm = quantpress.load({str(fp)!r}, dtype=torch.float16)  # imports and one-time setup
        del warm
        before = rss()
        model = quantpress.load({str(out)!r}).model
        with torch.inference_mode():
            model(input_ids=torch.randint(4, 128, (1, 64)))
            model(input_ids=torch.randint(4, 128, (1, 1)))
        print(json.dumps({{"grew": rss() - before}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    grew = json.loads(result.stdout.strip().splitlines()[-1])["grew"]
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    assert grew <= on_disk + 40, (grew, on_disk)


def test_kernel_path_logits_stay_close_to_exact(mid_model):
    _, out = mid_model
    fast, exact = quantpress.load(out), quantpress.load(out, exact=True)
    ids = torch.randint(4, 128, (1, 24))
    with torch.inference_mode():
        a, b = fast.model(input_ids=ids).logits, exact.model(input_ids=ids).logits
    assert not torch.equal(a, b)  # the fast path really ran the bf16 kernels
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75  # a random model has near ties

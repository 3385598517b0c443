"""Where the packed runtime's two paths cross: the int4 decode kernel against exact tile
dequantization + dense GEMM, per row count M and activation dtype, on SmolLM2's and the 168M
Llama's Linear shapes (runtime/kernels.py, DENSE_MIN_ROWS); and what 2-bit costs on the tiled
path it would take without the 4-bit kernel.

    python bench/kernels.py [--threads 1] [--section kernels-crossover]

Times are the median of repeated calls on one random 4-bit g128 sym weight per shape, in this
process (no peers), so they compare paths side by side rather than across runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine, table, write_section

from quantpress.formats.gptq_tensors import CheckpointFormat, to_gptq_tensors
from quantpress.quant.qweight import QuantizedWeight
from quantpress.runtime.kernels import Int4Kernel, TiledKernel, pack_for_cpu, tile_rows, tiled_linear

SHAPES = {"SmolLM2 gate/up 576->1536": (1536, 576), "SmolLM2 down 1536->576": (576, 1536),
          "168M gate/up 1024->2816": (2816, 1024), "168M down 2816->1024": (1024, 2816)}
ROWS = (1, 4, 16, 32, 64, 128, 256, 512)


def weight(n: int, k: int, bits: int) -> QuantizedWeight:
    g = torch.Generator().manual_seed(0)
    groups = -(-k // 128)
    return QuantizedWeight(torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.int32),
                           (torch.rand(groups, n, generator=g) * 0.01 + 1e-3).half(),
                           torch.full((groups, n), 2 ** (bits - 1), dtype=torch.int32),
                           (torch.arange(k) // 128).int(), bits)


def ms(fn, repeats: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def crossover_rows(kernel: Int4Kernel, dtype: torch.dtype) -> list[str]:
    cells = []
    for m in ROWS:
        x = torch.randn(m, kernel.k).to(dtype)
        packed = ms(lambda: torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), kernel.packed, kernel.kernel_gs,
                                                               kernel.scale_offsets))
        dense = ms(lambda: tiled_linear(x, kernel.n_pad, tile_rows(kernel.k, 64), kernel.dequantized))
        cells.append(f"{packed:.2f} / {dense:.2f}" + (" ←" if dense < packed else ""))
    return cells


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--section")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for label, (n, k) in SHAPES.items():
        kernel = pack_for_cpu(to_gptq_tensors(weight(n, k, 4), CheckpointFormat.GPTQ), 4, 128, CheckpointFormat.GPTQ)
        for dtype in (torch.float32, torch.bfloat16):
            rows.append([label, str(dtype).removeprefix("torch."), *crossover_rows(kernel, dtype)])
    two_bit = []
    for label, (n, k) in SHAPES.items():
        qw = weight(n, k, 2)
        tensors = to_gptq_tensors(qw, CheckpointFormat.GPTQ)
        int4 = pack_for_cpu(tensors, 2, 128, CheckpointFormat.GPTQ)
        tiled = TiledKernel(tensors, 2, CheckpointFormat.GPTQ)
        x = torch.randn(1, k)
        two_bit.append([label, f"{ms(lambda: int4(x)):.3f}", f"{ms(lambda: tiled(x)):.3f}"])
    text = (f"Int4 kernel ms / exact dequant + GEMM ms per call, M rows ({args.threads} thread(s); ← where "
            "the dense path is faster):\n\n"
            + table(["shape", "activations", *(f"M={m}" for m in ROWS)], rows)
            + "\n\n2-bit, one decode row: the 4-bit kernel (codes held at 4 bits) vs the tiled path on the"
            " 2-bit file layout, ms per call:\n\n"
            + table(["shape", "int4 kernel", "tiled dequant"], two_bit)
            + f"\n\n{machine()}\n\n`{command_line()}`\n")
    print(text)
    if args.section:
        write_section(args.section, text)


if __name__ == "__main__":
    main()

"""The Hessian GEMM (H += X^T X, X holding bf16 values, fp32 result) at IEEE fp32 and with oneDNN's
process-wide `fp32_precision = "bf16"` flag, which quantpress no longer sets (issue 11 #13): what
the thread-safe choice costs on this CPU.

    python bench/hessian_gemm.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine, table


def rate(X: torch.Tensor, precision: str, repeats: int = 10) -> float:
    torch.backends.mkldnn.matmul.fp32_precision = precision
    try:
        H = torch.zeros(X.shape[1], X.shape[1])
        H.addmm_(X.t(), X)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            H.addmm_(X.t(), X, alpha=0.1)
        seconds = (time.perf_counter() - start) / repeats
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = "none"
    return 2 * X.shape[0] * X.shape[1] ** 2 / seconds / 1e9


def main() -> None:
    rows = []
    for K in (576, 1536, 4096):
        X = torch.randn(4096, K).bfloat16().float()
        ieee, bf16 = rate(X, "ieee"), rate(X, "bf16")
        rows.append([f"4096 × {K}", f"{ieee:.0f}", f"{bf16:.0f}", f"{bf16 / ieee:.2f}×"])
    print(f"`{command_line()}`\n\n{machine()}\n")
    print(table(["X", "IEEE fp32 GFLOP/s", "bf16 units GFLOP/s (process-wide flag)", "ratio"], rows))


if __name__ == "__main__":
    main()

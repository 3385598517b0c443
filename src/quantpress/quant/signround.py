"""SignRound (Cheng et al. 2023, arXiv:2309.05516, the algorithm behind AutoRound) as pure tensor math.

GPTQ solves each Linear against its own inputs; SignRound tunes a whole decoder layer at once
against what the full-precision model would output there. For every Linear W [N, K] of the layer
it learns, by signed gradient descent on the layer's output error

    loss = mean (layer_q(X_q) - target)^2,  target = layer_fp(X_q) or layer_fp(X_fp)

    V     [N, K] in [-0.5, 0.5]  an offset added before rounding: whether each weight rounds up or down
    alpha [N, G] in [ALPHA_MIN, 1]  a shrink of each group's range (its max; sym: the whole range)
    beta  [N, G] in [ALPHA_MIN, 1]  the same for the group's min (asym only)

where X_q are the activations entering the layer from the already quantized layers and X_fp those
of the full-precision model. With layer_fp(X_fp) (AutoRound's target, QuantConfig.signround_target
"model", the default) each layer also tries to undo the drift the earlier ones left; with
layer_fp(X_q) ("layer") it only minimises its own error, jointly over its Linears and through its
nonlinearities, where GPTQ treats each Linear alone (on the bundled model at 2 bits that never beat
GPTQ's start: from a GPTQ solution, the first sign steps flip levels GPTQ had compensated for, and
the layer's own error rises before it falls). All of it runs in fp32.
round() passes gradients straight through. The step is lr * sign(grad), lr decaying linearly to 0
over the iterations: every parameter moves at most ~lr * iters / 2 = 0.5 in total, so V can flip
each weight to the neighbouring level at most (AutoRound's defaults: 200 iterations, lr 1/200).

Unlike AutoRound we start from a solved point rather than from round-to-nearest: `init` gives each
weight's integer level and its group's scale (GPTQ's result). V0 = level - round(W / s), integer
offsets from W's nearest level, makes round(W / s + V0 + V) reproduce init exactly at V = 0, and
alpha starts at s / s_minmax. Measured on SmolLM2-135M layer 11 (100 steps, output MSE): 2-bit g64
GPTQ 224.8 -> 2.81 from GPTQ's start, 9.09 from AutoRound's round-to-nearest start; 4-bit g128
1.68 -> 0.287. (Rounding GPTQ's error-compensated weights instead of W, so that V flips GPTQ's own
marginal decisions, did worse: 5.83 and 0.530.) The final parameters are kept only if their loss
on all windows is below the start's: SignRound never returns something worse, on its calibration
data, than it was given (on the bundled model's first layer at 3 bits it cannot improve GPTQ).
AutoRound keeps the parameters of the lowest mini-batch loss instead; with few windows per batch
that compares batches more than parameters.

Nothing here touches modules, hooks or files: `layer_fn(weights, x)` runs the layer with the given
weights (the pipeline builds it with torch.func.functional_call).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from quantpress.quant.quantizer import FP16_TINY, max_level
from quantpress.quant.qweight import QuantizedWeight

ALPHA_MIN = 0.2  # the range search's own floor (find_params: maxshrink 0.8)

LayerFn = Callable[[dict[str, Tensor], Tensor], Tensor]  # (weights by name, x [B, T, h]) -> [B, T, h]


@dataclass(frozen=True)
class SignRoundSettings:
    iters: int = 200
    lr: float = 0.0  # 0: 1 / iters, AutoRound's default
    batch_size: int = 8  # windows per step
    seed: int = 0  # which windows each step sees


def _round_ste(x: Tensor) -> Tensor:
    """Round half up, gradient 1. Half up rather than torch.round's half to even, so that
    rounding commutes with adding the integer offsets V0 (exactly reproducing the start)."""
    return x + (torch.floor(x + 0.5) - x).detach()


def _fp16_ste(scale: Tensor) -> Tensor:
    """The scale as the checkpoint stores it (fp16, at least its smallest subnormal), gradient 1."""
    return scale + (scale.detach().half().float().clamp_min(FP16_TINY) - scale).detach()


class RoundingState:
    """The learnable rounding of one Linear weight W [N, K] with groups of `group_size` columns.

    Group ranges come from zero-padded [N, G, gs] views: the grid always contains 0, so padding
    with zeros changes no group's min or max (a last, narrower group is handled for free).
    """

    def __init__(self, W: Tensor, init: QuantizedWeight, group_size: int, sym: bool) -> None:
        N, K = W.shape
        self.bits, self.sym, self.maxq = init.bits, sym, max_level(init.bits)
        self.gs = group_size if group_size != -1 else K
        self.W = W.detach().float()
        G = -(-K // self.gs)
        padded = F.pad(self.W, (0, G * self.gs - K)).view(N, G, self.gs)
        hi, lo = padded.amax(-1).clamp_min(0), padded.amin(-1).clamp_max(0)  # [N, G]
        if sym:  # as find_params: symmetric around 0, rows with no negative value keep lo = 0
            hi = torch.maximum(lo.abs(), hi)
            lo = torch.where(lo < 0, -hi, lo)
        empty = (hi == 0) & (lo == 0)
        self.hi, self.lo = hi.masked_fill(empty, 1.0), lo.masked_fill(empty, -1.0)
        self.col_group = torch.arange(K, device=W.device) // self.gs  # [K]
        if not torch.equal(init.g_idx.long(), self.col_group):
            raise ValueError("SignRound refines weights with contiguous groups (g_idx == k // group_size)")

        # start at init's grid: alpha = s / s_minmax, as far as the clamp allows
        s_init = init.scales.float().t()  # [N, G]
        self.alpha = (s_init / ((self.hi - self.lo) / self.maxq)).clamp(ALPHA_MIN, 1.0).requires_grad_()
        self.beta = self.alpha.detach().clone().requires_grad_()  # used for asym only
        self.V = torch.zeros_like(self.W, requires_grad=True)
        scale, _ = self._grid()
        level = (init.intweight - init.zeros.t()[:, self.col_group]).float()  # q - z, what init stores
        self.V0 = level - torch.floor(self.W / scale.detach()[:, self.col_group] + 0.5)  # integers

    def params(self) -> list[Tensor]:
        return [self.V, self.alpha] if self.sym else [self.V, self.alpha, self.beta]

    def _grid(self) -> tuple[Tensor, Tensor]:
        """(scale, zero), both [N, G] fp32; differentiable in alpha/beta through the scale."""
        beta = self.alpha if self.sym else self.beta
        scale = _fp16_ste((self.alpha * self.hi - beta * self.lo) / self.maxq)
        if self.sym:
            zero = torch.full_like(scale, float((self.maxq + 1) // 2))
        else:
            zero = _round_ste(-beta * self.lo / scale).clamp(0, self.maxq)
        return scale, zero

    def fake(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(fake [N, K], q [N, K], scale [N, G], zero [N, G]): fake = scale * (q - zero), q integer-valued."""
        scale, zero = self._grid()
        s, z = scale[:, self.col_group], zero[:, self.col_group]
        q = (_round_ste(self.W / s + self.V0 + self.V) + z).clamp(0, self.maxq)
        return s * (q - z), q, scale, zero

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for p in self.params():
            p.sub_(lr * p.grad.sign())
            p.grad = None
        self.V.clamp_(-0.5, 0.5)
        self.alpha.clamp_(ALPHA_MIN, 1.0)
        self.beta.clamp_(ALPHA_MIN, 1.0)

    def snapshot(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.params()]

    @torch.no_grad()
    def restore(self, values: list[Tensor]) -> None:
        for p, v in zip(self.params(), values):
            p.copy_(v)

    @torch.no_grad()
    def weight(self) -> QuantizedWeight:
        """The current rounding as a checkpoint weight; dequantize() equals fake() bit for bit."""
        _, q, scale, zero = self.fake()
        K = self.W.shape[1]
        return QuantizedWeight(intweight=q.to(torch.int32), scales=scale.t().half().contiguous(),
                               zeros=zero.t().to(torch.int32).contiguous(),
                               g_idx=(torch.arange(K, device=q.device) // self.gs).to(torch.int32), bits=self.bits)


def _weights(states: dict[str, RoundingState]) -> dict[str, Tensor]:
    return {name: st.fake()[0] for name, st in states.items()}


def _layer_loss(layer_fn: LayerFn, weights: dict[str, Tensor], x: Tensor, d: Tensor,
                reduction: str = "mean") -> Tensor:
    """Squared error of what the layer adds to its input, layer(x) - x, against d: the same as
    comparing outputs, but the residual stream is subtracted in fp32 rather than rounded into a
    bf16 output, where it would bury the quantization error (layer outputs are O(|x|), their
    quantization error orders of magnitude smaller)."""
    x = x.float()
    return F.mse_loss(layer_fn(weights, x) - x, d.float(), reduction=reduction)


@torch.no_grad()
def _full_loss(layer_fn: LayerFn, states: dict[str, RoundingState], X: Tensor, D: Tensor, batch_size: int) -> float:
    weights = _weights(states)  # once for all batches
    total = sum(_layer_loss(layer_fn, weights, x, d, "sum").item()
                for x, d in zip(X.split(batch_size), D.split(batch_size)))
    return total / D.numel()


def signround(layer_fn: LayerFn, states: dict[str, RoundingState], X: Tensor, D: Tensor,
              settings: SignRoundSettings) -> tuple[float, float]:
    """Tune `states` in place so that layer_fn(their weights, X) - X approaches D (X, D [n, T, hidden],
    any float dtype; `layer_fn` computes in fp32). Returns (start, end): the mean squared error over
    all windows before and after; end <= start always (otherwise the start is restored)."""
    lr0 = settings.lr or 1.0 / settings.iters
    generator = torch.Generator().manual_seed(settings.seed)
    start_values = {name: st.snapshot() for name, st in states.items()}
    start = _full_loss(layer_fn, states, X, D, settings.batch_size)
    for it in range(settings.iters):
        rows = torch.randperm(len(X), generator=generator)[: settings.batch_size].to(X.device)
        with torch.enable_grad():
            _layer_loss(layer_fn, _weights(states), X[rows], D[rows]).backward()
        lr = lr0 * (1 - it / settings.iters)  # linear decay to 0: the last steps only fine-tune
        for st in states.values():
            st.step(lr)
    end = _full_loss(layer_fn, states, X, D, settings.batch_size)
    if end >= start:
        for name, st in states.items():
            st.restore(start_values[name])
        end = start
    return start, end

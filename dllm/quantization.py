"""FP8 (E4M3) weights for inference: vLLM's `--quantization fp8` scheme, applied at load time.

At batch 1 a decode step reads every weight once and does little arithmetic with it, so its time is
the weights' bytes over the memory bandwidth (README, "One decode step at LLaDA-8B's shape"). One
byte per weight instead of two halves what the block projections read. Each projection keeps its
weight in E4M3 with one scale per output row (per channel, from the row's largest magnitude), and
quantises its input per token at run time (dynamic: one scale per row of activations, computed on
the device, so CUDA graphs replay it); `torch._scaled_mm` multiplies the two and applies both
scales. The embedding, the norms and the LM head stay in the model's dtype (as vLLM keeps lm_head).

The checkpoint on disk stays bf16: quantisation happens when the engine is built
(`Engine(quantization="fp8")`), so the same checkpoint serves either way. On a GPU, FP8 matmuls
need compute capability 8.9 or more (Ada, Hopper); on a CPU they run (slowly) for tests.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

QUANTIZATIONS = ("fp8",)
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# Block projections quantised, by attribute name (LLaDA's checkpoint names)
QUANTIZED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


class Fp8Weight(NamedTuple):
    """An FP8 matrix as the block functions take it: tensors only, so one compiled function serves
    every layer (a module argument would be guarded on, and recompiled, per layer)."""

    weight: torch.Tensor  # [out, in] float8_e4m3fn
    scale: torch.Tensor  # [1, out] float32: row i of the real matrix is weight[i] * scale[0, i]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [m, k] -> (E4M3 [m, k], float32 scales [m, 1]) with x ~ q * scale, each row's largest magnitude
    mapped to E4M3's largest value (448). An all-zero row keeps scale ~0 and quantises to zeros."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ (weight * scale)^T in x's dtype, x quantised per token on the fly."""
    rows = x.reshape(-1, x.shape[-1])
    q, x_scale = quantize_rows(rows)
    out = torch._scaled_mm(q, weight.t(), scale_a=x_scale, scale_b=scale, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class Fp8Linear(nn.Module):
    """A bias-free nn.Linear with its weight in E4M3 and a per-output-row scale (buffers: nothing to train)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Fp8Linear takes bias-free linears (LLaDA's have no bias)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            weight, scale = quantize_rows(linear.weight)
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale.t().contiguous())  # [1, out], as _scaled_mm's scale_b

    @property
    def packed(self) -> Fp8Weight:
        return Fp8Weight(self.weight, self.scale)

    def dequantized(self) -> torch.Tensor:
        """The matrix this layer multiplies by, in float32."""
        return self.weight.float() * self.scale.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.scale)

    def _apply(self, fn, recurse: bool = True):
        # Module.to(dtype) casts every floating buffer, E4M3 included: keep the weight in E4M3 and the
        # scales in float32 (the dtypes _scaled_mm takes), and let device moves through.
        weight, scale = self.weight, self.scale
        super()._apply(fn, recurse)
        if self.weight.dtype != FP8:
            self.weight = weight.to(self.weight.device)
        if self.scale.dtype != torch.float32:
            self.scale = scale.to(self.scale.device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=float8_e4m3fn"


def check_fp8_device(device: torch.device) -> None:
    """FP8 matmuls run on CPUs and on CUDA GPUs of compute capability >= 8.9; refuse others clearly."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"quantization='fp8' needs a GPU of compute capability >= 8.9 (Ada, Hopper); "
                             f"{torch.cuda.get_device_name(device)} is {major}.{minor}")
    elif device.type != "cpu":
        raise ValueError(f"quantization='fp8' runs on CUDA GPUs (capability >= 8.9) and CPUs, not {device.type}")


def quantize_fp8(model: nn.Module) -> int:
    """Replace every block projection of a LLaDA model with an Fp8Linear, in place; returns the
    bytes the weights shrank by. Fused projections (fuse_projections) are undone first: each
    matrix is quantised with its own scales."""
    blocks = model.model.transformer["blocks"]
    before = _weight_bytes(model)
    for block in blocks:
        block._fused = None  # the fused matrices hold the bf16 weights: drop them with the Linears
        for name in QUANTIZED_PROJECTIONS:
            linear = getattr(block, name)
            if isinstance(linear, Fp8Linear):
                continue
            if linear.in_features % 16 or linear.out_features % 16:
                raise ValueError(f"quantization='fp8' needs projection sizes divisible by 16 (FP8 matmul tiles); "
                                 f"{name} is {linear.out_features} x {linear.in_features}")
            setattr(block, name, Fp8Linear(linear))
    return before - _weight_bytes(model)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Fp8Linear) for m in model.modules())


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])

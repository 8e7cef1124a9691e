"""SEANet: the causal convolutional encoder (audio -> 25 Hz latents) and decoder (latents -> audio) of Mimi.

Every layer runs in two modes with identical results:
- one-shot (`state=None`): left padding of `kernel - stride` (the causal context), plus, like transformers' Mimi,
  right zero padding so that a partial last window is still computed (`ceil(T / stride)` outputs);
- streaming (`state` from `init_state`): the left context is the tail of the previous chunk, kept in a fixed-size
  buffer that is updated in place (so a step can be captured in a CUDA graph). Chunks must be multiples of the stride.

Module indices (`layers.N`, `block.1/3`) follow the published checkpoints, which count the ELUs as layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MimiConfig


@dataclass
class ConvState:
    prev: Tensor  # [B, C_in, kernel - stride]: the input tail the next chunk's first windows need
    first: Tensor | None  # [B] bool, replicate padding only: the first chunk pads with its own first sample


@dataclass
class ConvTrState:
    partial: Tensor  # [B, C_out, kernel - stride]: overlap-add tail of the last chunk, bias excluded


class CausalConv1d(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, dilation: int = 1, groups: int = 1,
                 bias: bool = True, pad_mode: str = "constant"):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride, dilation=dilation, groups=groups, bias=bias)
        self.stride = stride
        self.context = (kernel - 1) * dilation + 1 - stride  # left padding = samples of the past each window needs
        self.pad_mode = pad_mode

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> ConvState:
        prev = torch.zeros(batch, self.conv.in_channels, self.context, device=device, dtype=dtype)
        first = torch.ones(batch, dtype=torch.bool, device=device) if self.pad_mode == "replicate" else None
        return ConvState(prev, first)

    def forward(self, x: Tensor, state: ConvState | None = None) -> Tensor:
        if state is None:
            extra = -x.shape[-1] % self.stride  # complete the last window (transformers/encodec semantics)
            return self.conv(F.pad(x, (self.context, extra), mode=self.pad_mode))
        if x.shape[-1] % self.stride:
            raise ValueError(f"streaming chunk of {x.shape[-1]} steps is not a multiple of the stride {self.stride}")
        if self.context:
            prev = state.prev
            if state.first is not None:  # replicate padding: before the first chunk, the past is its first sample
                prev = torch.where(state.first[:, None, None], x[..., :1].expand_as(prev), prev)
                state.first.zero_()
            x = torch.cat([prev, x], dim=-1)
            state.prev.copy_(x[..., -self.context:])
        return self.conv(x)


GEMM_MAX_STEPS = 16  # CPU inputs up to this many steps use `_gemm` (streaming chunks); longer ones the conv kernel


class CausalConvTranspose1d(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1, bias: bool = True):
        super().__init__()
        self.conv = nn.ConvTranspose1d(c_in, c_out, kernel, stride, groups=groups, bias=bias)
        self.overlap = kernel - stride  # output samples that the next input step also contributes to

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> ConvTrState:
        return ConvTrState(torch.zeros(batch, self.conv.out_channels, self.overlap, device=device, dtype=dtype))

    def forward(self, x: Tensor, state: ConvTrState | None = None) -> Tensor:
        y = self._gemm(x) if x.device.type == "cpu" and x.shape[-1] <= GEMM_MAX_STEPS else self.conv(x)
        if not self.overlap:
            return y
        if state is None:  # causal: all the padding is trimmed on the right (trim_right_ratio = 1)
            return y[..., : -self.overlap]
        y[..., : self.overlap] += state.partial
        tail = y[..., -self.overlap:]
        if self.conv.bias is not None:  # the next chunk adds its own bias to these samples
            tail = tail - self.conv.bias[:, None]
        state.partial.copy_(tail)
        return y[..., : -self.overlap]

    def _gemm(self, x: Tensor) -> Tensor:
        """conv_transpose1d as one (grouped) matmul plus overlap-add. PyTorch's CPU kernel takes a slow path for short
        inputs (~90 ms for one frame through the 1024->512 layer); this is the same sum, ~10x faster there."""
        w, (stride,), groups = self.conv.weight, self.conv.stride, self.conv.groups
        (B, c_in, T), (_, c_out_g, K) = x.shape, w.shape
        if K % stride:
            return self.conv(x)
        m, c_out = K // stride, c_out_g * groups
        cols = torch.einsum("bgit,gio->btgo", x.reshape(B, groups, c_in // groups, T), w.view(groups, c_in // groups, -1))
        cols = cols.reshape(B, T, c_out, m, stride).permute(0, 2, 3, 1, 4)  # [B, c_out, m, T, stride]
        y = x.new_zeros(B, c_out, (T + m - 1) * stride)
        for j in range(m):  # input step t writes kernel taps [j*stride, (j+1)*stride) to output (t + j)*stride + ...
            y[..., j * stride : (j + T) * stride] += cols[:, :, j].reshape(B, c_out, T * stride)
        return y if self.conv.bias is None else y + self.conv.bias[:, None]


class ResBlock(nn.Module):
    """ELU -> dilated conv (dim -> dim/compress) -> ELU -> 1x1 conv (-> dim), plus identity skip."""

    def __init__(self, cfg: MimiConfig, dim: int, dilation: int):
        super().__init__()
        hidden = dim // cfg.compress
        self.block = nn.ModuleList([
            nn.ELU(), CausalConv1d(dim, hidden, cfg.residual_kernel_size, dilation=dilation),
            nn.ELU(), CausalConv1d(hidden, dim, 1),
        ])

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> list:
        return [None, self.block[1].init_state(batch, device, dtype), None, self.block[3].init_state(batch, device, dtype)]

    def forward(self, x: Tensor, state: list | None = None) -> Tensor:
        h = x
        for i, layer in enumerate(self.block):
            h = layer(h) if isinstance(layer, nn.ELU) else layer(h, None if state is None else state[i])
        return x + h


class _Stack(nn.Module):
    layers: nn.ModuleList

    def init_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> list:
        return [None if isinstance(m, nn.ELU) else m.init_state(batch, device, dtype) for m in self.layers]

    def forward(self, x: Tensor, state: list | None = None) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if isinstance(layer, nn.ELU) else layer(x, None if state is None else state[i])
        return x


class SEANetEncoder(_Stack):
    """[B, channels, T] audio -> [B, dim, T / hop_length]."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        layers: list[nn.Module] = [CausalConv1d(cfg.channels, cfg.num_filters, cfg.kernel_size)]
        width = cfg.num_filters
        for ratio in reversed(cfg.ratios):
            layers += [ResBlock(cfg, width, cfg.dilation_base**j) for j in range(cfg.num_residual_layers)]
            layers += [nn.ELU(), CausalConv1d(width, 2 * width, 2 * ratio, stride=ratio)]
            width *= 2
        layers += [nn.ELU(), CausalConv1d(width, cfg.dim, cfg.last_kernel_size)]
        self.layers = nn.ModuleList(layers)


class SEANetDecoder(_Stack):
    """[B, dim, S] latents -> [B, channels, S * hop_length] audio."""

    def __init__(self, cfg: MimiConfig):
        super().__init__()
        width = cfg.num_filters * 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [CausalConv1d(cfg.dim, width, cfg.kernel_size)]
        for ratio in cfg.ratios:
            layers += [nn.ELU(), CausalConvTranspose1d(width, width // 2, 2 * ratio, ratio)]
            width //= 2
            layers += [ResBlock(cfg, width, cfg.dilation_base**j) for j in range(cfg.num_residual_layers)]
        layers += [nn.ELU(), CausalConv1d(width, cfg.channels, cfg.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

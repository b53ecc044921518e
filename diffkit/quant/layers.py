"""Quantised Conv2d / Linear layers (simulated: integer weights and affine-quantised inputs, float arithmetic), and
Q-Diffusion's shortcut split.

A ``QuantizedLayer`` stores what a deployment stores: integer weights (int8 tensors, any bit width up to 8),
per-output-channel weight scales, the bias, and one affine input range. Its forward dequantises both and runs
the float op, so its output equals what an integer kernel with float rescaling produces up to rounding of the
accumulation.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .scales import affine_params, fake_quantize_affine, quantize_symmetric, weight_scales


class QuantizedLayer(nn.Module):
    """A Conv2d or Linear with ``weight_bits``-bit weights and ``act_bits``-bit inputs (``None``: float inputs)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, weight_bits: int, act_bits: int | None):
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"only Conv2d and Linear layers are quantised, got {type(layer).__name__}")
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            raise ValueError(f"padding_mode {layer.padding_mode!r} is not supported (only 'zeros')")
        self.kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        if self.kind == "conv":
            self.conv_args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        self.weight_bits, self.act_bits = weight_bits, act_bits
        shape = layer.weight.shape
        self.register_buffer("weight_int", torch.zeros(shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(shape[0]))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("input_zero_point", torch.zeros(()))
        self.bias = None if layer.bias is None else nn.Parameter(torch.zeros_like(layer.bias, device="cpu"))
        self.quantize_input = act_bits is not None  # also off while the input ranges are being observed

    @classmethod
    def from_float(cls, layer: nn.Conv2d | nn.Linear, weight_bits: int, act_bits: int | None, method: str = "lp"):
        """Quantise a float layer's weights now; the input range is set later by ``set_input_range``."""
        quantized = cls(layer, weight_bits, act_bits)
        scale = weight_scales(layer.weight, weight_bits, method)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        quantized.weight_int.copy_(quantize_symmetric(layer.weight.detach().float(), scale.view(shape), weight_bits))
        quantized.weight_scale.copy_(scale)
        if layer.bias is not None:
            quantized.bias.data.copy_(layer.bias.detach())
        return quantized

    def set_input_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        scale, zero_point = affine_params(low, high, self.act_bits)
        self.input_scale.copy_(scale)
        self.input_zero_point.copy_(zero_point)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight."""
        shape = (-1,) + (1,) * (self.weight_int.dim() - 1)
        return self.weight_int.float() * self.weight_scale.view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_input:
            x = fake_quantize_affine(x, self.input_scale, self.input_zero_point, self.act_bits)
        weight = self.weight.to(x.dtype)
        if self.kind == "conv":
            return F.conv2d(x, weight, self.bias, **self.conv_args)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.kind}, {tuple(self.weight_int.shape)}, W{self.weight_bits}A{self.act_bits or 'float'}"


class SplitShortcut(nn.Module):
    """conv(cat[h, skip]) computed as conv_h(h) + conv_skip(skip), so each half gets its own quantisation ranges.

    In a UNet decoder the 1x1 shortcut of a ResNet block sees the raw concatenation of deep features h and the
    encoder skip; their ranges differ, and one shared range wastes levels on both (Q-Diffusion, Sec. 3.3).
    """

    def __init__(self, conv: nn.Conv2d, split: int):
        super().__init__()
        if not 0 < split < conv.in_channels or conv.groups != 1:
            raise ValueError(f"cannot split a conv with {conv.in_channels} inputs (groups {conv.groups}) at {split}")
        self.split = split
        kwargs = dict(kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                      device=conv.weight.device, dtype=conv.weight.dtype)
        self.hidden = nn.Conv2d(split, conv.out_channels, bias=conv.bias is not None, **kwargs)
        self.skip = nn.Conv2d(conv.in_channels - split, conv.out_channels, bias=False, **kwargs)
        with torch.no_grad():
            self.hidden.weight.copy_(conv.weight[:, :split])
            self.skip.weight.copy_(conv.weight[:, split:])
            if conv.bias is not None:
                self.hidden.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(x[:, : self.split]) + self.skip(x[:, self.split :])

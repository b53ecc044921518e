"""Quantised Conv2d / Linear layers (simulated: integer weights and affine-quantised inputs, float arithmetic), and
Q-Diffusion's shortcut split.

A ``QuantizedLayer`` stores what a deployment stores: integer weights (int8, or two 4-bit values per byte),
per-output-channel weight scales, the bias, and one affine input range. Its forward dequantises both and runs
the float op, so its output equals what an integer kernel with float rescaling produces up to rounding of the
accumulation.
"""

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers torch.ops.quantized_decomposed
import torch.nn.functional as F
from torch import nn

from .scales import affine_params, fake_quantize_affine, quantize_symmetric, weight_scales


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit integers (int8 tensor, values in [-8, 7]) as bytes, two per byte (low nibble first)."""
    flat = (q.flatten().to(torch.int16) & 0xF).to(torch.uint8)
    if len(flat) % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of ``pack_nibbles``: an int8 tensor of ``shape``."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).flatten().to(torch.int8)
    nibbles = torch.where(nibbles >= 8, nibbles - 16, nibbles)  # sign-extend
    return nibbles[: torch.Size(shape).numel()].reshape(shape)


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
        self.weight_shape = shape = layer.weight.shape
        # 4-bit (or narrower) weights are stored two per byte; wider ones as int8
        self.packed = weight_bits <= 4
        size = (shape.numel() + 1) // 2 if self.packed else shape
        self.register_buffer("weight_int", torch.zeros(size, dtype=torch.uint8 if self.packed else torch.int8))
        self.register_buffer("weight_scale", torch.ones(shape[0]))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("input_zero_point", torch.zeros(()))
        self.bias = None if layer.bias is None else nn.Parameter(torch.zeros_like(layer.bias, device="cpu"))
        self.quantize_input = act_bits is not None  # also off while the input ranges are being observed
        self.int8_graph = None  # (input scale, zero point, top level) as Python numbers, see use_int8_graph

    @classmethod
    def from_float(cls, layer: nn.Conv2d | nn.Linear, weight_bits: int, act_bits: int | None, method: str = "lp"):
        """Quantise a float layer's weights now; the input range is set later by ``set_input_range``."""
        quantized = cls(layer, weight_bits, act_bits)
        scale = weight_scales(layer.weight, weight_bits, method)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        integers = quantize_symmetric(layer.weight.detach().float(), scale.view(shape), weight_bits).to(torch.int8)
        quantized.weight_int.copy_(pack_nibbles(integers) if quantized.packed else integers)
        quantized.weight_scale.copy_(scale)
        if layer.bias is not None:
            quantized.bias.data.copy_(layer.bias.detach())
        return quantized

    def set_input_range(self, low: torch.Tensor, high: torch.Tensor) -> None:
        scale, zero_point = affine_params(low, high, self.act_bits)
        self.input_scale.copy_(scale)
        self.input_zero_point.copy_(zero_point)

    def weight_integers(self) -> torch.Tensor:
        """The integer weights as an int8 tensor of the weight's shape."""
        return unpack_nibbles(self.weight_int, self.weight_shape) if self.packed else self.weight_int

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight."""
        shape = (-1,) + (1,) * (len(self.weight_shape) - 1)
        return self.weight_integers().float() * self.weight_scale.view(shape)

    def use_int8_graph(self, enabled: bool = True, reduce_range: bool = False) -> None:
        """Express the layer as quantize / dequantize ops around a float op: the pattern that torch.compile's x86
        backend (inductor with freezing, as after PyTorch 2 Export quantisation) lowers to oneDNN int8 kernels.

        Needs 8-bit inputs (weights of any width up to 8 run in int8). ``reduce_range`` re-spreads the same input
        range over 7 bits: x86 CPUs without VNNI multiply uint8 x int8 pairs into saturating int16 sums, which
        full-range inputs overflow (PyTorch's x86 default qconfig reduces the range for the same reason).
        """
        if not enabled:
            self.int8_graph = None
            return
        if self.act_bits not in (8, None):
            raise ValueError(f"the int8 backend needs 8-bit inputs, this layer has {self.act_bits}")
        top = 127 if reduce_range else 255
        low = -self.input_zero_point * self.input_scale
        high = (255 - self.input_zero_point) * self.input_scale
        scale, zero_point = affine_params(low, high, 7 if reduce_range else 8)
        self.int8_graph = (scale.item(), int(zero_point.item()), top)

    def _int8_graph_forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        if self.quantize_input:
            scale, zero_point, top = self.int8_graph
            x = ops.dequantize_per_tensor(ops.quantize_per_tensor(x, scale, zero_point, 0, top, torch.uint8),
                                          scale, zero_point, 0, top, torch.uint8)
        zeros = torch.zeros_like(self.weight_scale, dtype=torch.int64)
        weight = ops.dequantize_per_channel(self.weight_integers(), self.weight_scale, zeros, 0, -128, 127, torch.int8)
        if self.kind == "conv":
            return F.conv2d(x, weight, self.bias, **self.conv_args)
        return F.linear(x, weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8_graph is not None:
            return self._int8_graph_forward(x)
        if self.quantize_input:
            x = fake_quantize_affine(x, self.input_scale, self.input_zero_point, self.act_bits)
        weight = self.weight.to(x.dtype)
        if self.kind == "conv":
            return F.conv2d(x, weight, self.bias, **self.conv_args)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.kind}, {tuple(self.weight_shape)}, W{self.weight_bits}A{self.act_bits or 'float'}"


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

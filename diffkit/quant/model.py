"""Post-training quantisation of a diffusers UNet (PTQ4DM, Shang et al. CVPR 2023; Q-Diffusion's shortcut split).

``quantize_model`` copies the network, splits the decoder shortcuts, quantises every Conv2d/Linear weight per
output channel (the first and last layers at 8 bits), then runs the calibration set through it and sets one
input range per layer. The result is a ``QuantizedModel``: a diffusers model component that saves integer
weights and ranges as safetensors plus a JSON recipe, and loads back through ``from_pretrained``.
"""

import copy

import diffusers
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .calibration import CalibrationSet, build_calibration_set
from .layers import QuantizedLayer, SplitShortcut
from .scales import METHODS, activation_range


BIT_WIDTHS = {"w8a8": (8, 8), "w4a8": (4, 8)}
EIGHT_BIT_LAYERS = ("conv_in", "conv_out")  # PTQ4DM keeps the first and last layers' weights at 8 bits
# The network input x_t stays float: PTQ4DM quantises layer outputs, never the image, and an epsilon-model
# amplifies an input error by 1 / sigma_t at small t (quantising it costs ~20 dB of output SQNR here).
FLOAT_INPUT_LAYERS = ("conv_in",)
SAMPLES_PER_LAYER = 2**16  # observed input values kept per layer for the range search


def find_shortcut_splits(model: nn.Module, *example_args, **example_kwargs) -> dict[str, int]:
    """{name of a decoder ResNet's conv_shortcut: channels of h in its cat[h, skip] input}, found by one forward.

    A decoder block concatenates the running features h with one encoder skip before each ResNet; h has the
    block input's channels for the first ResNet and the previous ResNet's output channels after that.
    """
    splits, hooks = {}, []

    def on_up_block(name, block):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            for i, resnet in enumerate(block.resnets):
                if getattr(resnet, "conv_shortcut", None) is not None:
                    h = hidden.shape[1] if i == 0 else block.resnets[i - 1].out_channels
                    splits[f"{name}.resnets.{i}.conv_shortcut"] = h

        return hook

    for name, block in model.named_modules():
        if name.startswith("up_blocks.") and name.count(".") == 1 and hasattr(block, "resnets"):
            hooks.append(block.register_forward_pre_hook(on_up_block(name, block), with_kwargs=True))
    try:
        with torch.no_grad():
            model(*example_args, **example_kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return splits


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _structure(model: nn.Module, recipe: dict) -> nn.Module:
    """Apply a recipe's splits and quantised-layer slots to a float model, in place (weights untouched)."""
    for name, split in recipe["splits"].items():
        _replace(model, name, SplitShortcut(model.get_submodule(name), split))
    for name, (weight_bits, act_bits) in recipe["layers"].items():
        _replace(model, name, QuantizedLayer(model.get_submodule(name), weight_bits, act_bits))
    return model


class QuantizedModel(ModelMixin, ConfigMixin):
    """A diffusers model (``base_class`` with ``base_config``) with quantised layers as given by ``recipe``.

    Calls go straight to the wrapped model, and ``config`` is the wrapped model's, so a pipeline uses it
    exactly as it used the float UNet.
    """

    @register_to_config
    def __init__(self, base_class: str = "UNet2DModel", base_config: dict | None = None, recipe: dict | None = None):
        super().__init__()
        model_class = getattr(diffusers, base_class, None)
        if model_class is None or base_config is None or recipe is None:
            raise ValueError(f"QuantizedModel needs a diffusers model class (got {base_class!r}), its config and a recipe")
        self.model = _structure(model_class.from_config(base_config), recipe)
        self._int8 = None  # the compiled int8 model, see use_int8_kernels

    @property
    def config(self):  # noqa: D102 - the wrapped model's, so pipelines read sample_size etc. as before
        return self.model.config

    @property
    def recipe(self) -> dict:
        return self._internal_dict["recipe"]

    def forward(self, *args, **kwargs):
        if self._int8 is not None:
            from torch._inductor import config

            with config.patch(freezing=True):  # weights become constants: what lets inductor prepack int8 kernels
                return self._int8(*args, **kwargs)
        return self.model(*args, **kwargs)

    def use_int8_kernels(self, enabled: bool = True, reduce_range: bool | None = None) -> "QuantizedModel":
        """Run on oneDNN int8 kernels (x86 CPU) instead of the float simulation: the quantised layers become
        quantize / dequantize ops and the model is compiled by torch.compile (inductor, freezing), which fuses
        them into int8 convolutions and matmuls. The first call compiles (minutes on a small CPU).

        ``reduce_range`` (default: when the CPU lacks VNNI) spreads inputs over 7 bits, see
        ``QuantizedLayer.use_int8_graph``. Inference only (under ``torch.no_grad``).
        """
        if reduce_range is None:
            reduce_range = not getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
        for module in self.model.modules():
            if isinstance(module, QuantizedLayer):
                module.use_int8_graph(enabled, reduce_range)
        # kept out of the module tree, so state_dict and save_pretrained see each weight once
        self.__dict__["_int8"] = torch.compile(self.model) if enabled else None
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)  # e.g. class_embedding, for the Denoiser's hooks


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    calibration: CalibrationSet,
    bits: str = "w8a8",
    method: str = "lp",
    split_shortcuts: bool = True,
    batch_size: int = 128,
    samples_per_layer: int = SAMPLES_PER_LAYER,
    generator: torch.Generator | None = None,
) -> QuantizedModel:
    """Quantise a copy of a diffusers UNet on a calibration set; the original is left as it is.

    ``bits``: "w8a8" or "w4a8"; ``method``: "absmax", "percentile" or "lp" (PTQ4DM's p = 2.4 search)
    for both weight and activation ranges, activation ranges from ``samples_per_layer`` observed input values.
    """
    if bits not in BIT_WIDTHS:
        raise ValueError(f"bits must be one of {sorted(BIT_WIDTHS)}, got {bits!r}")
    if method not in METHODS:
        raise ValueError(f"range method must be one of {METHODS}, got {method!r}")
    if not isinstance(calibration, CalibrationSet) or len(calibration) == 0:
        raise ValueError("calibration must be a non-empty CalibrationSet (see build_calibration_set)")
    weight_bits, act_bits = BIT_WIDTHS[bits]
    generator = generator or torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    work = copy.deepcopy(model).float().eval()
    first = next(calibration.batches(1))
    example = (first[0].to(device), first[1].to(device))
    splits = find_shortcut_splits(work, *example, **{k: v.to(device) for k, v in first[2].items()}) if split_shortcuts else {}
    for name, split in splits.items():
        _replace(work, name, SplitShortcut(work.get_submodule(name), split))

    # weights: quantised once, per output channel
    layers = {}
    for name, module in list(work.named_modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            layer_bits = (8 if name in EIGHT_BIT_LAYERS else weight_bits, None if name in FLOAT_INPUT_LAYERS else act_bits)
            _replace(work, name, QuantizedLayer.from_float(module, *layer_bits, method))
            layers[name] = layer_bits
    quantized = {name: work.get_submodule(name) for name, (_, bits) in layers.items() if bits is not None}

    # activations: observe every layer's input over the calibration set (weights already quantised), keeping
    # a uniform random subset of values per layer, then choose each range
    observed = {name: [] for name in quantized}
    per_batch = -(-samples_per_layer // -(-len(calibration) // batch_size))  # ceil(total / number of batches)

    def observe(name):
        def hook(module, args):
            values = args[0].detach().flatten()
            keep = torch.randperm(len(values), generator=generator)[:per_batch]
            observed[name].append(values[keep.to(values.device)].float().cpu())

        return hook

    hooks = [layer.register_forward_pre_hook(observe(name)) for name, layer in quantized.items()]
    for layer in quantized.values():
        layer.quantize_input = False
    try:
        for sample, timestep, cond in calibration.batches(batch_size):
            work(sample.to(device), timestep.to(device), **{k: v.to(device) for k, v in cond.items()}, return_dict=False)
    finally:
        for hook in hooks:
            hook.remove()
    for name, layer in quantized.items():
        layer.set_input_range(*activation_range(torch.cat(observed[name]), act_bits, method))
        layer.quantize_input = True

    recipe = {"bits": bits, "act_bits": act_bits, "method": method, "splits": splits, "layers": layers}
    result = QuantizedModel(type(model).__name__, dict(model.config), recipe)
    result.model.load_state_dict(work.state_dict())
    return result.to(device).eval()


def quantize_pipeline(pipe, bits: str = "w8a8", calibration: str = "ndtc", n: int = 1024, method: str = "lp",
                      split_shortcuts: bool = True, generator: torch.Generator | None = None, **calibration_kwargs):
    """Quantise ``pipe.unet`` in place (PTQ4DM) and return the pipeline.

    The calibration set is built by running the pipeline itself (``calibration``: "ndtc", "uniform" or "naive";
    ``n`` rows; ``calibration_kwargs`` go to ``build_calibration_set``, e.g. ``num_inference_steps`` or
    ``prompt``). The recipe, with the calibration settings, is saved with the model.
    """
    if isinstance(pipe.unet, QuantizedModel):
        raise ValueError("this pipeline's UNet is already quantised")
    if bits not in BIT_WIDTHS or method not in METHODS:  # before the calibration run, not after it
        raise ValueError(f"bits must be one of {sorted(BIT_WIDTHS)} and method one of {METHODS}, got {bits!r}, {method!r}")
    generator = generator or torch.Generator().manual_seed(0)
    calib = build_calibration_set(pipe, n, calibration, generator=generator, **calibration_kwargs)
    quantized = quantize_model(pipe.unet, calib, bits, method, split_shortcuts, generator=generator)
    quantized.register_to_config(recipe={**quantized.recipe, "calibration": calibration, "n": n})
    pipe.register_modules(unet=quantized)
    return pipe

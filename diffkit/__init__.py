"""diffkit: diffusion methods on one solver core, as diffusers pipelines."""

from .assets import DEFAULT_MODEL
from .denoiser import Denoiser, convert
from .dfm.networks import SignalMLP  # importable from the top for diffusers' component loading
from .guidance import CFG, Guidance, make_guidance
from .quant.model import QuantizedModel  # importable from the top for diffusers' component loading
from .resshift import ResShiftScheduler, SRNet  # importable from the top for diffusers' component loading
from .schedule import CLEAN, NoiseSchedule
from .solvers import SOLVERS, make_timesteps, sample_ddim, sample_dpmpp_2m, sample_euler, sample_heun
from .pipelines import load_pipeline  # last: the pipelines build on everything above


__version__ = "0.1.0"

__all__ = [
    "CFG",
    "CLEAN",
    "DEFAULT_MODEL",
    "Denoiser",
    "Guidance",
    "NoiseSchedule",
    "QuantizedModel",
    "ResShiftScheduler",
    "SRNet",
    "SOLVERS",
    "SignalMLP",
    "convert",
    "load_pipeline",
    "make_guidance",
    "make_timesteps",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_heun",
]

"""diffkit's diffusers pipelines (installed as ``diffkit.pipelines``)."""

from .adjoint import AdjointDPMPipeline
from .anagram import AnagramPipeline, AnagramPipelineOutput
from .forward_model import ForwardModelPipeline, ForwardModelPipelineOutput
from .guided import GuidedPipeline, GuidedPipelineOutput
from .loading import load_pipeline
from .modality_blend import ModalityBlendPipeline
from .inverse import InverseProblemPipeline, RedDiffPipeline
from .upscale import UpscalePipeline, UpscalePipelineOutput


# _class_name in model_index.json -> class, for load_pipeline
PIPELINES = {"GuidedPipeline": GuidedPipeline, "AdjointDPMPipeline": AdjointDPMPipeline, "InverseProblemPipeline": InverseProblemPipeline,
             "RedDiffPipeline": RedDiffPipeline,
             "ForwardModelPipeline": ForwardModelPipeline, "ModalityBlendPipeline": ModalityBlendPipeline}
PIPELINES["AnagramPipeline"] = AnagramPipeline
PIPELINES["UpscalePipeline"] = UpscalePipeline

__all__ = ["AdjointDPMPipeline", "ForwardModelPipeline", "ForwardModelPipelineOutput", "GuidedPipeline", "GuidedPipelineOutput", "InverseProblemPipeline", "ModalityBlendPipeline", "PIPELINES", "RedDiffPipeline", "load_pipeline"]

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
PIPELINES = {cls.__name__: cls for cls in (GuidedPipeline, AdjointDPMPipeline, InverseProblemPipeline, ForwardModelPipeline,
                                           ModalityBlendPipeline, AnagramPipeline, UpscalePipeline)}
PIPELINES["RedDiffPipeline"] = RedDiffPipeline  # the old name of InverseProblemPipeline

__all__ = ["AdjointDPMPipeline", "AnagramPipeline", "AnagramPipelineOutput", "ForwardModelPipeline",
           "ForwardModelPipelineOutput", "GuidedPipeline", "GuidedPipelineOutput", "InverseProblemPipeline",
           "ModalityBlendPipeline", "PIPELINES", "RedDiffPipeline", "UpscalePipeline", "UpscalePipelineOutput",
           "load_pipeline"]

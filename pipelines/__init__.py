"""diffkit's diffusers pipelines (installed as ``diffkit.pipelines``)."""

from .adjoint import AdjointDPMPipeline
from .guided import GuidedPipeline, GuidedPipelineOutput


# _class_name in model_index.json -> class, for diffkit.load_pipeline
PIPELINES = {"GuidedPipeline": GuidedPipeline, "AdjointDPMPipeline": AdjointDPMPipeline}

__all__ = ["AdjointDPMPipeline", "GuidedPipeline", "GuidedPipelineOutput", "PIPELINES"]

"""diffkit's diffusers pipelines (installed as ``diffkit.pipelines``)."""

from .adjoint import AdjointDPMPipeline
from .forward_model import ForwardModelPipeline, ForwardModelPipelineOutput
from .guided import GuidedPipeline, GuidedPipelineOutput
from .red_diff import RedDiffPipeline


# _class_name in model_index.json -> class, for diffkit.load_pipeline
PIPELINES = {"GuidedPipeline": GuidedPipeline, "AdjointDPMPipeline": AdjointDPMPipeline, "RedDiffPipeline": RedDiffPipeline,
             "ForwardModelPipeline": ForwardModelPipeline}

__all__ = ["AdjointDPMPipeline", "ForwardModelPipeline", "ForwardModelPipelineOutput", "GuidedPipeline", "GuidedPipelineOutput", "PIPELINES", "RedDiffPipeline"]

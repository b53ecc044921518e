"""diffkit's diffusers pipelines (installed as ``diffkit.pipelines``)."""

from .adjoint import AdjointDPMPipeline
from .anagram import AnagramPipeline, AnagramPipelineOutput
from .forward_model import ForwardModelPipeline, ForwardModelPipelineOutput
from .guided import GuidedPipeline, GuidedPipelineOutput
from .modality_blend import ModalityBlendPipeline
from .red_diff import RedDiffPipeline


# _class_name in model_index.json -> class, for diffkit.load_pipeline
PIPELINES = {"GuidedPipeline": GuidedPipeline, "AdjointDPMPipeline": AdjointDPMPipeline, "RedDiffPipeline": RedDiffPipeline,
             "ForwardModelPipeline": ForwardModelPipeline, "ModalityBlendPipeline": ModalityBlendPipeline}
PIPELINES["AnagramPipeline"] = AnagramPipeline

__all__ = ["AdjointDPMPipeline", "ForwardModelPipeline", "ForwardModelPipelineOutput", "GuidedPipeline", "GuidedPipelineOutput", "ModalityBlendPipeline", "PIPELINES", "RedDiffPipeline"]

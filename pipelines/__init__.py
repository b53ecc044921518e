"""diffkit's diffusers pipelines (installed as ``diffkit.pipelines``)."""

from .guided import GuidedPipeline, GuidedPipelineOutput


# _class_name in model_index.json -> class, for diffkit.load_pipeline
PIPELINES = {"GuidedPipeline": GuidedPipeline}

__all__ = ["GuidedPipeline", "GuidedPipelineOutput", "PIPELINES"]

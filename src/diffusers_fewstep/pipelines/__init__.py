"""Few-step pipelines, one per model family. The community files in the repository's `pipelines/` folder
re-export these classes, so `DiffusionPipeline.from_pretrained(model, custom_pipeline="pipelines/<file>.py")`
and `from diffusers_fewstep.pipelines import ...` give the same class."""
from .base import FewStepPipelineMixin
from .stable_diffusion import FewStepStableDiffusionPipeline
from .stable_diffusion_3 import FewStepSD3Pipeline
from .stable_diffusion_xl import FewStepStableDiffusionXLPipeline
from .unconditional import FewStepUnconditionalPipeline

__all__ = ["FewStepPipelineMixin", "FewStepUnconditionalPipeline", "FewStepStableDiffusionPipeline",
           "FewStepStableDiffusionXLPipeline", "FewStepSD3Pipeline"]

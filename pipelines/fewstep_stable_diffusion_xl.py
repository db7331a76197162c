"""Community pipeline: few-step text-to-image for SDXL (StableDiffusionXLPipeline family).

Load with::

    pipe = DiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0",
                                             custom_pipeline="pipelines/fewstep_stable_diffusion_xl.py", trust_remote_code=True)
    pipe.load_fewstep("path/or/hub-id-of-a-bundle")

Needs `pip install diffusers-fewstep`; the implementation is `diffusers_fewstep.pipelines.stable_diffusion_xl`.
Docs: docs/pipelines_text_to_image.md.
"""
from diffusers_fewstep.pipelines.stable_diffusion_xl import FewStepStableDiffusionXLPipeline  # noqa: F401

__all__ = ["FewStepStableDiffusionXLPipeline"]

"""Community pipeline: few-step text-to-image for Stable Diffusion 1.x/2.x (StableDiffusionPipeline family).

Load with::

    pipe = DiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                             custom_pipeline="pipelines/fewstep_stable_diffusion.py", trust_remote_code=True)
    pipe.load_fewstep("path/or/hub-id-of-a-bundle")

Needs `pip install diffusers-fewstep`; the implementation is `diffusers_fewstep.pipelines.stable_diffusion`.
Docs: docs/pipelines_text_to_image.md.
"""
from diffusers_fewstep.pipelines.stable_diffusion import FewStepStableDiffusionPipeline  # noqa: F401

__all__ = ["FewStepStableDiffusionPipeline"]

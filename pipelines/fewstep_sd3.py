"""Community pipeline: few-step text-to-image for flow-matching transformers (StableDiffusion3Pipeline family).

Load with::

    pipe = DiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-3-medium-diffusers",
                                             custom_pipeline="pipelines/fewstep_sd3.py", trust_remote_code=True)
    pipe.load_fewstep("path/or/hub-id-of-a-bundle")

Needs `pip install diffusers-fewstep`; the implementation is `diffusers_fewstep.pipelines.stable_diffusion_3`.
Docs: docs/pipelines_flow.md.
"""
from diffusers_fewstep.pipelines.stable_diffusion_3 import FewStepSD3Pipeline  # noqa: F401

__all__ = ["FewStepSD3Pipeline"]

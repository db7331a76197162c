"""Community pipeline: few-step unconditional sampling for UNet2DModel models (DDPMPipeline family).

Load with::

    pipe = DiffusionPipeline.from_pretrained("google/ddpm-cifar10-32",
                                             custom_pipeline="pipelines/fewstep_unconditional.py", trust_remote_code=True)
    pipe.load_fewstep("path/or/hub-id-of-a-bundle")

Needs `pip install diffusers-fewstep`; the implementation is `diffusers_fewstep.pipelines.unconditional`.
Docs: docs/pipelines_unconditional.md.
"""
from diffusers_fewstep.pipelines.unconditional import FewStepUnconditionalPipeline  # noqa: F401

__all__ = ["FewStepUnconditionalPipeline"]

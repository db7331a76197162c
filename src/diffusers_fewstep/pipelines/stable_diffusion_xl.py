"""Few-step text-to-image for SDXL latent models (the `StableDiffusionXLPipeline` family)."""
from __future__ import annotations

from typing import List, Optional, Union

import torch
from diffusers import StableDiffusionXLPipeline

from .base import FewStepPipelineMixin


class FewStepStableDiffusionXLPipeline(FewStepPipelineMixin, StableDiffusionXLPipeline):
    """`StableDiffusionXLPipeline` sampling on learned σ tables
    ("Optimizing Few-Step Sampler for Diffusion Probabilistic Model", [arXiv 2412.10786](https://arxiv.org/abs/2412.10786)).

    Components, prompt encoding, classifier-free guidance, negative prompts, `generator`, `output_type`,
    LoRA loading and `callback_on_step_end` are diffusers' own. Load a bundle with
    `pipe.load_fewstep(path_or_hub_id)`; `num_inference_steps` then picks the learned table.
    """

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]] = None, *, num_inference_steps: Optional[int] = None, **kwargs):
        """Generate images; every keyword argument is `StableDiffusionXLPipeline.__call__`'s.

        Args:
            prompt (`str` or `list[str]`, *optional*): the prompt(s).
            num_inference_steps (`int`, *optional*): model evaluations; picks the learned table for that count
                (defaults to the largest count the scheduler has a table for).
            kwargs: `prompt_2`, `negative_prompt`, `guidance_scale`, `generator`, `latents`, `output_type`, `sigmas`,
                `callback_on_step_end`, … as in `StableDiffusionXLPipeline.__call__`.

        Returns:
            [`StableDiffusionXLPipelineOutput`] or `tuple`.
        """
        return self.call_with_learned_table(super().__call__, prompt, num_inference_steps, kwargs)

"""Few-step unconditional sampling for UNet2DModel pixel-space models (the `DDPMPipeline` family)."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from .base import FewStepPipelineMixin


class FewStepUnconditionalPipeline(FewStepPipelineMixin, DiffusionPipeline):
    """Unconditional image generation in a few steps with learned σ tables
    ("Optimizing Few-Step Sampler for Diffusion Probabilistic Model", [arXiv 2412.10786](https://arxiv.org/abs/2412.10786)).

    Same components and output as diffusers' `DDPMPipeline`; load a bundle with
    `pipe.load_fewstep(path_or_hub_id)` before sampling.

    Args:
        unet (`UNet2DModel`): the denoising model (pixel space, data in [-1, 1]).
        scheduler (`LearnedScheduleScheduler`, or the model's original scheduler until a bundle is loaded).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=True)

    def prepare_latents(self, batch_size, generator, latents=None):
        """Initial native noise ε ~ N(0, I) (scaled by `init_noise_sigma`, which is 1 for learned schedules)."""
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}; pass one per image")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` have shape {tuple(latents.shape)}; expected {shape}")
        return latents.to(self._execution_device) * self.scheduler.init_noise_sigma

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: Optional[int] = None,
        timesteps: Optional[Sequence[float]] = None,
        sigmas: Optional[Sequence[float]] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Union[Callable[[DiffusionPipeline, int, int, Dict], Dict],
                                             PipelineCallback, MultiPipelineCallbacks]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
    ) -> Union[ImagePipelineOutput, tuple]:
        """Generate images.

        Args:
            batch_size (`int`, *optional*, defaults to 1): number of images.
            num_inference_steps (`int`, *optional*): model evaluations; picks the learned table for that count
                (defaults to the largest count the scheduler has a table for).
            timesteps (`list[float]`, *optional*): explicit timesteps instead of a learned table.
            sigmas (`list[float]`, *optional*): an explicit σ table instead of a learned one.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): makes sampling deterministic.
            latents (`torch.Tensor`, *optional*): initial noise of shape (batch, channels, size, size).
            output_type (`str`, *optional*, defaults to `"pil"`): `"pil"`, `"np"` (NHWC in [0, 1]) or
                `"pt"` (NCHW in [0, 1]).
            return_dict (`bool`, *optional*, defaults to `True`): return an `ImagePipelineOutput` or a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                called as `callback_on_step_end(self, i, t, callback_kwargs)` after every step; may return a
                new `latents`.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["latents"]`): tensors
                passed in `callback_kwargs`.

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the generated images.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type {output_type!r}; expected 'pil', 'np' or 'pt'")
        num_inference_steps = self.fewstep_num_inference_steps(num_inference_steps, timesteps, sigmas)
        device = self._execution_device

        # 1. the learned table (or the explicit timesteps / σ's)
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device,
                                                            timesteps, sigmas)
        self._num_timesteps = len(timesteps)
        # 2. initial noise in the model's native scale
        latents = self.prepare_latents(batch_size, generator, latents)
        # 3. one model evaluation and one solver step per table entry
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                model_input = self.scheduler.scale_model_input(latents, t)
                model_output = self.unet(model_input, t).sample
                latents = self.scheduler.step(model_output, t, latents, generator=generator).prev_sample
                if callback_on_step_end is not None:
                    tensors = {"latents": latents}
                    callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()
        # 4. [-1, 1] → [0, 1] in the requested format
        image = self.image_processor.postprocess(latents, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

"""What every few-step pipeline shares: loading a bundle and picking the learned table to run."""
from __future__ import annotations

from typing import Optional, Sequence, Union

from ..bundle import FewStepBundle, apply_bundle, load_bundle
from ..scheduler import LearnedScheduleScheduler


class FewStepPipelineMixin:
    """Adds :meth:`load_fewstep` to a `DiffusionPipeline` and checks, before sampling, that its scheduler
    holds learned σ tables."""

    def load_fewstep(self, bundle: Union[str, FewStepBundle], adapter_name: str = "fewstep"):
        """Load a few-step bundle into this pipeline: its learned scheduler, and its tuned weights or LoRA adapter.

        Args:
            bundle (`str` or `FewStepBundle`): a local folder or Hub repo id holding `scheduler/` (and optionally
                `unet/`, `transformer/` or `lora/`); see :mod:`diffusers_fewstep.bundle`.
            adapter_name (`str`, *optional*, defaults to `"fewstep"`): the name a LoRA adapter is loaded under.

        Raises:
            `ValueError`: when the bundle was learned for another model family or noise schedule.

        Returns:
            the pipeline itself, so that `pipe = Pipeline.from_pretrained(...).load_fewstep(bundle)` works.
        """
        if not isinstance(bundle, FewStepBundle):
            bundle = load_bundle(bundle)
        return apply_bundle(self, bundle, adapter_name=adapter_name)

    def fewstep_num_inference_steps(self, num_inference_steps: Optional[int] = None,
                                    timesteps: Optional[Sequence] = None, sigmas: Optional[Sequence] = None):
        """The step count to run: `num_inference_steps`, or the largest learned one when neither it nor explicit
        `timesteps`/`sigmas` are given. Raises `ValueError` when the scheduler holds no learned tables."""
        if not isinstance(self.scheduler, LearnedScheduleScheduler):
            raise ValueError(
                f"{type(self).__name__} samples on learned σ tables, but its scheduler is a "
                f"{type(self.scheduler).__name__}; load a bundle first: `pipe.load_fewstep('path/or/hub-id')`")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            if not self.scheduler.available_nfes:
                raise ValueError("the scheduler holds no σ tables; pass `num_inference_steps` with "
                                 "`sigmas=`, or load a bundle with learned tables")
            num_inference_steps = max(self.scheduler.available_nfes)
        return num_inference_steps

    def call_with_learned_table(self, parent_call, prompt, num_inference_steps: Optional[int], kwargs: dict):
        """Run a stock text-to-image `__call__` (`parent_call`) with the step count resolved by
        :meth:`fewstep_num_inference_steps`; every other argument passes through unchanged."""
        steps = self.fewstep_num_inference_steps(num_inference_steps, kwargs.get("timesteps"), kwargs.get("sigmas"))
        if steps is not None:
            kwargs["num_inference_steps"] = steps
        return parent_call(prompt, **kwargs)

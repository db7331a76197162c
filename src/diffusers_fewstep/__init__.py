"""diffusers-fewstep: learned few-step sampling schedules for Hugging Face diffusers models."""
__version__ = "0.1.0"

from .adapter import NoiseSchedule, SigmaDenoiser
from .scheduler import LearnedScheduleScheduler, LearnedScheduleSchedulerOutput
from .schedules import baseline_sigmas, karras_sigmas, loguniform_sigmas, time_uniform_sigmas, validate_sigmas
from .solvers import SOLVERS, sample

import os as _os

DEFAULT_MODEL = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))),
                              "assets", "fmnist-ddpm-eps")

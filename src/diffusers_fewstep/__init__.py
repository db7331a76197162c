"""diffusers-fewstep: learned few-step sampling schedules for Hugging Face diffusers models."""
import os as _os

__version__ = "0.1.0"

from .adapter import NoiseSchedule, SigmaDenoiser
from .bundle import load_bundle, save_bundle
from .scheduler import LearnedScheduleScheduler, LearnedScheduleSchedulerOutput
from .schedules import baseline_sigmas, karras_sigmas, loguniform_sigmas, time_uniform_sigmas, validate_sigmas
from .solvers import SOLVERS, sample

# The vendored Fashion-MNIST DDPM (assets/fmnist-ddpm-eps), the offline default model. It lives in the
# source checkout (an editable install); elsewhere pass a model path or Hub id explicitly.
DEFAULT_MODEL = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))),
                              "assets", "fmnist-ddpm-eps")

__all__ = ["DEFAULT_MODEL", "LearnedScheduleScheduler", "LearnedScheduleSchedulerOutput", "NoiseSchedule", "SOLVERS",
           "SigmaDenoiser", "baseline_sigmas", "karras_sigmas", "load_bundle", "loguniform_sigmas", "sample",
           "save_bundle", "time_uniform_sigmas", "validate_sigmas"]

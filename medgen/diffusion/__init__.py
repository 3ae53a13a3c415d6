"""Diffusion math: schedules, training objective (eps / v / x0, min-SNR), samplers with CFG, latent scaling."""

from medgen.diffusion.latents import LatentScaling, decode_latents
from medgen.diffusion.objective import DiffusionLoss, add_noise, drop_labels, min_snr_weight, predict_x0, target
from medgen.diffusion.sampling import (
    SAMPLERS, default_sampler, generators, guided_prediction, make_scheduler, noise_risk, sample_loop,
)
from medgen.diffusion.schedule import NoiseSchedule, snr

__all__ = [
    "DiffusionLoss", "LatentScaling", "NoiseSchedule", "SAMPLERS", "add_noise", "decode_latents", "default_sampler",
    "drop_labels", "generators", "guided_prediction", "make_scheduler", "min_snr_weight", "noise_risk", "predict_x0",
    "sample_loop", "snr", "target",
]

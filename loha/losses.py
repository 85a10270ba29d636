"""The diffusion loss and its options, with kohya sd-scripts' semantics (re-derived from their documentation
and behaviour): the loss type (l2, l1, Huber, smooth L1) with a timestep-scheduled Huber threshold, and the
per-sample weights (min-SNR, debiased estimation, regularization images' prior weight)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")


def huber_threshold(schedule: str, c: float, scale: float, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                    num_train_timesteps: int) -> torch.Tensor:
    """The Huber threshold per sample: ``constant`` c·scale; ``exponential`` scale·exp(ln(c)·t/T), from scale at
    t = 0 down to c·scale at T; ``snr`` (1 − c)/(1 + σ)² + c with σ = √((1 − ᾱ)/ᾱ), near 1 for clean inputs
    (squared-error-like) and c for noisy ones."""
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, c * scale)
    if schedule == "exponential":
        return torch.exp(math.log(c) * t / num_train_timesteps) * scale
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    sigma = ((1 - a) / a).sqrt()
    return (1 - c) / (1 + sigma) ** 2 + c


def elementwise(pred: torch.Tensor, target: torch.Tensor, loss_type: str, threshold: torch.Tensor | None = None):
    """The loss per element (B, C, H, W), in fp32: squared error, absolute error, or the pseudo-Huber
    2δ(√(e² + δ²) − δ) (``huber``) and 2(√(e² + δ²) − δ) (``smooth_l1``) with δ the threshold per sample."""
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    delta = threshold.view(-1, *[1] * (pred.dim() - 1))
    root = torch.sqrt((pred - target) ** 2 + delta ** 2) - delta
    return 2 * delta * root if loss_type == "huber" else 2 * root


def min_snr_weights(snrs: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """min(SNR, γ)/SNR for ε targets, min(SNR, γ)/(SNR + 1) for v targets (Hang et al. 2023)."""
    clipped = torch.clamp(snrs, max=gamma)
    return clipped / (snrs + 1 if v_prediction else snrs)


def debiased_weights(snrs: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2024): 1/√SNR for ε targets, 1/(SNR + 1) for v targets, the SNR capped at
    1000 (it is infinite at t = 0)."""
    capped = torch.clamp(snrs, max=1000.0)
    return 1 / (capped + 1) if v_prediction else 1 / torch.sqrt(capped)

"""Training losses for personalisation (DreamBooth, Textual Inversion) in plain torch, named after the papers."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def forward_diffusion(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """z_t = alpha_t x_0 + sigma_t eps (Ho et al. 2020, eq. 4, in the host's k-diffusion scaling; alpha is per row)."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    return alpha.reshape(shape) * x0 + sigma.reshape(shape) * noise


def noise_from_denoised(x_t: torch.Tensor, x0_pred: torch.Tensor, alpha: torch.Tensor,
                        sigma: torch.Tensor) -> torch.Tensor:
    """eps_theta = (z_t - alpha_t x0_theta) / sigma_t: the noise prediction behind a denoised estimate (inverse of eq. 4)."""
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    return (x_t - alpha.reshape(shape) * x0_pred) / sigma.reshape(shape)


def noise_prediction_mse(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """L_simple = E ||eps - eps_theta(z_t, t, c)||^2 (Ho et al. 2020 eq. 14; Gal et al. 2023 eq. 2; Ruiz et al. eq. 1)."""
    return F.mse_loss(eps_pred.float(), eps.float(), reduction="mean")


def prior_preservation_loss(eps_pred_instance: torch.Tensor, eps_instance: torch.Tensor,
                            eps_pred_class: torch.Tensor, eps_class: torch.Tensor,
                            prior_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DreamBooth eq. 2: mse(instance) + lambda * mse(class prior); returns (total, instance term, prior term)."""
    instance = noise_prediction_mse(eps_pred_instance, eps_instance)
    prior = noise_prediction_mse(eps_pred_class, eps_class)
    return instance + prior_weight * prior, instance, prior


def lora_delta(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """Delta W = (alpha / r) B A (Hu et al. 2021, eq. 3 with the usual alpha/r scaling); down is A [r, in], up is B [out, r]."""
    return up @ down * (alpha / down.shape[0])

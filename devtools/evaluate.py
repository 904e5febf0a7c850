"""Measure a (LoRA-patched) ComfyUI MODEL on a cached dataset: velocity loss at the anchors, anchor-schedule samples.

Time convention: ComfyUI sigma (1 = noise, 0 = data); x_sigma = (1 - sigma) x0 + sigma eps; v = eps - x0.
Uses ``apply_model`` (denoised) and v = (x - denoised) / sigma, so it measures exactly what a sampler sees.
"""

from __future__ import annotations

import torch

from ..samplers.flow import velocity_from_denoised
from ..training.dataset import CachedDataset


def _velocity(model, x, sigma, cond):
    denoised = model.model.apply_model(x, sigma, c_crossattn=cond, num_tokens=cond.shape[1])
    return velocity_from_denoised(x, denoised, sigma)


@torch.no_grad()
def anchor_velocity_losses(
    model, dataset: CachedDataset, anchors, *, seed: int = 0, draws: int = 2, per_item: bool = False
) -> torch.Tensor:
    """Mean velocity MSE at each anchor [N] (``per_item``: [items, N]), every dataset item with its own
    caption and ``draws`` fixed noises."""
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    device = model.load_device
    generator = torch.Generator().manual_seed(seed)
    anchors = torch.as_tensor(anchors, dtype=torch.float32)
    totals = torch.zeros(len(dataset), len(anchors))
    for index in range(len(dataset)):
        x0 = model.model.process_latent_in(dataset.latent(index)[None].float())
        cond = dataset.text(index)[None].to(device)
        for _ in range(draws):
            noise = torch.randn(x0.shape, generator=generator)
            batch_x0, batch_noise = (
                x0.expand(len(anchors), -1, -1, -1),
                noise.expand(len(anchors), -1, -1, -1),
            )
            s = anchors.view(-1, 1, 1, 1)
            x = ((1 - s) * batch_x0 + s * batch_noise).to(device)
            v = _velocity(model, x, anchors.to(device), cond.expand(len(anchors), -1, -1)).float().cpu()
            totals[index] += ((v - (batch_noise - batch_x0)) ** 2).flatten(1).mean(1) / draws
    return totals if per_item else totals.mean(0)


@torch.no_grad()
def euler_sample(model, noise: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Euler along ``sigmas`` (descending to 0) from ``noise``; returns x0 in the model's latent space."""
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    device = model.load_device
    x = noise.to(device)
    cond = cond.to(device).expand(x.shape[0], -1, -1)
    for sigma, next_sigma in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        s = torch.full((x.shape[0],), sigma, device=device)
        x = x + (next_sigma - sigma) * _velocity(model, x, s, cond)
    return x.cpu()

"""What every loss family uses: fp32 evaluation, a stable log(1 - P), each term's share of the gradient."""
from __future__ import annotations

import functools
import math

import torch

LOG_ONE_MINUS_EPS = math.log1p(-1e-6)  # clamp P <= 1 - 1e-6 before log(1 - P)


def fp32(loss_fn):
    """Run a loss in fp32 with autocast off: logits of 1/tau = 10 or beta = 40 overflow half precision."""

    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        device = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return loss_fn(*args, **kwargs)

    return wrapper


def log1mexp(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(logp)) for logp <= 0, accurate at both ends (Maechler 2012); P clamped below 1."""
    logp = logp.clamp(max=LOG_ONE_MINUS_EPS)
    return torch.where(logp > -math.log(2), torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))


def gradient_shares(terms: dict[str, torch.Tensor], wrt: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each (already weighted) loss term's share of the summed gradient norms at `wrt` (an activation the
    terms reach, e.g. the embeddings): ‖∂term/∂wrt‖ / Σ_terms ‖∂term/∂wrt‖. Keeps the graph (call before
    the backward); a term that does not reach `wrt` has share 0. Shows whether a scaled term is alive."""
    norms = {}
    for name, term in terms.items():
        grad = torch.autograd.grad(term, wrt, retain_graph=True, allow_unused=True)[0] if term.requires_grad else None
        norms[name] = torch.zeros((), device=wrt.device) if grad is None else grad.detach().float().norm()
    total = sum(norms.values()).clamp_min(1e-30)
    return {name: norm / total for name, norm in norms.items()}

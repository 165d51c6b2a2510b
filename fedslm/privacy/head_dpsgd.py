"""DP-SGD for a linear head on cached features, without materialising per-record gradients.

With ``lora.layers: 0`` the only trainable tensors are the classifier's weight W (C × d) and bias b
(unless ``lora.head_bias: false`` holds b fixed), read on a cached sentence vector x (after the head's
dropout, x̃). Record i's gradient of its cross-entropy is the outer product e_i x̃_iᵀ (and e_i for b),
e_i = softmax(W x̃_i + b) − onehot(y_i), so its norm is ‖e_i‖ · √(‖x̃_i‖² + 1) with a trained bias and
‖e_i‖ · ‖x̃_i‖ without, and the clipped sum is (c ∘ E)ᵀ X̃: one matrix product
("ghost clipping" for a linear layer), where Opacus would write an n × C × d tensor of per-record
gradients first. Everything else is Opacus' DPOptimizer step, in its order and with its numbers:
clip factor min(1, C / (‖g_i‖ + 1e-6)), Gaussian noise of std σ·C drawn per tensor in parameter
order from the same generator (or the OS CSPRNG), divided by the expected batch size, then the
wrapped optimizer's step. ``tests/test_prefix.py`` checks it against Opacus' own engine on the
same batches and noise.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class HeadDPSGD:
    """The DPSGD engine's interface (``step``, ``close``) for a head on cached features."""

    def __init__(self, head: nn.Linear, dropout: nn.Module, features, *, optimizer: torch.optim.Optimizer,
                 noise_multiplier: float, max_grad_norm: float, expected_batch_size: int,
                 physical_batch_size: int, noise_generator: Optional[torch.Generator] = None,
                 secure_mode: bool = False, lattice: Optional[tuple[float, float]] = None):
        """``lattice``: (γ, μ) for distributed noise (:mod:`fedslm.privacy.distributed`): the clipped sums
        are accumulated in float64, scaled by γ, rounded at random and given Skellam(μ) noise; the
        integer sums (``lattice_sums``, one per trained tensor) are what the node releases, and the
        step applies K / γ in place of the Gaussian-noised sum."""
        self.head, self.dropout, self.features = head, dropout, features
        self.params = [p for p in (head.weight, head.bias) if p is not None and p.requires_grad]
        self.optimizer = optimizer
        self.sigma, self.clip = float(noise_multiplier), float(max_grad_norm)
        self.expected = int(expected_batch_size)
        self.chunk = int(physical_batch_size)
        self.generator, self.secure_mode = noise_generator, secure_mode
        self.lattice = lattice
        self.lattice_sums: Optional[list[torch.Tensor]] = None
        head.train()
        dropout.train()

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        std = self.sigma * self.clip
        if self.secure_mode:
            from fedslm.privacy import csprng

            return csprng.gaussian_like(like, std)
        # Drawn on the generator's device (the CPU) and moved: the same noise whichever device trains.
        where = self.generator.device if self.generator is not None else like.device
        return torch.normal(mean=0.0, std=std, size=like.shape, device=where, generator=self.generator).to(like.device)

    def step(self, indices: Sequence[int], loss_fn=None) -> float:  # noqa: ARG002 - same call as DPSGD
        """One DP-SGD step on the logical batch ``indices``; returns its summed loss."""
        w, b = self.head.weight, self.head.bias
        # On the lattice the sums are scaled by γ ~ 2**13 / C before rounding: float32 would lose units.
        acc = torch.float64 if self.lattice is not None else w.dtype
        sum_w = torch.zeros_like(w, dtype=acc)
        sum_b = torch.zeros_like(b, dtype=acc) if b is not None else None
        total = 0.0
        for start in range(0, len(indices), self.chunk):
            batch = {k: v.to(w.device) for k, v in self.features.batch(indices[start:start + self.chunk]).items()}
            x = self.dropout(batch["hidden"]).detach()
            with torch.no_grad():
                logits = F.linear(x, w, b).float()
                losses = F.cross_entropy(logits, batch["labels"], reduction="none")
                e = torch.softmax(logits, dim=-1)
                e[torch.arange(len(e)), batch["labels"]] -= 1.0
                # On the lattice everything clipped and summed is float64: the norm bound then holds for
                # the very vectors that are summed, and no float32 partial sum moves by more than a record.
                e, x = e.to(acc), x.to(acc)
                # One pass over the d-wide record vectors: their norms. A vector with a NaN or ±inf entry
                # has a non-finite norm (so does one whose square overflows, whose factor would be 0 anyway),
                # so the norms also say which records are finite; an elementwise test of x cost 6x the product.
                x_norm = torch.linalg.vector_norm(x, dim=-1)
                sq = x_norm.square() + (1.0 if b is not None and b.requires_grad else 0.0)
                norms = e.norm(dim=-1) * sq.sqrt()
                factor = (self.clip / (norms + 1e-6)).clamp(max=1.0)
                # A record whose gradient is not finite (an overflowed logit) contributes nothing:
                # zero is within the clipping bound, so what is released stays DP whatever caused it.
                finite_x = torch.isfinite(x_norm)
                finite = torch.isfinite(e).all(-1) & finite_x & torch.isfinite(factor)
                factor = torch.where(finite, factor, torch.zeros_like(factor))
                ce = torch.where(finite.unsqueeze(-1), e, torch.zeros_like(e)) * factor.unsqueeze(-1)
                if not bool(finite_x.all()):  # 0 · NaN is NaN: such rows are zeroed before the product
                    x = torch.where(finite_x.unsqueeze(-1), x, torch.zeros_like(x))
                sum_w += ce.T @ x
                if sum_b is not None:
                    sum_b += ce.sum(0)
            total += float(losses.sum())
        grads = {id(w): sum_w, **({id(b): sum_b} if b is not None else {})}
        self.optimizer.zero_grad(set_to_none=True)
        if self.lattice is not None:
            from fedslm.privacy.distributed import lattice_sum

            gamma, mu = self.lattice
            # On the CPU, where the generator is: the integer sums are what is released.
            self.lattice_sums = lattice_sum([grads[id(p)].cpu() for p in self.params], gamma, mu, self.generator,
                                            secure=self.secure_mode)
            for p, k in zip(self.params, self.lattice_sums):
                p.grad = (k.double() / gamma / self.expected).to(device=p.device, dtype=p.dtype)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return total
        for p in self.params:  # Opacus' order: noise per tensor, then the mean over the expected batch
            p.grad = (grads[id(p)] + self._noise(grads[id(p)])) / self.expected
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def close(self) -> nn.Module:
        return self.head

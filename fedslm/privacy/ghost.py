"""DP-SGD with ghost clipping (``privacy.clipping_mode: ghost``): per-record norms without per-record gradients.

The hooks engine (:class:`fedslm.privacy.dpsgd.DPSGD`) materialises every record's gradient of every
adapter tensor, ``B × |adapter|`` floats per physical chunk, then clips and sums them. Ghost
clipping (Li et al. 2022, Bu et al. 2023) needs only each record's gradient *norm*: for a linear
layer with inputs ``a`` [B, T, d] and output gradients ``g`` [B, T, r] the record's squared norm is
``<g gᵀ, a aᵀ>`` (T × T per record, nothing of size d × r), and a second backward pass of
``Σ_i min(1, C/‖∇ℓ_i‖) · ℓ_i`` gives the sum of the clipped gradients directly in ``p.grad``.
Memory then grows with the chunk's activations, as in non-private training, not with the
adapter times the batch.

Opacus 1.6 does exactly this (:class:`GradSampleModuleFastGradientClipping` with
``use_ghost_clipping=True``, :class:`DPOptimizerFastGradientClipping`), and it wraps our PEFT models:
LoRA's A and B and the classifier head are plain ``nn.Linear`` modules, the ones it has norm
samplers for. We drive its parts ourselves, not through ``PrivacyEngine``/``DPLossFastGradientClipping``,
because our losses are per record already (``fedslm.train.losses``; HF's ``outputs.loss`` is a
batch mean and would couple records) and because of the same two needs as the hooks engine:
physical chunks and empty Poisson batches. The two passes run on one graph (``retain_graph``), so
the dropout masks that gave a record's norm are the ones its clipped gradient is taken through.

A record whose loss or norm is not finite contributes nothing (as in the hooks engine): the
chunk's two passes are rerun on its finite records alone, since a zero weight times an infinite
gradient is still NaN in the parameter's sum.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Optional, Sequence

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn

from fedslm.privacy.dpsgd import LossFn, _SecureNoiseDPOptimizer


@contextlib.contextmanager
def _hook_warning_expected() -> Iterator[None]:
    """Opacus' hooks on the first LoRA layer see an input that needs no grad; that is expected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


class _SecureNoiseGhostOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' ghost-clipping optimizer with its Gaussian noise from the OS CSPRNG (as the hooks engine's)."""

    add_noise = _SecureNoiseDPOptimizer.add_noise


class GhostDPSGD:
    """One node's DP-SGD on a model whose trainable tensors are the adapter, with ghost clipping.

    The same interface and the same update as :class:`fedslm.privacy.dpsgd.DPSGD`: the sum of each
    record's gradient clipped to ``max_grad_norm``, plus noise of std ``noise_multiplier ·
    max_grad_norm``, divided by the expected batch size."""

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: torch.optim.Optimizer,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        physical_batch_size: int,
        noise_generator: Optional[torch.Generator] = None,
        secure_mode: bool = False,
        extra_grad: Optional[Callable[[], None]] = None,
    ):
        model.train()  # before hooks: Opacus captures activations only in training mode
        self.module = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=max_grad_norm, use_ghost_clipping=True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_grad_norm = max_grad_norm
        self.optimizer = (_SecureNoiseGhostOptimizer if secure_mode else DPOptimizerFastGradientClipping)(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=None if secure_mode else noise_generator,
            secure_mode=False,
        )
        if extra_grad is not None:
            # A data-independent term (FedProx) added to the already noised gradient: post-processing.
            self.optimizer.attach_step_hook(lambda _opt: extra_grad())
        self.physical_batch_size = physical_batch_size
        # Per-record gradient norms of the last chunk (before clipping; tests and diagnostics only).
        self.last_norms: Optional[torch.Tensor] = None

    def _clipped_sum(self, chunk: Sequence[int], loss_fn: LossFn) -> float:
        """Add the clipped per-record gradients of ``chunk`` to ``p.grad``; returns the chunk's summed loss."""
        chunk = list(chunk)
        while chunk:
            for p in self.params:
                p.grad = None
            self.module.enable_hooks()
            losses = loss_fn(self.module, chunk)
            with _hook_warning_expected():
                # Pass 1: the hooks compute each record's gradient norm (loss_reduction "mean" rescales
                # the backprops by the chunk size, so each is the norm of that record's own gradient).
                losses.mean().backward(retain_graph=True)
            norms = self.module.get_norm_sample().detach()
            self.last_norms = norms
            finite = torch.isfinite(norms) & torch.isfinite(losses.detach())
            if not bool(finite.all()):
                chunk = [i for i, ok in zip(chunk, finite.tolist()) if ok]
                continue  # rerun both passes on the finite records alone
            coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            for p in self.params:
                p.grad = None
            self.module.disable_hooks()
            try:
                with _hook_warning_expected():
                    # Pass 2: plain autograd of the weighted sum gives Σ_i coef_i ∇ℓ_i in p.grad.
                    (coef.to(losses.dtype) * losses).sum().backward()
            finally:
                self.module.enable_hooks()
            return float(losses.detach().sum())
        for p in self.params:  # every record was dropped: this chunk adds nothing
            p.grad = torch.zeros_like(p)
        return 0.0

    def step(self, indices: Sequence[int], loss_fn: LossFn) -> float:
        """One DP-SGD step on the logical batch ``indices``; returns its summed loss."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        if len(indices) == 0:
            for p in self.params:
                p.grad = torch.zeros_like(p)
            opt.step()  # accumulate nothing, then a noise-only update
            opt.zero_grad(set_to_none=True)
            return 0.0
        size = self.physical_batch_size
        chunks = [indices[i : i + size] for i in range(0, len(indices), size)]
        total = 0.0
        for k, chunk in enumerate(chunks):
            total += self._clipped_sum(chunk, loss_fn)
            if k < len(chunks) - 1:
                opt.signal_skip_step(do_skip=True)  # accumulate this chunk, no update yet
            opt.step()
            opt.zero_grad(set_to_none=True)
        return total

    def close(self) -> nn.Module:
        """Remove Opacus' hooks; returns the plain model."""
        self.module.remove_hooks()
        for p in self.params:
            for attr in ("grad_sample", "summed_grad", "_norm_sample", "_forward_counter", "_current_grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
        return self.module._module

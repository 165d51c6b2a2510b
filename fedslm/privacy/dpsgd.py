"""DP-SGD over the trainable (adapter) tensors with Opacus' own parts.

Opacus' :class:`GradSampleModule` computes per-record gradients with hooks,
its :class:`DPOptimizer` clips each record's gradient to ``max_grad_norm``,
sums, adds Gaussian noise of std ``noise_multiplier * max_grad_norm`` and
divides by the *expected* batch size, and its Poisson sampler draws each
logical batch (so batch sizes vary and can be 0). We drive them ourselves
rather than through ``make_private`` for two reasons:

* a logical batch is split into physical chunks (Opacus' BatchMemoryManager
  pattern: skip-step after each chunk) so memory stays bounded whatever the
  batch size;
* an empty Poisson batch must still be a step — the accountant counts it —
  but a transformer forward on 0 rows crashes, so we feed the optimizer an
  empty per-sample gradient and it takes a noise-only step.

The loss handed to backward is the mean of *per-record* losses; with
``loss_reduction="mean"`` Opacus rescales it, so each per-sample gradient is
the gradient of that record's own loss.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn


# Maps (module, indices of one physical chunk) to that chunk's per-record losses, shape [len(indices)].
LossFn = Callable[[nn.Module, Sequence[int]], torch.Tensor]


def check_secure_mode(secure_mode: bool) -> str:
    """Where the noise comes from, in words."""
    from fedslm.privacy import csprng

    return csprng.SOURCE if secure_mode else "torch generator seeded from the OS CSPRNG (not cryptographically secure)"


def _zero_nonfinite_records(opt: DPOptimizer) -> None:
    """Zero every record's per-sample gradient that is not finite in some tensor: the record then
    contributes nothing, within the clipping bound, so no overflow a request provokes on some
    records can make the released sum depend on them beyond C."""
    params = [p for p in opt.params if getattr(p, "grad_sample", None) is not None]
    samples = [opt._get_flat_grad_sample(p) for p in params]
    if not samples or len(samples[0]) == 0:
        return
    ok = torch.ones(len(samples[0]), dtype=torch.bool, device=samples[0].device)
    for g in samples:
        ok &= torch.isfinite(g.reshape(len(g), -1)).all(-1)
    if bool(ok.all()):
        return
    for p, g in zip(params, samples):
        p.grad_sample = torch.where(ok.view(-1, *([1] * (g.dim() - 1))), g, torch.zeros_like(g))


def _fp32_records(opt: DPOptimizer, loss_scale: float) -> None:
    """Each record's gradient in fp32 (divided by the fixed fp16 loss scale) before anything reads its
    norm: under bf16/fp16 autocast Opacus' hooks produce half-precision per-sample gradients, and a norm
    taken in half precision can be below the true one, so the clipped vector could exceed C."""
    for p in opt.params:
        if getattr(p, "grad_sample", None) is None:
            continue
        g = opt._get_flat_grad_sample(p)
        if g.dtype != torch.float32 or loss_scale != 1.0:
            g = g.to(torch.float32)
            p.grad_sample = g / loss_scale if loss_scale != 1.0 else g


def _noise(std: float, reference: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Opacus' Gaussian draw (its call, so the same numbers on the CPU), made on the generator's device and
    moved to the gradient's: a seeded run draws the same noise whether the model trains on a CPU or a GPU."""
    where = generator.device if generator is not None else reference.device
    if std == 0:
        return torch.zeros(reference.shape, device=reference.device, dtype=reference.dtype)
    noise = torch.normal(mean=0, std=std, size=reference.shape, device=where, generator=generator,
                         dtype=torch.float32)
    return noise.to(device=reference.device, dtype=reference.dtype)


class _FiniteDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer, with per-record gradients in fp32 and non-finite ones zeroed before clipping,
    and the noise drawn in fp32 on the generator's device."""

    loss_scale = 1.0

    def clip_and_accumulate(self) -> None:
        _fp32_records(self, self.loss_scale)
        _zero_nonfinite_records(self)
        super().clip_and_accumulate()

    def add_noise(self) -> None:
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = _noise(self.noise_multiplier * self.max_grad_norm, p.summed_grad, self.generator)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


class _SecureNoiseDPOptimizer(_FiniteDPOptimizer):
    """Opacus' DPOptimizer with its Gaussian noise drawn from the OS CSPRNG (fedslm.privacy.csprng)."""

    def add_noise(self) -> None:
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        from fedslm.privacy import csprng

        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = csprng.gaussian_like(p.summed_grad, self.noise_multiplier * self.max_grad_norm)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


def make_optimizer(params: list[nn.Parameter], name: str, lr: float, weight_decay: float,
                   momentum: float = 0.0) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class DPSGD:
    """One node's DP-SGD on a model whose trainable tensors are the adapter."""

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
        precision: str = "fp32",
    ):
        """``precision`` (resolved, fedslm.train.device): the forward pass's autocast; the model must
        already be on its device (placed before PEFT wrapped it, and so before these hooks)."""
        from fedslm.train.device import model_device

        devices = {str(p.device) for p in model.parameters()}
        if len(devices) > 1:  # a half-moved model: Opacus' hooks would pair tensors of different devices
            raise ValueError(f"the model's parameters are on several devices ({', '.join(sorted(devices))}); place the "
                             "whole base on one device before PEFT and Opacus wrap it")
        model.train()  # before hooks: Opacus captures activations only in training mode
        self.device, self.precision = model_device(model), precision
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        self.params = [p for p in model.parameters() if p.requires_grad]
        # secure_mode: noise from the OS CSPRNG (our subclass), not Opacus' torchcsprng path.
        self.optimizer = (_SecureNoiseDPOptimizer if secure_mode else _FiniteDPOptimizer)(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=None if secure_mode else noise_generator,
            secure_mode=False,
        )
        self.optimizer.loss_scale = _loss_scale(precision)
        if extra_grad is not None:
            # A data-independent term (FedProx) added to the already noised gradient: post-processing.
            self.optimizer.attach_step_hook(lambda _opt: extra_grad())
        self.physical_batch_size = physical_batch_size

    def step(self, indices: Sequence[int], loss_fn: LossFn) -> float:
        """One DP-SGD step on the logical batch ``indices``; returns its summed loss."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        if len(indices) == 0:
            for p in self.params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            opt.step()  # clip/accumulate nothing, then noise-only update
            opt.zero_grad(set_to_none=True)
            return 0.0
        chunks = [indices[i : i + self.physical_batch_size] for i in range(0, len(indices), self.physical_batch_size)]
        total = 0.0
        for k, chunk in enumerate(chunks):
            with _autocast(self.device, self.precision):
                losses = loss_fn(self.module, chunk)
            with warnings.catch_warnings():
                # Opacus' hooks on the first LoRA layer see an input that needs no grad; that is expected.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                (losses.float().mean() * self.optimizer.loss_scale).backward()
            total += float(losses.detach().sum())
            if k < len(chunks) - 1:
                opt.signal_skip_step(do_skip=True)  # clip + accumulate this chunk, no update yet
            opt.step()
            opt.zero_grad(set_to_none=True)
        return total

    def close(self) -> nn.Module:
        """Remove Opacus' hooks; returns the plain model."""
        self.module.remove_hooks()
        for p in self.params:
            for attr in ("grad_sample", "summed_grad", "_current_grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
        return self.module._module


class PlainSGD:
    """The same step without privacy (baselines, benchmarks): mean loss over the batch."""

    def __init__(self, model: nn.Module, *, optimizer: torch.optim.Optimizer, physical_batch_size: int,
                 extra_grad: Optional[Callable[[], None]] = None, precision: str = "fp32"):
        from fedslm.train.device import model_device

        model.train()
        self.device, self.precision, self.scale = model_device(model), precision, _loss_scale(precision)
        self.module = model
        self.optimizer = optimizer
        self.physical_batch_size = physical_batch_size
        self.extra_grad = extra_grad

    def step(self, indices: Sequence[int], loss_fn: LossFn) -> float:
        if len(indices) == 0:
            return 0.0
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(0, len(indices), self.physical_batch_size):
            chunk = indices[i : i + self.physical_batch_size]
            with _autocast(self.device, self.precision):
                losses = loss_fn(self.module, chunk)
            (losses.float().sum() / len(indices) * self.scale).backward()
            total += float(losses.detach().sum())
        if self.scale != 1.0:
            for group in self.optimizer.param_groups:
                for q in group["params"]:
                    if q.grad is not None:
                        q.grad.div_(self.scale)
        if self.extra_grad is not None:
            self.extra_grad()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def close(self) -> nn.Module:
        return self.module


def _autocast(device: torch.device, precision: str):
    from fedslm.train.device import autocast

    return autocast(device, precision)


def _loss_scale(precision: str) -> float:
    from fedslm.train.device import loss_scale

    return loss_scale(precision)


def poisson_batches(num_examples: int, sample_rate: float, steps: int, generator: torch.Generator) -> list[list[int]]:
    """Opacus' Poisson sampler: each record joins each batch independently with prob. q."""
    sampler = UniformWithReplacementSampler(
        num_samples=num_examples, sample_rate=sample_rate, generator=generator, steps=steps
    )
    return [list(batch) for batch in sampler]

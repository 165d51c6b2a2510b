"""DP-SGD with ghost clipping (``privacy.clipping_mode: ghost``): per-record norms without per-record gradients.

The hooks engine (:class:`fedslm.privacy.dpsgd.DPSGD`) materialises every record's gradient of every
adapter tensor, ``B × |adapter|`` floats per physical chunk, then clips and sums them. Ghost
clipping (Li et al. 2022, Bu et al. 2023) needs only each record's gradient *norm*: for a linear
layer with inputs ``a`` [B, T, d] and output gradients ``g`` [B, T, r] the record's squared norm is
``<g gᵀ, a aᵀ>`` (T × T per record, nothing of size d × r), and a second backward pass of
``Σ_i min(1, C/‖∇ℓ_i‖) · ℓ_i`` gives the sum of the clipped gradients directly in ``p.grad``.
Memory then grows with the chunk's activations, as in non-private training, not with the
adapter times the batch.

Two implementations, one result:

* **Book-keeping** (Bu et al. 2023, "BK"), used whenever every trainable tensor belongs to an
  ``nn.Linear`` called once per forward, which is what our PEFT models are (LoRA's A and B, the
  classifier head): one backward pass records each such layer's input ``a`` and output gradient
  ``g``; the norms come from them (ghost ``<g gᵀ, a aᵀ>`` or the record's own ``gᵀa``, whichever
  costs less for the layer's shape), and the clipped sum is ``Σ_i c_i g_iᵀ a_i`` from the same
  tensors. No second backward pass: the step costs about what a non-private one does. A norm is
  only as good as the tape: if a trainable tensor reached the loss other than through its layer's
  one call (a functional reuse), the tape would miss that part and under-clip; so the tape's
  unclipped sum ``Σ_i g_iᵀ a_i`` is checked against autograd's own gradient each chunk, and a
  mismatch stops training.
* **Opacus 1.6** (:class:`GradSampleModuleFastGradientClipping` with ``use_ghost_clipping=True``)
  for any other trainable module: a first backward pass gives the norms, a second of
  ``Σ_i c_i ℓ_i`` on the same graph (``retain_graph``, so the dropout masks are the ones the norms
  saw) the clipped sum.

Both run under :class:`DPOptimizerFastGradientClipping`, driven by us, not through
``PrivacyEngine``/``DPLossFastGradientClipping``: our losses are per record already
(``fedslm.train.losses``; HF's ``outputs.loss`` is a batch mean and would couple records), and we
need physical chunks and empty Poisson batches as the hooks engine does. Norms and sums are fp32
whatever precision the forward ran in.

A record whose loss or norm is not finite contributes nothing (as in the hooks engine): BK zeroes
its rows before summing; the Opacus path reruns the chunk's two passes on the finite records alone
(a zero weight times an infinite gradient would still be NaN in the parameter's sum).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Optional, Sequence

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn

from fedslm.privacy.dpsgd import LossFn, _FiniteDPOptimizer, _SecureNoiseDPOptimizer, _autocast


@contextlib.contextmanager
def _hook_warning_expected() -> Iterator[None]:
    """Opacus' hooks on the first LoRA layer see an input that needs no grad; that is expected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


class _SeededGhostOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' ghost-clipping optimizer with the hooks engine's noise: fp32, drawn on the generator's device
    and moved to the gradient's (a CPU generator with a model on a GPU)."""

    add_noise = _FiniteDPOptimizer.add_noise


class _SecureNoiseGhostOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' ghost-clipping optimizer with its Gaussian noise from the OS CSPRNG (as the hooks engine's)."""

    add_noise = _SecureNoiseDPOptimizer.add_noise


class _Unsupported(Exception):
    pass


_UNTRACKED = ("privacy.clipping_mode ghost: a trainable tensor's gradient is not what its layer's recorded call gives "
              "(a reuse outside the layer?); its records' norms would be wrong. Use privacy.clipping_mode hooks")


def _check_tracked(m: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> None:
    """The tape's unclipped sum equals autograd's gradient: nothing reached the loss unrecorded. The
    tolerance admits bf16 forwards; a missed use is of the order of the gradient itself."""
    for p, tape in ((m.weight, lambda: g.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1])),
                    (m.bias, lambda: g.sum((0, 1)))):
        if p is None or not p.requires_grad:
            continue
        auto = p.grad.float() if p.grad is not None else torch.zeros(p.shape, device=a.device)
        diff = float((tape() - auto).norm())
        if not diff <= 0.05 * float(auto.norm()) + 1e-6:  # also catches NaN
            raise RuntimeError(_UNTRACKED)


class _Tape:
    """Book-keeping: each trainable ``nn.Linear``'s input and output gradient of the last forward/backward."""

    def __init__(self, model: nn.Module):
        self.layers: list[nn.Linear] = []
        for m in model.modules():
            if any(p.requires_grad for p in m.parameters(recurse=False)):
                if type(m) is not nn.Linear:
                    raise _Unsupported(type(m).__name__)
                self.layers.append(m)
        self.saved: dict[nn.Module, list] = {}
        self.handles = [m.register_forward_hook(self._forward) for m in self.layers]

    def _forward(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        if module in self.saved:  # a layer used twice in one forward (tied weights): its cross terms are not kept
            raise RuntimeError("privacy.clipping_mode ghost: a trainable layer is called twice in one forward; "
                               "use privacy.clipping_mode hooks")
        entry = [inputs[0].detach(), None]
        self.saved[module] = entry
        output.register_hook(lambda g: entry.__setitem__(1, g.detach()))

    def _flat(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        a, g = self.saved[module]
        if g is None:  # no gradient reached this layer (not on the loss's path)
            g = torch.zeros((*a.shape[:-1], module.out_features), dtype=torch.float32, device=a.device)
        n = a.shape[0]
        return a.reshape(n, -1, a.shape[-1]).float(), g.reshape(n, -1, g.shape[-1]).float()

    def norms(self, n: int, device: torch.device) -> torch.Tensor:
        """Each record's gradient norm over every trainable tensor, fp32."""
        sq = torch.zeros(n, dtype=torch.float32, device=device)
        for m in self.layers:
            if m not in self.saved:
                continue
            a, g = self._flat(m)
            if a.shape[0] != n:  # rows that are not records (an output layer on target tokens alone)
                raise RuntimeError(f"privacy.clipping_mode ghost: a trainable layer saw {a.shape[0]} rows for {n} "
                                   "records; its rows must be the records")
            t, d, r = a.shape[1], a.shape[2], g.shape[2]
            if m.weight.requires_grad:
                if t == 1:
                    sq += (g[:, 0] ** 2).sum(-1) * (a[:, 0] ** 2).sum(-1)
                elif t * (r + d) < r * d:  # ghost norm <g gᵀ, a aᵀ>: T² (r + d) a record, cheaper for wide layers
                    sq += (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum((1, 2))
                else:  # the record's gradient itself (T r d a record, usually cheaper for LoRA's r); one layer
                    sq += (torch.bmm(g.transpose(1, 2), a) ** 2).sum((1, 2))  # at a time, then freed
            if m.bias is not None and m.bias.requires_grad:
                sq += (g.sum(1) ** 2).sum(-1)
        return sq.sqrt()

    def clipped_sum(self, coef: torch.Tensor, keep: torch.Tensor) -> None:
        """``p.grad = Σ_i coef_i ∇_p ℓ_i`` over the records with ``keep``, from the saved tensors (``p.grad``
        holds autograd's unclipped sum on entry)."""
        for m in self.layers:
            if m not in self.saved:
                for p in m.parameters(recurse=False):
                    if p.requires_grad:
                        if p.grad is not None and bool(p.grad.abs().sum() > 0):
                            raise RuntimeError(_UNTRACKED)
                        p.grad = torch.zeros_like(p)
                continue
            a, g = self._flat(m)
            if bool(keep.all()):
                _check_tracked(m, a, g)
                g = g * coef.view(-1, 1, 1)
            else:  # rows of dropped records are zeroed, not weighted by 0: 0 × inf is NaN
                w = torch.where(keep, coef, torch.zeros_like(coef)).view(-1, 1, 1)
                g = torch.where(keep.view(-1, 1, 1), g, torch.zeros_like(g)) * w
                a = torch.where(keep.view(-1, 1, 1), a, torch.zeros_like(a))
            if m.weight.requires_grad:
                m.weight.grad = (g.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1])).to(m.weight.dtype)
            if m.bias is not None and m.bias.requires_grad:
                m.bias.grad = g.sum((0, 1)).to(m.bias.dtype)

    def clear(self) -> None:
        self.saved = {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.clear()


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
        precision: str = "fp32",
    ):
        """``precision`` (resolved, fedslm.train.device): the forward pass's autocast. The tape keeps each
        layer's input and output gradient as computed and takes norms and the clipped sum from them in fp32,
        so every record's contribution is clipped to ``max_grad_norm`` whatever the forward's precision;
        fp16 (a loss scale) and Opacus' two-pass fallback run in fp32 / bf16 only where said below."""
        from fedslm.train.device import model_device

        if precision == "fp16":
            raise ValueError("privacy.clipping_mode ghost does not run with train.precision fp16 (a loss scale); "
                             "use bf16, fp32, or privacy.clipping_mode hooks")
        model.train()  # before hooks: Opacus captures activations only in training mode
        self.device, self.precision = model_device(model), precision
        self.tape: Optional[_Tape]
        try:
            self.tape, self.module = _Tape(model), model
        except _Unsupported:
            if precision != "fp32":
                raise ValueError(f"privacy.clipping_mode ghost runs this model only in fp32 (Opacus' two-pass "
                                 f"ghost clipping), not train.precision {precision}; use fp32 or hooks") from None
            self.tape = None
            self.module = GradSampleModuleFastGradientClipping(
                model, batch_first=True, loss_reduction="mean", max_grad_norm=max_grad_norm, use_ghost_clipping=True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_grad_norm = max_grad_norm
        self.optimizer = (_SecureNoiseGhostOptimizer if secure_mode else _SeededGhostOptimizer)(
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
        """Put the sum of the clipped per-record gradients of ``chunk`` in ``p.grad``; returns the chunk's
        summed loss."""
        if self.tape is not None:
            return self._book_keeping(chunk, loss_fn)
        return self._two_passes(chunk, loss_fn)

    def _coef(self, norms: torch.Tensor) -> torch.Tensor:
        return (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)

    def _book_keeping(self, chunk: Sequence[int], loss_fn: LossFn) -> float:
        tape = self.tape
        assert tape is not None
        tape.clear()
        try:
            for p in self.params:
                p.grad = None
            with _autocast(self.device, self.precision):
                losses = loss_fn(self.module, list(chunk))
            losses.float().sum().backward()  # each record's own loss: g_i is the gradient of ℓ_i alone
            norms = tape.norms(len(losses), losses.device)
            self.last_norms = norms
            keep = torch.isfinite(norms) & torch.isfinite(losses.detach().float())
            tape.clipped_sum(self._coef(torch.nan_to_num(norms, nan=0.0, posinf=0.0)), keep)
            return float(losses.detach()[keep].sum())
        finally:
            tape.clear()

    def _two_passes(self, chunk: Sequence[int], loss_fn: LossFn) -> float:
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
            coef = self._coef(norms)
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
        """Remove the hooks; returns the plain model."""
        if self.tape is not None:
            self.tape.remove()
            return self.module
        self.module.remove_hooks()
        for p in self.params:
            for attr in ("grad_sample", "summed_grad", "_norm_sample", "_forward_counter", "_current_grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
        return self.module._module

"""Ghost clipping (privacy.clipping_mode: ghost) against the hooks engine and a per-record loop: the
same clipped sum, record norms, noise and DP round."""

from __future__ import annotations

import copy

import pytest
from conftest import randomise_lora
import torch

from fedslm.config import load_config
from fedslm.data.tasks import get_task
from fedslm.errors import ConfigError
from fedslm.privacy import Ledger
from fedslm.privacy.dpsgd import DPSGD, make_optimizer
from fedslm.privacy.ghost import GhostDPSGD
from fedslm.train.local import round_spec, train_round
from fedslm.train.losses import PER_RECORD_LOSS
from fedslm.train.node import build_node




def _record_norms(model, enc, task_name, indices):
    task, loss_of = get_task(task_name), PER_RECORD_LOSS[task_name]
    params = [p for p in model.parameters() if p.requires_grad]
    norms = []
    for i in indices:
        grads = torch.autograd.grad(loss_of(model, task.collate(enc, [i]))[0], params)
        norms.append(float(torch.sqrt(sum((g ** 2).sum() for g in grads))))
    return norms


def _update(engine_cls, model, enc, task_name, indices, clip):
    """The parameter change of one noiseless SGD step (lr 1) of ``engine_cls``: minus the clipped mean."""
    model = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], "sgd", 1.0, 0.0)
    engine = engine_cls(model, optimizer=opt, noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=10,
                        physical_batch_size=3)
    task, loss_of = get_task(task_name), PER_RECORD_LOSS[task_name]
    engine.step(indices, lambda m, idx: loss_of(m, task.collate(enc, idx)))
    plain = engine.close()
    return {n: before[n] - p.detach() for n, p in plain.named_parameters() if n in before}


def _ghost_equals_hooks(node, task_name):
    randomise_lora(node.model, which="lora_B")
    node.model.train()
    indices = list(range(7))  # chunks of 3: 3 + 3 + 1
    norms = _record_norms(node.model, node.train, task_name, indices)
    clip = sorted(norms)[len(norms) // 2]  # about half the records are clipped
    assert min(norms) < clip < max(norms)
    hooks = _update(DPSGD, node.model, node.train, task_name, indices, clip)
    ghost = _update(GhostDPSGD, node.model, node.train, task_name, indices, clip)
    assert hooks.keys() == ghost.keys() and hooks
    for name in hooks:
        torch.testing.assert_close(ghost[name], hooks[name], rtol=1e-5, atol=1e-5)
    assert any(float(g.abs().sum()) > 0 for g in ghost.values())
    # The clipped sum is bounded as it must be: ‖Σ clipped‖ ≤ records × C, here divided by the batch of 10.
    total = torch.sqrt(sum((g ** 2).sum() for g in ghost.values()))
    assert float(total) <= len(indices) * clip / 10 + 1e-6


def test_ghost_clipped_sum_equals_hooks_bert_classifier(cls_config):
    _ghost_equals_hooks(build_node(cls_config()), "classification")


def test_ghost_clipped_sum_equals_hooks_causal_llama(causal_config):
    _ghost_equals_hooks(build_node(causal_config()), "causal_lm")


def test_ghost_norms_are_each_records_own_gradient_norm(causal_config):
    node = build_node(causal_config())
    randomise_lora(node.model, which="lora_B")
    node.model.train()
    indices = [0, 1, 2, 3]
    expected = _record_norms(node.model, node.train, "causal_lm", indices)
    opt = make_optimizer([p for p in node.model.parameters() if p.requires_grad], "sgd", 0.0, 0.0)
    engine = GhostDPSGD(node.model, optimizer=opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4,
                        physical_batch_size=4)
    task, loss_of = get_task("causal_lm"), PER_RECORD_LOSS["causal_lm"]
    engine.step(indices, lambda m, idx: loss_of(m, task.collate(node.train, idx)))
    engine.close()
    torch.testing.assert_close(engine.last_norms, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_an_empty_batch_is_a_noise_only_step_of_std_sigma_c_over_b():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 50))
    before = model[0].weight.detach().clone()
    opt = make_optimizer(list(model.parameters()), "sgd", 1.0, 0.0)
    engine = GhostDPSGD(model, optimizer=opt, noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=4,
                        physical_batch_size=4, noise_generator=torch.Generator().manual_seed(3))
    assert engine.step([], lambda m, idx: None) == 0.0
    engine.close()
    delta = before - model[0].weight.detach()
    assert abs(float(delta.std()) - 2.0 * 0.5 / 4) < 0.02  # σ·C / b, on 2000 draws


def test_a_record_with_a_non_finite_loss_contributes_nothing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 1, bias=False))
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [float("inf"), 0.0, 0.0]])
    before = model[0].weight.detach().clone()
    opt = make_optimizer(list(model.parameters()), "sgd", 1.0, 0.0)
    engine = GhostDPSGD(model, optimizer=opt, noise_multiplier=0.0, max_grad_norm=100.0, expected_batch_size=1,
                        physical_batch_size=3)
    engine.step([0, 1, 2], lambda m, idx: m(x[list(idx)]).sum(-1))
    engine.close()
    # d/dw of w·x summed over the two finite records: x0 + x1; the third is dropped, not NaN.
    torch.testing.assert_close(before - model[0].weight.detach(), torch.tensor([[1.0, 2.0, 0.0]]))


def _toy_update(engine_cls, model, x, clip):
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(list(model.parameters()), "sgd", 1.0, 0.0)
    engine = engine_cls(model, optimizer=opt, noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=len(x),
                        physical_batch_size=4)
    engine.step(list(range(len(x))), lambda m, idx: m(x[list(idx)]).pow(2).sum((1, 2)))
    used_tape = getattr(engine, "tape", None) is not None
    engine.close()
    return [b - p.detach() for b, p in zip(before, model.parameters())], used_tape


def test_other_trainable_layers_go_through_opacus_two_passes_and_equal_hooks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 2))
    x = torch.randn(7, 3, 4)
    hooks, _ = _toy_update(DPSGD, model, x, 0.5)
    ghost, used_tape = _toy_update(GhostDPSGD, model, x, 0.5)
    assert not used_tape  # a LayerNorm is not a linear layer: Opacus' ghost clipping, two passes
    for a, b in zip(ghost, hooks):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Wide layers take the ghost norm (T × T a record), the narrow last one the per-record gradient: both paths.
    linear_only = torch.nn.Sequential(torch.nn.Linear(4, 40), torch.nn.Tanh(), torch.nn.Linear(40, 40), torch.nn.Tanh(),
                                      torch.nn.Linear(40, 2))
    hooks, _ = _toy_update(DPSGD, linear_only, x, 0.5)
    ghost, used_tape = _toy_update(GhostDPSGD, linear_only, x, 0.5)
    assert used_tape  # linear layers alone: one pass, the clipped sum from the saved inputs and gradients
    for a, b in zip(ghost, hooks):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_trainable_layer_whose_rows_are_not_the_records_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(3, 1))
    opt = make_optimizer(list(model.parameters()), "sgd", 1.0, 0.0)
    engine = GhostDPSGD(model, optimizer=opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=2,
                        physical_batch_size=2)
    x = torch.randn(4, 3)  # two records' two tokens flattened, as an output layer on target positions sees them
    with pytest.raises(RuntimeError, match="rows must be the records"):
        engine.step([0, 1], lambda m, idx: m(x).view(2, 2).sum(1))


def test_a_trainable_weight_reused_outside_its_layer_is_refused_not_under_clipped():
    class Reuse(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):  # the weight's second use bypasses the layer's call the tape records
            return self.lin(x) + x @ self.lin.weight.T

    model = Reuse()
    opt = make_optimizer(list(model.parameters()), "sgd", 1.0, 0.0)
    engine = GhostDPSGD(model, optimizer=opt, noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=2,
                        physical_batch_size=2)
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="Use privacy.clipping_mode hooks"):
        engine.step([0, 1], lambda m, idx: m(x[list(idx)]).pow(2).sum(-1))


def test_a_dp_round_in_ghost_mode_is_the_hooks_round(cls_config, tmp_path):
    """The whole round, noise on (seeded): the same adapter whichever engine clips."""
    states = []
    for mode in ("hooks", "ghost"):
        cfg = cls_config(f"privacy.clipping_mode={mode}", "privacy.max_grad_norm=0.05", "train.local_steps=2")
        node = build_node(cfg)
        spec = round_spec(cfg)
        assert spec.dp.clipping_mode == mode
        train_round(node.model, node.train, spec, unit="u", ledger=Ledger(tmp_path / f"{mode}.json"))
        states.append({n: p.detach().clone() for n, p in node.model.named_parameters() if p.requires_grad})
    for name in states[0]:
        torch.testing.assert_close(states[1][name], states[0][name], rtol=1e-5, atol=1e-6)


def test_clipping_mode_is_validated_naming_the_key(cls_config):
    with pytest.raises(ConfigError, match="privacy.clipping_mode must be one of hooks, ghost"):
        cls_config("privacy.clipping_mode=fast")
    assert load_config(overrides=["privacy.clipping_mode=ghost"]).privacy.clipping_mode == "ghost"


def test_ghost_under_bf16_keeps_every_record_within_the_clip_norm_in_fp32(cls_config):
    """bf16 forward (CPU autocast): each record's released contribution, measured in fp32, is at most C, and
    the master weights stay fp32; seeded noise is drawn like the hooks engine's."""
    node = build_node(cls_config())
    randomise_lora(node.model, which="lora_B")
    node.model.train()
    task, loss_of = get_task("classification"), PER_RECORD_LOSS["classification"]
    clip = 1e-3  # below every record's norm: each one is scaled to C
    for i in range(4):
        model = copy.deepcopy(node.model)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in params.items()}
        opt = make_optimizer(list(params.values()), "sgd", 1.0, 0.0)
        engine = GhostDPSGD(model, optimizer=opt, noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=1,
                            physical_batch_size=1, precision="bf16")
        engine.step([i], lambda m, idx: loss_of(m, task.collate(node.train, idx)))
        engine.close()
        assert all(p.dtype == torch.float32 for p in params.values())
        change = torch.sqrt(sum(((before[n] - p.detach()).double() ** 2).sum() for n, p in params.items()))
        assert 0 < float(change) <= clip * (1 + 1e-5)


def test_ghost_refuses_fp16_naming_both_keys(cls_config):
    from fedslm.config import load_config as load

    with pytest.raises(ConfigError, match="clipping_mode ghost"):
        load([], overrides=["privacy.clipping_mode=ghost", "train.precision=fp16"])

"""DP-SGD against an obviously correct reference: a loop over records, one gradient each."""

from __future__ import annotations

import copy

import pytest
import torch

from fedslm.data.tasks import get_task
from fedslm.privacy.dpsgd import DPSGD, make_optimizer, poisson_batches
from fedslm.train.losses import PER_RECORD_LOSS
from fedslm.train.node import build_node


def _reference_update(model, enc, task_name, indices, clip, expected_batch_size):
    """Per record: its own gradient, clipped to `clip` in total L2 norm; summed; / expected batch."""
    task = get_task(task_name)
    loss_of = PER_RECORD_LOSS[task_name]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for i in indices:
        model.zero_grad(set_to_none=True)
        loss = loss_of(model, task.collate(enc, [i]))
        assert loss.shape == (1,)
        loss[0].backward()
        grads = {n: p.grad.detach().clone() for n, p in params.items()}
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
        norms.append(float(norm))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for n in total:
            total[n] += grads[n] * factor
    return {n: g / expected_batch_size for n, g in total.items()}, norms


def _dp_step_matches_reference(node, task_name):
    model = node.model
    model.train()
    indices = list(range(7))  # 7 records over physical chunks of 3: 3 + 3 + 1
    ref_model = copy.deepcopy(model)
    _, norms = _reference_update(copy.deepcopy(model), node.train, task_name, indices, 1e9, 7)
    clip = sorted(norms)[len(norms) // 2]  # about half the records get clipped
    assert min(norms) < clip < max(norms)
    expected, _ = _reference_update(ref_model, node.train, task_name, indices, clip, expected_batch_size=10)

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    lr = 0.5
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], "sgd", lr, 0.0)
    engine = DPSGD(model, optimizer=opt, noise_multiplier=0.0, max_grad_norm=clip,
                   expected_batch_size=10, physical_batch_size=3)
    task = get_task(task_name)
    loss_of = PER_RECORD_LOSS[task_name]
    engine.step(indices, lambda m, idx: loss_of(m, task.collate(node.train, idx)))
    engine.close()
    for name, p in model.named_parameters():
        if name in before:
            torch.testing.assert_close(p.detach(), before[name] - lr * expected[name], rtol=1e-4, atol=1e-6)
    assert any(expected[n].abs().sum() > 0 for n in expected)


def test_dp_step_equals_per_record_loop_causal_llama(causal_config):
    _dp_step_matches_reference(build_node(causal_config()), "causal_lm")


def test_dp_step_equals_per_record_loop_causal_gemma3(causal_config, tiny_gemma_dir):
    _dp_step_matches_reference(build_node(causal_config(f"model.name={tiny_gemma_dir}")), "causal_lm")


def test_dp_step_equals_per_record_loop_bert_classifier(cls_config):
    _dp_step_matches_reference(build_node(cls_config()), "classification")


def test_causal_loss_is_per_sequence_not_hf_batch_mean(causal_config):
    node = build_node(causal_config())
    task = get_task("causal_lm")
    idx = list(range(6))
    batch = task.collate(node.train, idx)
    node.model.eval()
    with torch.no_grad():
        batched = PER_RECORD_LOSS["causal_lm"](node.model, batch)
        alone = torch.cat([PER_RECORD_LOSS["causal_lm"](node.model, task.collate(node.train, [i])) for i in idx])
        hf = node.model(**batch).loss  # HF: mean over every target token of the batch
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    # Completions differ in length, so the token-weighted batch mean is not the mean of records' losses.
    assert abs(float(hf) - float(batched.mean())) > 1e-4


def test_empty_poisson_batch_is_a_noise_only_step(cls_config):
    node = build_node(cls_config())
    before = {n: p.detach().clone() for n, p in node.model.named_parameters() if p.requires_grad}
    opt = make_optimizer([p for p in node.model.parameters() if p.requires_grad], "sgd", 0.1, 0.0)
    engine = DPSGD(node.model, optimizer=opt, noise_multiplier=1.0, max_grad_norm=1.0,
                   expected_batch_size=4, physical_batch_size=4,
                   noise_generator=torch.Generator().manual_seed(0))
    calls = []
    engine.step([], lambda m, idx: calls.append(idx))
    engine.close()
    assert calls == []  # no forward pass on zero records
    moved = [n for n, p in node.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert set(moved) == set(before)  # every adapter tensor received noise


@pytest.mark.parametrize("secure", [False, True], ids=["torch-generator", "os-csprng"])
def test_noise_has_the_calibrated_scale(cls_config, secure):
    """With σ>0 and nothing clipped in, the update is N(0, (σC/B)^2) per coordinate."""
    node = build_node(cls_config())
    sigma, clip, batch = 2.0, 0.5, 4
    before = {n: p.detach().clone() for n, p in node.model.named_parameters() if p.requires_grad}
    opt = make_optimizer([p for p in node.model.parameters() if p.requires_grad], "sgd", 1.0, 0.0)
    engine = DPSGD(node.model, optimizer=opt, noise_multiplier=sigma, max_grad_norm=clip,
                   expected_batch_size=batch, physical_batch_size=4,
                   noise_generator=torch.Generator().manual_seed(1), secure_mode=secure)
    engine.step([], lambda m, idx: None)
    engine.close()
    deltas = torch.cat([(p.detach() - before[n]).flatten()
                        for n, p in node.model.named_parameters() if n in before])
    assert deltas.numel() > 200
    assert float(deltas.std()) == pytest.approx(sigma * clip / batch, rel=0.15)
    # Centred: the mean of n draws is within 5 standard errors (the CSPRNG case is unseeded, so no luck allowed).
    assert abs(float(deltas.mean())) < 5 * sigma * clip / batch / deltas.numel() ** 0.5


def test_poisson_sampling_varies_batch_sizes_and_hits_empty_batches():
    gen = torch.Generator().manual_seed(0)
    batches = poisson_batches(50, 0.04, 400, gen)  # expected batch 2: P(empty) = 0.96^50 ≈ 13%
    sizes = [len(b) for b in batches]
    assert len(set(sizes)) > 3
    assert sizes.count(0) > 20
    assert abs(sum(sizes) / len(sizes) - 2.0) < 0.3
    assert all(len(set(b)) == len(b) for b in batches)  # no record twice in a batch


def test_a_noise_seed_reproduces_a_round_in_any_run_and_another_seed_does_not(cls_config, tmp_path):
    """privacy.noise_seed fixes batches and noise from (seed, dataset, round): a rerun (a new run id)
    trains to the same adapter, bit for bit; another seed to a different one."""
    from fedslm.lora import get_adapter_state
    from fedslm.privacy import Ledger
    from fedslm.train import round_spec, train_round

    def adapter(seed: int, run_id: str, name: str) -> dict[str, torch.Tensor]:
        cfg = cls_config(f"privacy.noise_seed={seed}", "train.local_steps=2")
        node = build_node(cfg)
        train_round(node.model, node.train, round_spec(cfg), unit=cfg.privacy.unit,
                    ledger=Ledger(tmp_path / f"{name}.json"), run_id=run_id, round_idx=1)
        return get_adapter_state(node.model)

    one, rerun, other = adapter(7, "run-a", "a"), adapter(7, "run-b", "b"), adapter(8, "run-a", "c")
    assert all(torch.equal(one[k], rerun[k]) for k in one)
    assert any(not torch.equal(one[k], other[k]) for k in one)

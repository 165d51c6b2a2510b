"""The values on CUDA: a DP round on the GPU trains what the same round trains on the CPU (the LoRA
updates are not silently corrupted, Opacus #820), bf16 keeps the clipping bound, the prefix cache and
scoring run there. Skipped without CUDA; `pytest -m gpu` (benchmarks/gpu_check.sh) runs them."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")]


@pytest.fixture(autouse=True)
def exact_matmul():
    """fp32 matmuls without TF32, so GPU and CPU results differ by rounding only."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def _round(cfg, device, tmp_path, name):
    from fedslm.lora import get_adapter_state
    from fedslm.privacy import Ledger
    from fedslm.train.local import round_spec, train_round
    from fedslm.train.node import build_node

    node = build_node(cfg, torch.device(device))
    start = get_adapter_state(node.model)
    result = train_round(node.model, node.train, round_spec(cfg), unit="u", ledger=Ledger(tmp_path / f"{name}.json"))
    return node, start, get_adapter_state(node.model), result


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_a_dp_round_on_cuda_trains_what_it_trains_on_the_cpu(task, cls_config, causal_config, tmp_path):
    make = cls_config if task == "classification" else causal_config
    # No dropout: the CPU and the GPU draw dropout masks from different generators.
    cfg = make("lora.dropout=0.0", "train.precision=fp32", "train.optimizer=sgd", "train.lr=0.5")
    _, start_cpu, cpu, r_cpu = _round(cfg, "cpu", tmp_path, "cpu")
    node, start_gpu, gpu, r_gpu = _round(cfg, "cuda", tmp_path, "gpu")
    assert {p.device.type for p in node.model.parameters()} == {"cuda"}
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in gpu.values())
    assert r_cpu.steps == r_gpu.steps and r_cpu.mean_batch_size == r_gpu.mean_batch_size  # the same batches
    moved = 0
    for key in cpu:
        torch.testing.assert_close(start_gpu[key], start_cpu[key])
        torch.testing.assert_close(gpu[key], cpu[key], rtol=1e-3, atol=1e-4)  # same noise, same clipping
        moved += int(not torch.equal(gpu[key], start_gpu[key]))
    assert moved == len(cpu)  # every trained tensor moved


def test_bf16_on_cuda_keeps_each_record_within_the_clip_norm(monkeypatch, cls_config):
    from fedslm.data.tasks import get_task
    from fedslm.privacy import dpsgd
    from fedslm.train.device import resolve_precision, to_device
    from fedslm.train.losses import PER_RECORD_LOSS
    from fedslm.train.node import build_node

    device = torch.device("cuda")
    precision = resolve_precision("auto", device)
    if precision != "bf16":
        pytest.skip("this GPU has no bf16")
    node = build_node(cls_config(), device)
    params = [q for q in node.model.parameters() if q.requires_grad]
    clip = 1e-3
    engine = dpsgd.DPSGD(node.model, optimizer=dpsgd.make_optimizer(params, "sgd", 1.0, 0.0), noise_multiplier=0.0,
                         max_grad_norm=clip, expected_batch_size=8, physical_batch_size=8, precision=precision)
    seen = {}
    real = dpsgd.DPOptimizer.clip_and_accumulate

    def capture(opt):
        seen["samples"] = [opt._get_flat_grad_sample(p).clone() for p in opt.params]
        real(opt)

    monkeypatch.setattr(dpsgd.DPOptimizer, "clip_and_accumulate", capture)
    task = get_task("classification")
    engine.step(list(range(8)), lambda m, idx: PER_RECORD_LOSS["classification"](
        m, to_device(task.collate(node.train, idx), device)))
    samples = seen["samples"]
    assert all(g.dtype == torch.float32 for g in samples)
    norms = torch.stack([g.reshape(len(g), -1).norm(dim=-1) for g in samples], dim=1).norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    clipped = torch.stack([(g * factor.view(-1, *([1] * (g.dim() - 1)))).reshape(len(g), -1).norm(dim=-1)
                           for g in samples], dim=1).norm(dim=1)
    assert float(clipped.max()) <= clip * (1 + 1e-6)
    assert all(p.dtype == torch.float32 for p in params)


def test_prefix_features_and_scores_on_cuda_equal_the_cpu(cls_config):
    from fedslm.train.evaluate import evaluate
    from fedslm.train.node import build_node
    from fedslm.train.prefix import compute

    cfg = cls_config()
    cpu, gpu = build_node(cfg, torch.device("cpu")), build_node(cfg, torch.device("cuda"))
    f_cpu, f_gpu = compute(cpu.model, cpu.train, 1), compute(gpu.model, gpu.train, 1)
    assert f_gpu.hidden.device.type == "cpu"  # the cache is kept on the CPU
    torch.testing.assert_close(f_gpu.hidden, f_cpu.hidden, rtol=1e-4, atol=1e-5)
    e_cpu = evaluate(cpu.model, cpu.test, "classification")
    e_gpu = evaluate(gpu.model, gpu.test, "classification")
    assert math.isclose(e_cpu["loss"], e_gpu["loss"], rel_tol=1e-4) and e_cpu["accuracy"] == e_gpu["accuracy"]

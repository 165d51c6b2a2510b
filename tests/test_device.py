"""The node's device and precision: resolution, refusals, placement order, and the fp32 guarantee
under mixed precision (all on the CPU; tests/test_gpu.py checks the values on CUDA)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fedslm.cli.main import app
from fedslm.errors import ConfigError
from fedslm.train import device as dev


def _cuda(monkeypatch, count: int, bf16: bool = True) -> None:
    """Make torch look like it sees ``count`` CUDA devices (0: none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    _cuda(monkeypatch, 2)
    assert dev.resolve_device("auto") == torch.device("cuda", 0)
    assert dev.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert dev.resolve_device(" CPU ") == torch.device("cpu")
    _cuda(monkeypatch, 0)
    monkeypatch.setattr(dev, "_mps_available", lambda: True)
    assert dev.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")


def test_a_device_the_machine_lacks_is_refused_naming_the_key_and_what_torch_sees(monkeypatch):
    _cuda(monkeypatch, 1)
    with pytest.raises(dev.DeviceError) as one:
        dev.resolve_device("cuda:1")
    assert str(one.value) == "resources.device: cuda:1 is not available: torch sees 1 CUDA device (cuda:0)"
    _cuda(monkeypatch, 0)
    with pytest.raises(dev.DeviceError) as none:
        dev.resolve_device("cuda", key="--device")
    assert str(none.value).startswith(f"--device: cuda is not available: torch sees no CUDA device (torch {torch.__version__}")
    with pytest.raises(dev.DeviceError, match="mps is not available"):
        dev.resolve_device("mps")
    for bad in ("gpu", "cuda:x", "cuda:-1", ""):
        with pytest.raises(dev.DeviceError, match=r"resources.device must be one of auto, cpu, cuda, cuda:N, mps"):
            dev.resolve_device(bad)


def test_precision_auto_is_bf16_on_a_capable_gpu_and_fp32_on_the_cpu(monkeypatch):
    _cuda(monkeypatch, 1, bf16=True)
    cuda = torch.device("cuda", 0)
    assert dev.resolve_precision("auto", cuda) == "bf16"
    assert dev.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert dev.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # torch's CPU autocast runs it
    assert dev.resolve_precision("fp16", cuda) == "fp16"
    with pytest.raises(dev.DeviceError, match="train.precision: fp16 runs on CUDA only"):
        dev.resolve_precision("fp16", torch.device("cpu"))
    _cuda(monkeypatch, 1, bf16=False)  # a V100 / T4
    assert dev.resolve_precision("auto", cuda) == "fp32"
    with pytest.raises(dev.DeviceError, match="train.precision: bf16 is not supported on cuda:0"):
        dev.resolve_precision("bf16", cuda)
    with pytest.raises(dev.DeviceError, match="train.precision must be one of"):
        dev.resolve_precision("fp8", cuda)


def test_run_config_keys_are_validated_naming_the_key(cls_config):
    with pytest.raises(ConfigError, match="train.precision must be one of auto, fp32, bf16, fp16; got 'fp8'"):
        cls_config("train.precision=fp8")
    with pytest.raises(ConfigError, match="federation.client_gpus must be >= 0"):
        cls_config("federation.client_gpus=-0.5")
    assert cls_config("federation.client_gpus=0.25").federation.client_gpus == 0.25


def test_policy_device_is_validated(node_policy, class_csv, tmp_path):
    from fedslm.node.policy import PolicyError, load_policy

    path = node_policy(data=class_csv)
    doc = yaml.safe_load(path.read_text())
    doc["resources"] = {"device": "gpu0"}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(PolicyError, match="resources.device must be one of auto, cpu, cuda, cuda:N, mps; got 'gpu0'"):
        load_policy(path)


@pytest.mark.parametrize("command", ["train", "predict", "generate", "export"])
def test_cli_device_cuda_without_cuda_is_one_line(monkeypatch, command, tmp_path, tiny_bert_dir, class_csv):
    _cuda(monkeypatch, 0)
    args = {
        "train": ["train", f"model.name={tiny_bert_dir}", f"data.source={class_csv}", f"output.dir={tmp_path / 'r'}"],
        "predict": ["predict", "--adapter", str(tmp_path / "a"), "--input", str(class_csv)],
        "generate": ["generate", "--adapter", str(tmp_path / "a"), "--prompt", "fever"],
        "export": ["export", "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "o")],
    }[command]
    res = CliRunner().invoke(app, [*args, "--device", "cuda"])
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert "--device: cuda is not available: torch sees no CUDA device" in text
    assert not (tmp_path / "r").exists()  # refused before the run folder is written


def test_node_check_shows_the_resolved_device(monkeypatch, node_policy, class_csv):
    from fedslm.node.check import check_policy
    from fedslm.node.policy import PolicyError

    _cuda(monkeypatch, 0)
    path = node_policy(data=class_csv)
    report = check_policy(path)["resources"]
    assert (report["device"], report["resolved_device"]) == ("auto", "cpu")
    res = CliRunner().invoke(app, ["node", "check", str(path)])
    assert res.exit_code == 0 and "resources.device auto -> cpu" in res.output, res.output
    doc = yaml.safe_load(path.read_text())
    doc["resources"] = {"device": "cuda:1"}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(PolicyError, match="resources.device: cuda:1 is not available: torch sees no CUDA device"):
        check_policy(path)


def test_the_template_names_the_device_key():
    from fedslm.node.policy import template

    text = template("p.yaml", name="h", source="d.csv", ledger=None, labels=None, size_floor=None)
    assert "\n  device: auto\n" in text


def test_a_request_never_chooses_the_device(cls_config, node_policy, class_csv):
    from fedslm.config import to_yaml
    from fedslm.node.plan import BadRequest, NodeContext, parse_request_config, plan_round
    from fedslm.node.policy import load_policy

    path = node_policy(data=class_csv, models=[str(cls_config().model.name)])
    doc = yaml.safe_load(path.read_text())
    doc["resources"] = {"device": "cuda:3"}
    path.write_text(yaml.safe_dump(doc))
    node = NodeContext(institution=0, num_institutions=0, policy=load_policy(path))
    # A request asking for GPUs (the simulation's rule would pick cuda) gets the policy's device;
    cfg = parse_request_config(to_yaml(cls_config("federation.client_gpus=1", "privacy.noise_seed=null")))
    assert plan_round(cfg, node).device == "cuda:3"
    doc["resources"] = {"device": "cpu"}
    path.write_text(yaml.safe_dump(doc))
    assert plan_round(cfg, NodeContext(institution=0, num_institutions=0, policy=load_policy(path))).device == "cpu"
    # and a request has no key that names one.
    text = to_yaml(cls_config("privacy.noise_seed=null"))
    for key in ("train:\n  device: cuda\n", "resources:\n  device: cuda\n"):
        with pytest.raises(BadRequest):
            parse_request_config(text + key if key.startswith("resources") else text.replace("train:\n", key, 1))


def test_simulated_institutions_follow_client_gpus(cls_config):
    from fedslm.node.plan import NodeContext, plan_round

    sim = NodeContext(institution=1, num_institutions=2, policy=None)
    assert plan_round(cls_config(), sim).device == "cpu"
    assert plan_round(cls_config("federation.client_gpus=0.25"), sim).device == "cuda"


def test_client_gpus_is_checked_against_this_machine(monkeypatch, cls_config, tmp_path):
    from fedslm.simulation.simulate import check_client_gpus, simulate, write_flower_config

    _cuda(monkeypatch, 0)
    cfg = cls_config("federation.client_gpus=0.25")
    with pytest.raises(ConfigError, match=r"federation.client_gpus=0.25 asks for GPUs, but torch sees no CUDA device"):
        simulate(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything is written or started
    assert check_client_gpus(cls_config()) == 0
    assert check_client_gpus(cls_config("federation.client_gpus=0.25", "federation.ray_address=auto")) == 0
    _cuda(monkeypatch, 1)
    assert check_client_gpus(cfg) == 1
    with pytest.raises(ConfigError, match="federation.client_gpus=2 is more than the 1 GPU"):
        check_client_gpus(cls_config("federation.client_gpus=2"))
    with pytest.raises(ConfigError, match="federation.client_gpus must be a fraction of one GPU"):
        check_client_gpus(cls_config("federation.client_gpus=1.5"))
    write_flower_config(tmp_path / "home", 9999, cfg)
    text = (tmp_path / "home" / "config.toml").read_text()
    assert "options.backend.client-resources.num-gpus = 0.25\n" in text
    assert "options.backend.init-args.num-gpus = 1\n" in text


# --- placement order: the base is on its device before PEFT (and so before Opacus) ---

def _record_peft(monkeypatch, seen: list):
    from fedslm.lora import adapter

    real = adapter.get_peft_model

    def recording(base, *args, **kwargs):
        seen.append({p.device.type for p in base.parameters()})
        return real(base, *args, **kwargs)

    monkeypatch.setattr(adapter, "get_peft_model", recording)


def test_the_base_is_on_its_device_before_get_peft_model(monkeypatch, cls_config):
    """'meta' stands in for an accelerator: if the model were moved after PEFT wrapped it (Opacus #820),
    get_peft_model would see CPU parameters."""
    from fedslm.train.node import build_node

    seen: list = []
    _record_peft(monkeypatch, seen)
    node = build_node(cls_config(), torch.device("meta"))
    assert seen == [{"meta"}]
    assert {p.device.type for p in node.model.parameters()} == {"meta"}


def test_a_node_round_places_the_base_before_peft(monkeypatch, cls_config):
    from fedslm.node import institution
    from fedslm.node.plan import NodeContext, plan_round

    seen: list = []
    _record_peft(monkeypatch, seen)
    plan = plan_round(cls_config(), NodeContext(institution=0, num_institutions=2, policy=None))
    monkeypatch.setattr(institution, "node_device", lambda plan: torch.device("meta"))
    monkeypatch.setattr(institution, "_LOADED", {})
    _, model = institution._base_and_model(plan, 3)
    assert seen == [{"meta"}] and {p.device.type for p in model.parameters()} == {"meta"}


def test_a_simulated_institution_without_cuda_is_refused_as_misconfigured(monkeypatch, cls_config):
    from fedslm.node import serve
    from fedslm.node.errors import category
    from fedslm.node.plan import NodeContext, plan_round

    _cuda(monkeypatch, 0)
    plan = plan_round(cls_config("federation.client_gpus=0.5"), NodeContext(institution=0, num_institutions=2, policy=None))
    with pytest.raises(Exception) as exc:
        serve.node_device(plan)
    assert category(exc.value) == "node-misconfigured" and "cuda is not available" in str(exc.value)


# Loading real adapter values into 'meta' tensors is a no-op torch warns about; only the order is checked here.
@pytest.mark.filterwarnings("ignore:.*to a meta parameter in the current model:UserWarning")
def test_tuned_models_load_onto_their_device_before_the_adapter(monkeypatch, cls_config, tmp_path):
    from peft import PeftModel

    from fedslm.lora import adapter_meta, save_adapter
    from fedslm.lora.merge import load_tuned
    from fedslm.train.node import build_node

    cfg = cls_config()
    node = build_node(cfg)
    folder = save_adapter(node.model, tmp_path / "adapter", adapter_meta(cfg, node.base.fingerprint, node.data.labels))
    seen: list = []
    real = PeftModel.from_pretrained

    def recording(model, *args, **kwargs):
        seen.append({p.device.type for p in model.parameters()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "from_pretrained", recording)
    tuned = load_tuned(folder, torch.device("meta"))
    assert seen == [{"meta"}] and {p.device.type for p in tuned.model.parameters()} == {"meta"}


# --- mixed precision never touches the guarantee ---

def _engine(cls_config, precision: str, clip: float, sigma: float, seed: int = 3):
    from fedslm.data.tasks import get_task
    from fedslm.privacy.dpsgd import DPSGD, make_optimizer
    from fedslm.train.losses import PER_RECORD_LOSS
    from fedslm.train.node import build_node

    node = build_node(cls_config())
    params = [q for q in node.model.parameters() if q.requires_grad]
    engine = DPSGD(node.model, optimizer=make_optimizer(params, "sgd", 1.0, 0.0), noise_multiplier=sigma,
                   max_grad_norm=clip, expected_batch_size=8, physical_batch_size=8,
                   noise_generator=torch.Generator().manual_seed(seed), precision=precision)
    task = get_task("classification")

    def loss_fn(module, indices):
        return PER_RECORD_LOSS["classification"](module, task.collate(node.train, indices))

    return engine, params, loss_fn


def test_bf16_per_record_gradients_are_clipped_in_fp32(monkeypatch, cls_config):
    from fedslm.privacy import dpsgd

    clip = 1e-3  # below every record's norm: each one is scaled down to C
    engine, params, loss_fn = _engine(cls_config, "bf16", clip, sigma=0.0)
    seen = {}
    real = dpsgd.DPOptimizer.clip_and_accumulate

    def capture(opt):
        seen["samples"] = [opt._get_flat_grad_sample(p).clone() for p in opt.params]
        real(opt)
        seen["sums"] = [p.summed_grad.clone() for p in opt.params]

    monkeypatch.setattr(dpsgd.DPOptimizer, "clip_and_accumulate", capture)
    engine.step(list(range(8)), loss_fn)
    samples = seen["samples"]
    # Opacus' hooks produce bf16 per-record gradients under autocast; what the norms are taken of is fp32.
    assert all(g.dtype == torch.float32 for g in samples)
    norms = torch.stack([g.reshape(len(g), -1).norm(dim=-1) for g in samples], dim=1).norm(dim=1)
    assert bool((norms > clip).all())
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    clipped = [g * factor.view(-1, *([1] * (g.dim() - 1))) for g in samples]
    record_norms = torch.stack([c.reshape(len(c), -1).norm(dim=-1) for c in clipped], dim=1).norm(dim=1)
    assert float(record_norms.max()) <= clip * (1 + 1e-6)
    for c, s in zip(clipped, seen["sums"]):  # the sum released is the sum of these fp32 clipped vectors
        assert s.dtype == torch.float32
        torch.testing.assert_close(s, c.sum(0), rtol=1e-5, atol=1e-9)
    assert all(p.dtype == torch.float32 for p in params)  # fp32 master weights


def test_bf16_noise_is_fp32_with_std_sigma_times_clip(cls_config):
    sigma, clip, seed = 1.3, 0.7, 11
    engine, params, loss_fn = _engine(cls_config, "bf16", clip, sigma, seed=seed)
    before = [p.detach().clone() for p in params]
    engine.step([], loss_fn)  # an empty Poisson batch: the update is the noise alone
    gen = torch.Generator().manual_seed(seed)
    for p, p0 in zip(params, before):
        noise = torch.normal(mean=0, std=sigma * clip, size=p.shape, generator=gen, dtype=torch.float32)
        assert p.dtype == torch.float32
        # SGD with lr 1: p = p0 - noise / expected batch (8), noise drawn in fp32 from the engine's generator
        torch.testing.assert_close(p0 - p, noise / 8, rtol=0, atol=1e-6)
    big = torch.normal(mean=0, std=sigma * clip, size=(200_000,), generator=torch.Generator().manual_seed(seed))
    assert math.isclose(float(big.std()), sigma * clip, rel_tol=0.01)


def test_fp16_fixed_loss_scale_is_divided_out_before_clipping(monkeypatch, cls_config):
    """The fixed fp16 loss scale (run here under CPU fp16 autocast) must not reach the norms: the per-record
    gradients clipped equal the fp32 run's up to half precision."""
    from fedslm.privacy import dpsgd

    got = {}
    real = dpsgd.DPOptimizer.clip_and_accumulate
    for precision in ("fp32", "fp16"):
        engine, _, loss_fn = _engine(cls_config, precision, clip=100.0, sigma=0.0)

        def capture(opt, precision=precision):
            got[precision] = torch.cat([opt._get_flat_grad_sample(p).reshape(8, -1) for p in opt.params], dim=1)
            real(opt)

        monkeypatch.setattr(dpsgd.DPOptimizer, "clip_and_accumulate", capture)
        engine.step(list(range(8)), loss_fn)
        engine.close()
    assert dev.loss_scale("fp16") > 1
    torch.testing.assert_close(got["fp16"], got["fp32"], rtol=0.05, atol=5e-3)


def test_the_adapter_state_is_always_cpu_fp32(cls_config):
    from fedslm.lora import get_adapter_state
    from fedslm.train.node import build_node

    node = build_node(cls_config())
    for q in node.model.parameters():
        if q.requires_grad:
            q.data = q.data.to(torch.bfloat16)  # whatever the model holds,
    state = get_adapter_state(node.model)  # what is sent and saved is fp32 on the CPU
    assert state and all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())


def test_fp16_on_the_cpu_is_refused_before_anything_is_charged(cls_config, tmp_path):
    from fedslm.privacy import Ledger
    from fedslm.train.local import round_spec, train_round
    from fedslm.train.node import build_node

    cfg = cls_config("train.precision=fp16")
    node = build_node(cfg)
    ledger = Ledger(tmp_path / "l.json")
    with pytest.raises(dev.DeviceError, match="train.precision: fp16 runs on CUDA only"):
        train_round(node.model, node.train, round_spec(cfg), unit="u", ledger=ledger)
    assert ledger.entries("u") == []


def test_dp_sgd_refuses_a_model_spread_over_devices(cls_config):
    from fedslm.lora.adapter import trained_head
    from fedslm.privacy.dpsgd import DPSGD, make_optimizer
    from fedslm.train.node import build_node

    node = build_node(cls_config())
    trained_head(node.model).to("meta")  # moved after wrapping: the other tensors stayed on the CPU
    params = [q for q in node.model.parameters() if q.requires_grad]
    with pytest.raises(ValueError, match=r"several devices \(cpu, meta\)"):
        DPSGD(node.model, optimizer=make_optimizer(params, "sgd", 0.1, 0.0), noise_multiplier=1.0, max_grad_norm=1.0,
              expected_batch_size=8, physical_batch_size=8)


def test_train_runs_on_the_device_it_is_given(tiny_bert_dir, class_csv, tmp_path):
    res = CliRunner().invoke(app, ["train", f"model.name={tiny_bert_dir}", "model.max_length=16",
                                   f"data.source={class_csv}", "lora.r=2", "train.batch_size=16",
                                   "train.physical_batch_size=8", "train.local_steps=2", "federation.rounds=1",
                                   "train.precision=bf16", f"output.dir={tmp_path / 'run'}", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "on cpu (bf16)" in res.output
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert saved and all(v.dtype == torch.float32 for v in saved.values())

"""Models and LoRA: offline loading, identical bases, only adapter tensors trained and shipped."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedslm.config.schema import ModelConfig
from fedslm.errors import ConfigError, ModelError
from fedslm.lora import get_adapter_state, set_adapter_state, trainable_parameters
from fedslm.models import load_base
from fedslm.privacy import Ledger
from fedslm.train import round_spec, build_node, evaluate, ledger_path, train_round


@pytest.mark.parametrize("fixture", ["cls_config", "causal_config"])
def test_only_adapter_and_head_are_trainable_and_shipped(request, fixture):
    node = build_node(request.getfixturevalue(fixture)())
    trainable = trainable_parameters(node.model)
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    state = get_adapter_state(node.model)
    assert len(state) == len(trainable)
    # Same tensors: PEFT's keys drop the adapter name and the modules_to_save wrapper.
    by_shape = sorted((tuple(v.shape), float(v.sum())) for v in state.values())
    assert by_shape == sorted((tuple(p.shape), float(p.detach().sum())) for p in trainable.values())
    assert all("base_layer" not in k and "original_module" not in k for k in state)
    if fixture == "cls_config":
        assert any("classifier" in k for k in state)


def test_base_weights_unchanged_and_adapter_folder_loads(cls_config, tiny_bert_dir, tmp_path):
    cfg = cls_config()
    node = build_node(cfg)
    frozen = {n: p.detach().clone() for n, p in node.model.named_parameters() if not p.requires_grad}
    adapter_before = get_adapter_state(node.model)
    train_round(node.model, node.train, round_spec(cfg), unit=cfg.privacy.unit, ledger=Ledger(ledger_path(cfg)))
    for n, p in node.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    adapter_after = get_adapter_state(node.model)
    assert any(not torch.equal(adapter_before[k], adapter_after[k]) for k in adapter_before)

    folder = tmp_path / "adapter"
    node.model.save_pretrained(folder)
    on_disk = load_file(folder / "adapter_model.safetensors")
    assert set(on_disk) == set(adapter_after)
    assert all(torch.equal(on_disk[k], adapter_after[k]) for k in on_disk)

    fresh = load_base(cfg.model, num_labels=len(node.data.labels))
    loaded = PeftModel.from_pretrained(fresh.model, folder)
    ref = evaluate(node.model, node.test, "classification")
    got = evaluate(loaded, node.test, "classification")
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)


def test_set_adapter_state_round_trip_and_rejects_wrong_payloads(cls_config):
    a, b = build_node(cls_config()), build_node(cls_config("train.seed=5"))
    state = {k: torch.randn_like(v) for k, v in get_adapter_state(a.model).items()}
    set_adapter_state(b.model, state)
    got = get_adapter_state(b.model)
    assert all(torch.equal(got[k], state[k]) for k in state)
    key = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        set_adapter_state(b.model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="unexpected"):
        set_adapter_state(b.model, {**state, "base_model.model.bert.embeddings.word_embeddings.weight": state[key]})
    with pytest.raises(ValueError, match="shape"):
        set_adapter_state(b.model, {**state, key: torch.zeros(1)})


def test_base_is_identical_on_every_node_and_fingerprinted(tiny_bert_dir):
    cfg = ModelConfig(name=str(tiny_bert_dir), task="classification")
    one, two = load_base(cfg, 3), load_base(cfg, 3)
    assert one.fingerprint == two.fingerprint
    for (n, p), (_, q) in zip(one.model.state_dict().items(), two.model.state_dict().items()):
        assert torch.equal(p, q), n
    other_head = load_base(ModelConfig(name=str(tiny_bert_dir), init_seed=1), 3)
    assert other_head.fingerprint != one.fingerprint
    assert load_base(cfg, 4).fingerprint != one.fingerprint


def test_missing_model_is_an_error_not_a_download(tmp_path):
    with pytest.raises(ModelError, match="neither a bundled preset .* nor a local model folder"):
        load_base(ModelConfig(name="sentence-transformers/all-MiniLM-L6-v2"), 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_base(ModelConfig(name=str(tmp_path / "empty")), 3)


def test_unknown_target_module_is_named(cls_config):
    with pytest.raises(ConfigError, match="lora.target_modules: no module named q_proj"):
        build_node(cls_config("lora.target_modules=[q_proj]"))


@pytest.mark.parametrize("fixture,overrides", [
    ("cls_config", ()), ("cls_config", ("lora.ffa=true",)), ("cls_config", ("lora.layers=1", "lora.head_bias=true")),
    ("causal_config", ()), ("causal_config", ("lora.ffa=true",)),
])
def test_adapter_state_is_pefts_own(request, fixture, overrides):
    """get/set_adapter_state and frozen_digest keep an index of the model's parameters instead of walking
    PEFT's state dict each time: they must read and write exactly what PEFT's functions do."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from fedslm.lora.adapter import frozen_digest

    model = build_node(request.getfixturevalue(fixture)(*overrides)).model
    frozen = {n.replace(".default.", ".") for n, p in model.named_parameters() if "lora_" in n and not p.requires_grad}
    peft = {k: v for k, v in get_peft_model_state_dict(model).items() if k not in frozen}
    ours = get_adapter_state(model)
    kept = {k: v.clone() for k, v in get_peft_model_state_dict(model).items() if k in frozen}
    assert list(ours) == list(peft) and all(torch.equal(ours[k], peft[k].float()) for k in peft)
    gen = torch.Generator().manual_seed(1)
    new = {k: torch.randn(v.shape, generator=gen) for k, v in ours.items()}
    set_adapter_state(model, new)
    after = get_peft_model_state_dict(model)
    assert all(torch.equal(after[k].float(), new[k].to(after[k].dtype).float()) for k in new)
    assert set(kept) == frozen and all(torch.equal(after[k], kept[k]) for k in frozen)  # FFA's A untouched
    set_peft_model_state_dict(model, {k: v * 2 for k, v in new.items()})  # written behind the index's back
    assert all(torch.equal(get_adapter_state(model)[k], (new[k] * 2).to(after[k].dtype).float()) for k in new)
    reference = __import__("hashlib").sha256()
    for key in sorted(frozen):
        reference.update(key.encode())
        reference.update(after[key].detach().contiguous().view(torch.uint8).numpy().tobytes())
    assert frozen_digest(model) == (reference.hexdigest() if frozen else "")

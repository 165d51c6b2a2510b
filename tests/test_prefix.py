"""The frozen-prefix cache (lora.layers) against the uncached model, the obviously correct reference:
same logits, same per-record gradients, the same DP round bit for bit; plus the cache file's
hygiene, the head-only adapter, seeded dropout and the label-name prior."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import randomise_lora
import torch
import torch.nn.functional as F

from fedslm.errors import ConfigError
from fedslm.lora import get_adapter_state
from fedslm.privacy import Ledger
from fedslm.train import prefix
from fedslm.train.local import round_spec, train_round
from fedslm.train.node import build_node


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(prefix.CACHE_ENV, str(tmp_path / "cache"))
    prefix._MEMORY.clear()




def _node(cls_config, layers, *extra):
    return build_node(cls_config("model.pooling=mean", f"lora.layers={layers}", *extra))


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_cached_logits_and_per_record_gradients_equal_the_uncached_models(cls_config, layers):
    node = _node(cls_config, layers)
    randomise_lora(node.model, which="lora_B")
    feats = node.train_features
    assert feats is not None and feats.layers == layers and len(feats) == len(node.train)
    suffix = prefix.Suffix(node.model, layers)
    node.model.eval()
    rows = [0, 3, 7, 11]
    from fedslm.data.tasks import get_task

    batch = get_task("classification").collate(node.train, rows)
    full = node.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    b = feats.batch(rows)
    cached = suffix(b["hidden"], b.get("attention_mask"))
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)
    params = [p for p in node.model.parameters() if p.requires_grad]
    for i in rows:  # each record's own gradient, both ways
        one = get_task("classification").collate(node.train, [i])
        g_full = torch.autograd.grad(F.cross_entropy(node.model(input_ids=one["input_ids"],
                                                                attention_mask=one["attention_mask"]).logits,
                                                     one["labels"]), params)
        c = feats.batch([i])
        g_cached = torch.autograd.grad(F.cross_entropy(suffix(c["hidden"], c.get("attention_mask")), c["labels"]),
                                       params)
        for a, e in zip(g_cached, g_full):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layers,extra", [(1, ()), (0, ()), (0, ("train.full_batch=true", "privacy.max_grad_norm=0.05")),
                                          (0, ("train.full_batch=true", "privacy.max_grad_norm=0.05",
                                               "lora.head_bias=false"))],
                         ids=["top-layer", "head-ghost-clipping", "head-full-batch-clipped", "head-without-bias"])
def test_a_dp_round_from_the_cache_is_the_uncached_round(cls_config, tmp_path, layers, extra):
    """Same seed, same batches, same clipping and noise: the adapters after one DP-SGD round agree
    (the head alone goes through fedslm.privacy.head_dpsgd, the uncached model through Opacus)."""
    states = []
    for use_cache, name in ((False, "a"), (True, "b")):
        node = _node(cls_config, layers, *extra)
        randomise_lora(node.model, which="lora_B")
        spec = round_spec(cls_config("model.pooling=mean", f"lora.layers={layers}", *extra))
        train_round(node.model, node.train, spec, unit="u", ledger=Ledger(tmp_path / f"{name}.json"),
                    features=node.train_features if use_cache else None)
        states.append(get_adapter_state(node.model))
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-4, atol=1e-6)


def test_head_only_trains_and_sends_the_classifier_alone(cls_config, tmp_path):
    node = _node(cls_config, 0)
    state = get_adapter_state(node.model)
    assert state and all("classifier" in k for k in state)
    before = {k: v.clone() for k, v in state.items()}
    cfg = cls_config("model.pooling=mean", "lora.layers=0")
    train_round(node.model, node.train, round_spec(cfg), unit="u", ledger=Ledger(tmp_path / "l.json"),
                features=node.train_features)
    after = get_adapter_state(node.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for name, p in node.model.named_parameters():
        if "lora_" in name:  # the inert LoRA PEFT needs: B = 0, frozen
            assert not p.requires_grad
            if "lora_B" in name:
                assert torch.count_nonzero(p) == 0


def test_a_head_without_bias_keeps_it_at_zero_and_clips_the_weights_alone(cls_config, tmp_path):
    """lora.head_bias=false: the bias is 0, untrained and unchanged by a DP round, and a record's
    clipped gradient is |e|·|x| (no +1 for a bias): with a clip bound above every such norm but below
    |e|·√(|x|²+1), nothing is clipped, so the update's signal is the plain sum."""
    from fedslm.lora.prior import trainable_head
    from fedslm.privacy.head_dpsgd import HeadDPSGD

    extra = ("train.full_batch=true", "lora.head_bias=false")
    node = _node(cls_config, 0, *extra)
    head = trainable_head(node.model)
    assert not head.bias.requires_grad and torch.count_nonzero(head.bias) == 0
    feats = node.train_features
    rows = list(range(len(feats)))
    x = feats.batch(rows)["hidden"]
    with torch.no_grad():
        e = torch.softmax(head(x), -1)
        e[torch.arange(len(e)), feats.batch(rows)["labels"]] -= 1
    bound = float((e.norm(dim=-1) * x.norm(dim=-1)).max()) * 1.01
    assert bound < float((e.norm(dim=-1) * (x.pow(2).sum(-1) + 1).sqrt()).max())
    w0 = head.weight.detach().clone()
    opt = torch.optim.SGD([head.weight], lr=1.0)
    engine = HeadDPSGD(head, torch.nn.Identity(), feats, optimizer=opt, noise_multiplier=0.0, max_grad_norm=bound,
                       expected_batch_size=len(rows), physical_batch_size=len(rows))
    engine.step(rows)
    torch.testing.assert_close(w0 - head.weight.detach(), e.T @ x / len(rows), rtol=1e-4, atol=1e-7)
    spec = round_spec(cls_config("model.pooling=mean", "lora.layers=0", *extra))
    train_round(node.model, node.train, spec, unit="u", ledger=Ledger(tmp_path / "l.json"), features=feats)
    assert torch.count_nonzero(head.bias) == 0


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_classifier_dropout_sets_what_a_training_step_drops(cls_config, p):
    """model.classifier_dropout=0: a training forward of the head equals the evaluation forward; a
    larger rate drops features (so the setting reaches the module the head reads through)."""
    node = _node(cls_config, 0, f"model.classifier_dropout={p}")
    suffix = prefix.Suffix(node.model, 0)
    hidden = node.train_features.batch(list(range(len(node.train_features))))["hidden"]
    suffix.eval()
    with torch.no_grad():
        evaluated = suffix(hidden, None)
        suffix.train()
        trained = suffix(hidden, None)
    assert suffix.dropout.p == p
    assert torch.equal(trained, evaluated) == (p == 0.0)


def test_the_cache_file_is_private_and_read_back_instead_of_recomputed(cls_config, tmp_path, monkeypatch):
    node = _node(cls_config, 1)
    files = list((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 2  # train and held-out
    assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700
    assert all(stat.S_IMODE(os.stat(f).st_mode) == 0o600 for f in files)
    prefix._MEMORY.clear()
    monkeypatch.setattr(prefix, "compute", lambda *a, **k: pytest.fail("recomputed a cached split"))
    again = prefix.split_features(node.model, node.base.fingerprint, node.train,
                                  cls_config("model.pooling=mean").model, 1)
    torch.testing.assert_close(again.hidden, node.train_features.hidden)
    # Another layout (pooling, normalisation, depth) is another file, never a stale read.
    assert prefix.cache_key(node.train, node.base.fingerprint, 1, {"normalize": True}) != \
        prefix.cache_key(node.train, node.base.fingerprint, 1, {"normalize": False})


def test_a_torn_cache_file_is_recomputed(cls_config, tmp_path):
    node = _node(cls_config, 0)
    for f in (tmp_path / "cache").glob("*.pt"):
        f.write_bytes(b"not a tensor file")
    prefix._MEMORY.clear()
    again = prefix.split_features(node.model, node.base.fingerprint, node.train,
                                  cls_config("model.pooling=mean").model, 0)
    torch.testing.assert_close(again.hidden, node.train_features.hidden)


def test_lora_layers_is_checked_and_named(cls_config, causal_config):
    with pytest.raises(ConfigError, match="lora.layers=3: this model has 2 encoder layers"):
        _node(cls_config, 3)
    with pytest.raises(ConfigError, match="lora.layers"):
        causal_config("lora.layers=0")  # a causal LM's output layer stays frozen: 1 or more decoder layers
    with pytest.raises(ConfigError, match="lora.layers must be a whole number"):
        cls_config("lora.layers=-1")


def test_dropout_is_seeded_with_the_noise_so_two_runs_are_bit_identical(cls_config, tmp_path):
    """LoRA dropout draws from torch's global generator; train_round seeds it from the noise seed."""
    states = []
    for name in ("a", "b"):
        cfg = cls_config("lora.dropout=0.5")
        node = build_node(cfg)
        torch.manual_seed(len(name) * 1000 + ord(name))  # whatever the global state was before
        train_round(node.model, node.train, round_spec(cfg), unit="u", ledger=Ledger(tmp_path / f"{name}.json"))
        states.append(get_adapter_state(node.model))
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_the_label_name_prior_is_each_names_normalised_embedding(cls_config):
    cfg = cls_config("model.pooling=mean", "model.normalize=true", "model.head_init=label-names",
                     "model.head_prior_scale=7")
    node = build_node(cfg)
    from fedslm.data.examples import ClassificationExample
    from fedslm.data.tasks import ClassificationTask
    from fedslm.lora.prior import trainable_head

    head = trainable_head(node.model)
    enc = ClassificationTask().encode([ClassificationExample(n, i) for i, n in enumerate(node.data.labels)],
                                      node.base.tokenizer, cfg.model.max_length)
    names = prefix.compute(node.model, enc, 0).hidden
    torch.testing.assert_close(head.weight, F.normalize(names, dim=-1) * 7)
    assert torch.count_nonzero(head.bias) == 0
    sent = get_adapter_state(node.model)  # it travels in the adapter
    torch.testing.assert_close(next(v for k, v in sent.items() if k.endswith("classifier.weight")), head.weight)


def test_features_past_the_byte_limit_are_not_cached_and_training_runs_whole(cls_config, tmp_path, monkeypatch):
    """A request for a deep prefix at a long max_length must not fill a node's memory or disk."""
    monkeypatch.setenv(prefix.MAX_BYTES_ENV, "1000")
    node = _node(cls_config, 1)
    assert node.train_features is None and not list((tmp_path / "cache").glob("*.pt"))


def test_the_cache_folder_keeps_its_newest_files_only(cls_config, tmp_path, monkeypatch):
    monkeypatch.setattr(prefix, "MAX_FILES", 3)
    for layers in (0, 1, 2):  # two splits each: six files written, three kept
        _node(cls_config, layers)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3


def test_the_cache_folder_and_memory_stay_within_the_byte_budget_and_purge_empties_it(cls_config, tmp_path,
                                                                                      monkeypatch):
    """Requests for many depths (each a file and an entry of its own) cannot fill a node's disk or memory: the
    folder's total and the in-memory cache's stay within $FEDSLM_CACHE_MAX_BYTES, the newest kept, and the
    CLI's purge deletes only the cache's own files."""
    from typer.testing import CliRunner

    from fedslm.cli.main import app

    _node(cls_config, 2)
    sizes = sorted(size for _, size, _ in prefix.cache_files())
    budget = sizes[-1] + sizes[0] + 1  # room for about two files, never for all of depths 0, 1 and 2
    monkeypatch.setenv(prefix.MAX_BYTES_ENV, str(budget))
    for layers in (0, 1, 2):
        _node(cls_config, layers)
        assert sum(size for _, size, _ in prefix.cache_files()) <= budget
        assert sum(f.nbytes() for f in prefix._MEMORY.values()) <= budget
    newest = prefix.cache_files()[0][0]
    assert prefix.cache_files() and len(prefix.cache_files()) < 6
    other = tmp_path / "cache" / "notes.pt"
    other.write_bytes(b"not ours")
    shown = CliRunner().invoke(app, ["cache", "show"])
    assert shown.exit_code == 0 and newest.name[:16] in shown.output
    purged = CliRunner().invoke(app, ["cache", "purge"])
    assert purged.exit_code == 0, purged.output
    assert prefix.cache_files() == [] and other.exists()


@pytest.mark.parametrize("scenario", sorted(str(p) for p in (ROOT / "simulations").glob("*.yaml")) +
                         sorted(str(p) for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_scenario_and_config_is_valid(scenario):
    """make run, make gemma and the documented scenarios load and validate (CI never runs them)."""
    from fedslm.config import load_config

    load_config([Path(scenario)])


def test_the_distributed_dp_overlay_is_valid_on_make_runs_scenario():
    """make run-distributed: the scenario with simulations/overlays/distributed-dp.yaml on top."""
    from fedslm.config import load_config

    cfg = load_config([ROOT / "simulations" / "icd10-hospitals.yaml",
                       ROOT / "simulations" / "overlays" / "distributed-dp.yaml"])
    assert cfg.federation.secagg.distributed_noise and cfg.privacy.distributed.honest == cfg.federation.min_clients


def test_head_only_rounds_draw_secure_noise_when_asked(cls_config, tmp_path):
    """Deployed nodes require OS-CSPRNG noise by default; the head-only engine honours it."""
    cfg = cls_config("model.pooling=mean", "lora.layers=0", "privacy.noise_seed=null", "privacy.secure_mode=true",
                     "train.full_batch=true")
    node = build_node(cfg)
    before = get_adapter_state(node.model)
    res = train_round(node.model, node.train, round_spec(cfg), unit="u", ledger=Ledger(tmp_path / "l.json"),
                      features=node.train_features)
    assert res.noise_source.startswith("OS CSPRNG") and 0 < res.epsilon <= cfg.privacy.target_epsilon + 1e-6
    after = get_adapter_state(node.model)
    assert all(torch.isfinite(v).all() for v in after.values()) and any(
        not torch.equal(before[k], after[k]) for k in before)


def test_a_record_whose_gradient_overflows_contributes_nothing(cls_config, tmp_path):
    """A request can push some records' logits to inf (huge weights); their gradients are NaN. Such a
    record is zeroed (within the clipping bound), so the release never turns NaN on a data condition."""
    cfg = cls_config("model.pooling=mean", "lora.layers=0", "train.full_batch=true")
    node = build_node(cfg)
    feats = prefix.Features(node.train_features.hidden.clone(), None, node.train_features.labels, 0)
    feats.hidden[0] = float("inf")
    train_round(node.model, node.train, round_spec(cfg), unit="u", ledger=Ledger(tmp_path / "l.json"),
                features=feats)
    assert all(torch.isfinite(v).all() for v in get_adapter_state(node.model).values())


def test_opacus_path_zeroes_non_finite_per_record_gradients():
    from types import SimpleNamespace

    from fedslm.privacy.dpsgd import _zero_nonfinite_records

    a = torch.nn.Parameter(torch.zeros(2, 3))
    b = torch.nn.Parameter(torch.zeros(3))
    a.grad_sample = torch.ones(4, 2, 3)
    b.grad_sample = torch.ones(4, 3)
    a.grad_sample[1, 0, 0] = float("nan")
    b.grad_sample[2, 1] = float("inf")
    opt = SimpleNamespace(params=[a, b], _get_flat_grad_sample=lambda p: p.grad_sample)
    _zero_nonfinite_records(opt)
    for p in (a, b):
        assert torch.isfinite(p.grad_sample).all()
        assert p.grad_sample[1].abs().sum() == 0 and p.grad_sample[2].abs().sum() == 0
        assert p.grad_sample[0].abs().sum() > 0 and p.grad_sample[3].abs().sum() > 0


def test_lora_below_the_cached_prefix_is_refused(cls_config):
    """PEFT lets an exact module path past layers_to_transform; LoRA there would change the cached prefix."""
    with pytest.raises(ConfigError, match="outside the top lora.layers=1"):
        _node(cls_config, 1, "lora.target_modules=[bert.encoder.layer.0.attention.self.query,query]")


def test_request_levers_for_overflow_are_bounded(cls_config):
    with pytest.raises(ConfigError, match="train.lr × train.weight_decay must be < 1"):
        cls_config("train.lr=1e-20", "train.weight_decay=2e30")
    with pytest.raises(ConfigError, match="lora.alpha / lora.r must be <= 256"):
        cls_config("lora.alpha=1e30")


def test_head_bias_false_is_refused_for_a_head_without_one_linear_bias(cls_config):
    """lora.head_bias: false freezes the final linear head's bias; a head it cannot do that for is
    refused naming the key, never silently left trainable (or a hidden layer's bias frozen)."""
    from torch import nn

    from fedslm.lora import wrap
    from fedslm.models import load_base

    cfg = cls_config("model.pooling=mean", "lora.layers=0", "lora.head_bias=false")
    base = load_base(cfg.model, 3)
    base.model.classifier = nn.Linear(base.model.classifier.in_features, 3, bias=False)
    with pytest.raises(ConfigError, match="lora.head_bias"):
        wrap(base.model, cfg.lora, "classification", base.target_modules, seed=0)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("order", ["every record in order", "a shuffled subset"])
def test_the_head_engine_sums_what_clipping_each_record_alone_gives(bias, order):
    """HeadDPSGD's clipped sum (no noise) against the obvious reference: each record's gradient e xᵀ
    (and e), clipped on its own, summed; records whose vector holds NaN or ±inf, or whose square
    overflows, contribute nothing. Both the full-batch path (the cached rows themselves) and a gathered
    batch are checked."""
    from fedslm.privacy.head_dpsgd import HeadDPSGD

    torch.manual_seed(3)
    n, d, c, clip = 40, 6, 4, 0.3
    hidden = torch.nn.functional.normalize(torch.randn(n, d), dim=-1) * torch.rand(n, 1) * 3
    hidden[2, 1], hidden[5, 0], hidden[7] = float("nan"), float("-inf"), 1e25
    labels = torch.randint(0, c, (n,))
    feats = prefix.Features(hidden, None, labels, 0)
    rows = list(range(n)) if order == "every record in order" else torch.randperm(n)[:25].tolist()
    head = torch.nn.Linear(d, c, bias=bias)
    w0, b0 = head.weight.detach().clone(), head.bias.detach().clone() if bias else None
    expect_w, expect_b = torch.zeros(c, d), torch.zeros(c)
    for i in rows:
        x = hidden[i]
        if not torch.isfinite(x).all() or not torch.isfinite(x.square().sum()):
            continue
        e = torch.softmax(w0 @ x + (b0 if bias else 0.0), -1)
        e[labels[i]] -= 1
        g_w, g_b = torch.outer(e, x), e
        norm = torch.sqrt(g_w.square().sum() + (g_b.square().sum() if bias else 0.0))
        scale = min(1.0, clip / (float(norm) + 1e-6))
        expect_w += scale * g_w
        expect_b += scale * g_b
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    engine = HeadDPSGD(head, torch.nn.Identity(), feats, optimizer=opt, noise_multiplier=0.0, max_grad_norm=clip,
                       expected_batch_size=len(rows), physical_batch_size=16)
    engine.step(rows)
    torch.testing.assert_close((w0 - head.weight.detach()) * len(rows), expect_w, rtol=1e-4, atol=1e-6)
    if bias:
        torch.testing.assert_close((b0 - head.bias.detach()) * len(rows), expect_b, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(hidden[0]).all() and torch.isnan(hidden[2, 1])  # the cache itself is untouched


def test_a_full_batch_of_cached_vectors_is_the_cache_and_any_other_batch_its_rows():
    hidden, labels = torch.randn(5, 3), torch.arange(5)
    feats = prefix.Features(hidden, None, labels, 0)
    whole = feats.batch(range(5))
    assert whole["hidden"] is hidden and whole["labels"] is labels
    for rows in ([4, 3, 2, 1, 0], [0, 1, 2, 3], [0, 0, 1, 2, 3]):
        got = feats.batch(rows)
        assert torch.equal(got["hidden"], hidden[rows]) and torch.equal(got["labels"], labels[rows])


@pytest.mark.parametrize("layers", [0, 1])
def test_bf16_vectors_are_fp32_tensors_close_to_the_fp32_ones_and_leave_the_model_alone(cls_config, layers):
    node = _node(cls_config, layers)
    exact = prefix.compute(node.model, node.train, layers).hidden
    fast = prefix.compute(node.model, node.train, layers, precision="bf16").hidden
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    assert not torch.equal(fast, exact)  # computed another way
    flat = (lambda t: t.reshape(len(t), -1))
    assert F.cosine_similarity(flat(fast), flat(exact), dim=-1).min() > 0.99
    assert all(p.dtype == torch.float32 for p in node.model.parameters())
    with pytest.raises(ValueError, match="fp32 or bf16"):
        prefix.compute(node.model, node.train, layers, precision="fp16")


def test_auto_feature_precision_is_bf16_only_where_the_cpu_has_it_and_keys_its_own_cache(cls_config, monkeypatch,
                                                                                     tmp_path):
    from fedslm import cpu

    monkeypatch.setattr(cpu, "has_native_bf16", lambda: False)
    auto = cls_config("model.pooling=mean", "lora.layers=0", "model.feature_precision=auto")
    assert prefix.layout_of(auto.model) == prefix.layout_of(cls_config("model.pooling=mean").model)
    node = build_node(auto)
    monkeypatch.setattr(cpu, "has_native_bf16", lambda: True)
    assert prefix.layout_of(auto.model)["precision"] == "bf16"
    assert "precision" not in prefix.layout_of(cls_config("model.pooling=mean", "model.feature_precision=fp32").model)
    fp32 = prefix.split_features(node.model, node.base.fingerprint, node.train,
                                 cls_config("model.pooling=mean").model, 0, folder=tmp_path)
    bf16 = prefix.split_features(node.model, node.base.fingerprint, node.train, auto.model, 0, folder=tmp_path)
    assert not torch.equal(fp32.hidden, bf16.hidden)  # each precision its own file, never the other's
    fp, enc = node.base.fingerprint, node.train
    assert prefix.cache_key(enc, fp, 0, prefix.layout_of(auto.model)) != prefix.cache_key(
        enc, fp, 0, prefix.layout_of(cls_config("model.pooling=mean").model))
    with pytest.raises(ConfigError, match="model.feature_precision"):
        cls_config("model.feature_precision=bf16")


@pytest.mark.parametrize("text, native", [("flags : fpu sse avx512f avx512_bf16 x", True),
                                          ("flags : fpu amx_bf16 amx_tile", True),
                                          ("flags : fpu sse avx2 avx512f", False), (None, False)])
def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, text, native):
    from fedslm import cpu

    class FakePath:
        def __init__(self, *_):
            pass

        def read_text(self, **_):
            if text is None:
                raise OSError("no /proc here")
            return text

    monkeypatch.setattr(cpu, "Path", FakePath)
    assert cpu.has_native_bf16.__wrapped__() is native


def test_a_full_batch_of_vectors_just_computed_trains_through_autograd(cls_config):
    """compute() runs in inference mode; its vectors must still reach an autograd engine (Opacus, FedProx,
    a non-private round) as ordinary tensors when a full-batch step asks for every record in order."""
    node = _node(cls_config, 0)
    fresh = prefix.compute(node.model, node.train, 0)
    assert fresh.hidden.is_inference()
    hidden = fresh.batch(range(len(fresh)))["hidden"]
    assert not hidden.is_inference()
    head = torch.nn.Linear(hidden.shape[1], 2)
    head(F.dropout(hidden, 0.0, True)).sum().backward()
    assert head.weight.grad is not None

"""Speed work that must not change results: the simulation's one shared feature pass gives each simulated
institution the features it would compute itself, and runs once; the deployment grid's polling with
backoff returns what Flower's grid would (tested against a fake grid)."""

from __future__ import annotations

import pytest
import torch

from fedslm.config import to_yaml
from fedslm.coordinator.polling import MAX_DELAY
from fedslm.node import serve
from fedslm.node.plan import NodeContext
from fedslm.simulation.simulate import check_data, warm_features
from fedslm.train import prefix
from fedslm.wire.codec import Request


pytestmark = pytest.mark.usefixtures("own_feature_cache")


def _counted(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = prefix.compute

    def compute(model, enc, layers, *args, **kwargs):
        calls.append(len(enc))
        return real(model, enc, layers, *args, **kwargs)

    monkeypatch.setattr(prefix, "compute", compute)
    return calls


def _institution_features(cfg, institution: int):
    """What simulated institution ``institution``'s ClientApp computes: its share, its model, its splits' features."""
    plan, inst = _institution(cfg, institution)
    return [serve._features(plan, inst, enc) for enc in (inst.train, inst.test)]


def _institution(cfg, institution: int):
    from fedslm.lora.adapter import frozen_digest

    plan = serve.round_plan(Request(1, to_yaml(cfg), "", "run", 0.0, None, 0),
                            NodeContext(institution=institution, num_institutions=cfg.federation.num_clients,
                                        policy=None))
    from fedslm.node import institution as node_institution

    _, model = node_institution._base_and_model(plan, 3)
    return plan, serve.build_institution(plan, Request(1, to_yaml(cfg), "", "run", 0.0, None, 0,
                                                       frozen_digest=frozen_digest(model)))


def test_simulated_institutions_get_their_own_features_from_one_shared_pass(cls_config, monkeypatch):
    cfg = cls_config("model.pooling=mean", "lora.layers=0", "federation.num_clients=3")
    # The reference: each institution computing its own features (no pool).
    own = {i: _institution_features(cfg, i) for i in range(3)}
    prefix._MEMORY.clear()
    for f, _, _ in prefix.cache_files():
        f.unlink()
    calls = _counted(monkeypatch)
    whole = check_data(cfg)
    count = warm_features(cfg, whole)
    assert count is not None and 0 < count <= len(whole.train) + len(whole.test)
    assert len(calls) == 1  # one pass over every record of the scenario
    for i in range(3):
        prefix._MEMORY.clear()  # each institution in a fresh process, as a Ray actor may be
        shared = _institution_features(cfg, i)
        for mine, theirs in zip(shared, own[i]):
            assert mine is not None and len(mine) == len(theirs)
            torch.testing.assert_close(mine.hidden, theirs.hidden, rtol=1e-5, atol=1e-6)
            assert torch.equal(mine.labels, theirs.labels)
    assert len(calls) == 1  # no institution ran the base itself
    # A second simulation on a warm cache computes nothing.
    warm_features(cfg, whole)
    assert len(calls) == 1


def test_a_record_the_shared_pass_did_not_see_is_computed_by_its_node(cls_config, monkeypatch):
    cfg = cls_config("model.pooling=mean", "lora.layers=0", "federation.num_clients=2")
    whole = check_data(cfg)
    warm_features(cfg, whole)
    calls = _counted(monkeypatch)
    node = _institution_features(cfg, 0)[0]
    assert calls == []
    from fedslm.data.tasks import Encoded

    _, inst = _institution(cfg, 0)
    changed = Encoded([list(ids) for ids in inst.train.input_ids], list(inst.train.targets), inst.train.pad_id)
    changed.input_ids[0] = changed.input_ids[0][:-1] + [changed.input_ids[0][1]] + changed.input_ids[0][-1:]
    prefix._MEMORY.clear()
    feats = prefix.split_features(inst.model, inst.base.fingerprint, changed, cfg.model, 0)
    assert calls == [len(changed)]  # not served from the pool: the whole split is computed afresh
    torch.testing.assert_close(feats.hidden[1:], node.hidden[1:], rtol=1e-5, atol=1e-6)


def test_other_depths_and_a_foreign_pool_file_are_left_to_the_nodes(cls_config, tmp_path):
    cfg = cls_config("model.pooling=mean", "lora.layers=1")
    assert warm_features(cfg, check_data(cfg)) is None
    cfg = cls_config("model.pooling=mean", "lora.layers=0")
    warm_features(cfg, check_data(cfg))
    (pool,) = [f for f, _, _ in prefix.cache_files()]
    torch.save({"hidden": torch.zeros(3, 4), "digests": torch.zeros(2, 32, dtype=torch.uint8), "layers": 0}, pool)
    prefix._MEMORY.clear()
    feats = _institution_features(cfg, 0)[0]
    assert feats is not None and feats.hidden.shape[1] != 4  # computed, not read from the malformed pool


def test_a_warm_pool_is_not_checked_again_until_its_records_base_or_file_change(cls_config, monkeypatch):
    """warm_features remembers the pool it computed or checked: the next simulation of the same records on
    the same base files does not load the base or tokenize (seconds of every warm run); a changed record, a
    replaced pool file or a touched base file is checked (and computed) again."""
    import os

    from fedslm import models
    from fedslm.simulation import preflight

    cfg = cls_config("model.pooling=mean", "lora.layers=0", "federation.num_clients=2")
    whole = check_data(cfg)
    count = warm_features(cfg, whole)
    assert count is not None and (prefix.cache_dir() / preflight.POOL_MEMO).is_file()
    loads: list[int] = []
    real = models.load_base
    monkeypatch.setattr(models, "load_base", lambda *a, **k: loads.append(1) or real(*a, **k))
    assert warm_features(cfg, whole) == count and loads == []  # remembered
    import json as _json

    memo = prefix.cache_dir() / preflight.POOL_MEMO
    kept = memo.read_text()
    name = _json.loads(kept)["pool"]
    for elsewhere in (f"../{memo.parent.name}/{name}", str(memo.parent / name)):  # the same file, by other paths
        memo.write_text(_json.dumps(dict(_json.loads(kept), pool=elsewhere)))
        assert preflight._pool_known(memo, preflight._pool_signature(cfg, whole)) is None  # only a name here
    memo.write_text(kept)
    assert preflight._pool_known(memo, preflight._pool_signature(cfg, whole)) == count
    memo.write_text(kept)
    (pool,) = [f for f, _, _ in prefix.cache_files()]
    data = torch.load(pool, weights_only=True)
    pool.unlink()
    torch.save(data, pool)  # the same rows, another file: checked again, then remembered again
    assert warm_features(cfg, whole) == count and loads == [1]
    assert warm_features(cfg, whole) == count and loads == [1]
    changed = check_data(cfg)
    changed.test[0] = type(changed.test[0])(**{**changed.test[0].__dict__, "text": "cough " + changed.test[0].text})
    calls = _counted(monkeypatch)
    assert warm_features(cfg, changed) == count and loads == [1, 1] and len(calls) == 1  # computed
    weights = next(p for p in preflight._base_files(cfg) if p.suffix in (".safetensors", ".bin"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert warm_features(cfg, changed) == count and loads == [1, 1, 1]  # checked, nothing computed
    assert len(calls) == 1


# --- deployment polling ------------------------------------------------------------------------------------

class _Clock:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


class _Reply:
    def __init__(self, to: str):
        from types import SimpleNamespace

        self.metadata = SimpleNamespace(reply_to_message_id=to)


class _FakeGrid:
    """Replies to message i arrive on pull number ``arrive[i]`` (None: never); a marker attribute passes through."""

    marker = "inner"

    def __init__(self, arrive):
        self.arrive = arrive
        self.pulls = 0
        self.pushed: list[str] = []

    def push_messages(self, messages):
        self.pushed = [f"m{i}" for i, _ in enumerate(messages)]
        return list(self.pushed)

    def pull_messages(self, ids):
        self.pulls += 1
        ids = set(ids)
        return [_Reply(m) for m, at in zip(self.pushed, self.arrive) if at == self.pulls and m in ids]

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("the wrapper polls itself")


def _polling(arrive):
    from fedslm.coordinator.polling import PollingGrid

    clock, fake = _Clock(), _FakeGrid(arrive)
    return PollingGrid(fake, clock=clock.time, sleep=clock.sleep), fake, clock


def test_polling_returns_as_soon_as_the_last_reply_arrives_with_backoff_from_milliseconds():
    grid, fake, clock = _polling([3, 6])
    replies = grid.send_and_receive(["a", "b"], timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert fake.pulls == 6  # not one pull more once both replies are in
    # 5 ms doubling, back to 5 ms after a reply arrives, far below Flower's 3 s per poll
    assert clock.sleeps == pytest.approx([0.005, 0.01, 0.005, 0.005, 0.01])
    grid, fake, clock = _polling([40])
    grid.send_and_receive(["a"], timeout=None)  # None waits for every reply, as Flower's grid does
    assert fake.pulls == 40 and max(clock.sleeps) == MAX_DELAY  # capped


def test_polling_respects_the_timeout_and_returns_the_partial_replies():
    grid, fake, clock = _polling([2, None, 5])
    replies = grid.send_and_receive(["a", "b", "c"], timeout=2.0)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m2"]
    assert clock.now == pytest.approx(2.0)  # waited to the deadline, not a poll interval past it
    assert all(s <= MAX_DELAY for s in clock.sleeps)


def test_polling_is_transparent_under_the_secure_aggregation_grid():
    from fedslm.coordinator.secagg import SecureAggregationGrid

    grid, fake, _ = _polling([1])
    secure = SecureAggregationGrid(grid, cfg=None, recorder=None)
    assert secure.marker == "inner"  # attributes reach the real grid through both wrappers
    from types import SimpleNamespace

    msg = SimpleNamespace(metadata=SimpleNamespace(message_type="evaluate"))
    replies = secure.send_and_receive([msg], timeout=5)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"] and fake.pulls == 1


def test_a_deployed_nodes_own_cache_folder_never_reads_the_simulations_pool(cls_config, tmp_path, monkeypatch):
    cfg = cls_config("model.pooling=mean", "lora.layers=0", "federation.num_clients=2")
    warm_features(cfg, check_data(cfg))
    _, inst = _institution(cfg, 0)
    prefix._MEMORY.clear()
    calls = _counted(monkeypatch)
    own = tmp_path / "node" / "fedslm-features"  # where a deployed node keeps its cache (beside its ledger)
    prefix.split_features(inst.model, inst.base.fingerprint, inst.train, cfg.model, 0, folder=own)
    assert calls == [len(inst.train)] and len(prefix.cache_files(own)) == 1


def _reference_key(enc, fingerprint, layers, layout) -> str:
    """The cache key as first written: a byte loop over every token id (obviously right, slow)."""
    import hashlib
    import json

    h = hashlib.sha256()
    h.update(json.dumps({"fingerprint": fingerprint, "layers": layers, "layout": layout, "pad": enc.pad_id,
                         "v": 1}, sort_keys=True).encode())
    for ids in enc.input_ids:
        h.update(len(ids).to_bytes(4, "little"))
        h.update(b"".join(int(t).to_bytes(4, "little") for t in ids))
    h.update(json.dumps(list(map(int, enc.targets))).encode())
    return h.hexdigest()


def test_the_feature_cache_key_is_the_byte_loops_so_existing_caches_stay_valid():
    from fedslm.data.tasks import Encoded

    gen = torch.Generator().manual_seed(0)
    records = [torch.randint(0, 2**31, (int(n),), generator=gen).tolist()
               for n in torch.randint(0, 40, (300,), generator=gen)]
    records[5] = []  # an empty record still frames its length
    records[7] = [0, 2**32 - 1]
    for input_ids in (records, records[:1], []):
        enc = Encoded(input_ids, [i % 7 for i in range(len(input_ids))], 0)
        assert prefix.cache_key(enc, "f" * 64, 0, {"pool": "mean"}) == _reference_key(enc, "f" * 64, 0, {"pool": "mean"})
    enc = Encoded(records, [0] * len(records), 0)
    prefix.cache_key(enc, "f", 0, {})
    enc.input_ids, enc.targets = records[:2], [0, 0]  # the key kept on the split follows a new list of records
    assert prefix.cache_key(enc, "f", 0, {}) == _reference_key(enc, "f", 0, {})
    moved = Encoded([[1, 2], [3]], [0, 0], 0)  # the same ids framed differently hash differently
    assert prefix.cache_key(moved, "f", 0, {}) != prefix.cache_key(Encoded([[1], [2, 3]], [0, 0], 0), "f", 0, {})
    with pytest.raises(ValueError):
        prefix.cache_key(Encoded([[-1]], [0], 0), "f", 0, {})


def test_a_parsed_request_config_is_the_callers_own_copy(cls_config):
    from fedslm.node.request_config import parse_request_config

    text = to_yaml(cls_config())
    first = parse_request_config(text)
    first.train.lr = -1.0  # a caller that derives its plan in place
    first.data.labels = ["changed"]
    second = parse_request_config(text)
    assert second.train.lr != -1.0 and second.data.labels != ["changed"]
    assert second == parse_request_config(text) and second is not parse_request_config(text)


def test_a_remembered_epsilon_is_the_composed_one():
    from fedslm.privacy import accountant

    history = [(1.1, 0.5, 3), (0.9, 0.25, 4), (1.1, 0.5, 2)]
    for name in ("rdp", "prv"):
        accountant._composed.cache_clear()
        fresh = accountant.epsilon(history, 1e-5, name)
        assert accountant.epsilon(list(reversed(history)), 1e-5, name) == pytest.approx(fresh, rel=1e-9)
        hits = accountant._composed.cache_info().hits
        assert accountant.epsilon(history, 1e-5, name) == fresh  # remembered
        assert accountant._composed.cache_info().hits == hits + 1
        assert accountant.epsilon(history, 1e-6, name) > fresh  # δ is part of the key
        assert accountant.epsilon([*history, (1.1, 0.5, 1)], 1e-5, name) > fresh  # so is every step
    assert accountant.epsilon([(0.0, 0.5, 1)], 1e-5, "prv") == float("inf")


def test_a_process_reads_the_pool_once_for_every_split_and_again_once_it_is_replaced(cls_config, monkeypatch):
    from fedslm.train import feature_pool

    cfg = cls_config("model.pooling=mean", "lora.layers=0", "federation.num_clients=2")
    whole = check_data(cfg)
    warm_features(cfg, whole)
    reads: list[str] = []
    real = feature_pool._read_pool_file
    monkeypatch.setattr(feature_pool, "_read_pool_file", lambda path: reads.append(path.name) or real(path))
    feature_pool._LAST_POOL.clear()
    first = [_institution_features(cfg, i) for i in range(2)]
    assert len(reads) == 1  # four splits, one read
    pool = next(p for p, _, _ in prefix.cache_files() if p.name == reads[0])
    data = torch.load(pool, weights_only=True)
    data["hidden"] = data["hidden"] + 1.0  # a pass rewritten (say, over changed records): a new file
    prefix._write_tensors(pool, data)
    prefix._MEMORY.clear()
    again = _institution_features(cfg, 0)
    assert len(reads) == 2
    torch.testing.assert_close(again[0].hidden, first[0][0].hidden + 1.0)


def test_flwr_run_gets_the_same_bundle_from_the_staged_app_folder(tmp_path):
    """`flwr run` walks every file of the folder it is given (a project's .venv: seconds) before applying
    fab-include: simulate hands it a folder of the bundle's files only, and the bundle must be the same."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    from fedslm.simulation.simulate import SimulationError, app_bundle

    root = tmp_path / "project"
    for rel, text in {"clients/app.py": "app = 1\n", "server/app.py": "app = 2\n", "configs/a/b.yaml": "x: 1\n",
                      "simulations/s.yaml": "y: 2\n", "fedslm/core.py": "# not in the bundle\n",
                      ".venv/lib/site.py": "# an environment\n", "clients/__pycache__/app.cpython-311.pyc": "",
                      ".gitignore": ".venv/\n__pycache__/\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / "pyproject.toml").write_text(
        '[project]\nname = "demo"\nversion = "1.0.0"\n\n[tool.flwr.app]\npublisher = "demo"\n'
        'fab-include = ["clients/*.py", "server/*.py", "configs/**/*.yaml", "simulations/*.yaml"]\n\n'
        '[tool.flwr.app.components]\nserverapp = "server.app:app"\nclientapp = "clients.app:app"\n', encoding="utf-8")
    staged = app_bundle(root, tmp_path / "staged")
    assert not (staged / ".venv").exists() and not (staged / "fedslm").exists()
    whole, small = (zipfile.ZipFile(io.BytesIO(build_fab_from_disk(p))) for p in (root, staged))
    assert sorted(whole.namelist()) == sorted(small.namelist())
    assert "clients/app.py" in whole.namelist() and "configs/a/b.yaml" in whole.namelist()
    assert all(whole.read(n) == small.read(n) for n in whole.namelist())
    # Staging again replaces what was there (a file dropped from the project is dropped from the bundle).
    (root / "simulations/s.yaml").unlink()
    assert not (app_bundle(root, tmp_path / "staged") / "simulations/s.yaml").exists()
    (root / "pyproject.toml").write_text('[tool.flwr.app]\npublisher = "demo"\n', encoding="utf-8")
    with pytest.raises(SimulationError, match="fab-include"):
        app_bundle(root, tmp_path / "staged")


def test_a_simulations_in_memory_grid_is_polled_at_most_20_ms_apart_and_a_superlink_at_half_a_second():
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from fedslm.coordinator.polling import IN_MEMORY_MAX_DELAY, MAX_DELAY, polling_grid

    assert polling_grid(InMemoryGrid.__new__(InMemoryGrid)).max_delay == IN_MEMORY_MAX_DELAY == 0.02
    assert polling_grid(_FakeGrid([None])).max_delay == MAX_DELAY == 0.1
    grid, fake, clock = _polling([None])
    grid.max_delay = IN_MEMORY_MAX_DELAY
    assert grid.send_and_receive(["a"], timeout=1) == []
    assert max(clock.sleeps) == pytest.approx(0.02) and sum(clock.sleeps) == pytest.approx(1.0)


def test_the_simulation_engines_message_queue_is_polled_every_10_ms_and_still_stops_at_once():
    """Flower's add_messages_to_queue thread waits 0.1 s on its stop event between looks for messages; the
    ServerApp caps that event's timed waits (found through the thread, as in Flower's engine)."""
    import threading
    import time as _time

    from fedslm.coordinator.polling import SIMULATION_QUEUE_POLL, quicken_simulation_queue

    looks: list[float] = []
    stop = threading.Event()

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop):  # Flower's name and signature
        while not f_stop.is_set():
            looks.append(_time.monotonic())
            f_stop.wait(0.1)

    assert quicken_simulation_queue() is False  # no engine in this process: nothing to do
    from fedslm.coordinator.polling import PollingGrid

    early = PollingGrid(_FakeGrid([1]), simulation=True)
    early.send_and_receive(["a"], timeout=1)
    assert early._quicken is True  # not there yet: the next exchange looks again
    thread = threading.Thread(target=add_messages_to_queue, args=(None, None, {}, stop), daemon=True)
    thread.start()
    try:
        from fedslm.coordinator.polling import PollingGrid

        grid = PollingGrid(_FakeGrid([1]), simulation=True)  # the ServerApp's grid finds the engine's thread
        grid.send_and_receive(["a"], timeout=1)
        assert grid._quicken is False  # found: not looked for again
        assert quicken_simulation_queue() is True  # again: the same cap, not a wrapper of a wrapper
        _time.sleep(0.5)
        gaps = [b - a for a, b in zip(looks[-20:], looks[-19:])]
        assert len(looks) > 10 and sorted(gaps)[len(gaps) // 2] < 0.05 and SIMULATION_QUEUE_POLL == 0.01
        assert stop.wait(0.0) is False  # a timed wait still times out
        started = _time.monotonic()
        stop.set()
        thread.join(1)
        assert not thread.is_alive() and _time.monotonic() - started < 0.5 and stop.wait() is True
    finally:
        stop.set()

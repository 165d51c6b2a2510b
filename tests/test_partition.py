"""Partitioners (flwr-datasets) and the local-only comparison."""

from __future__ import annotations

import collections

import pytest

from fedslm.config import load_config
from fedslm.config.schema import FederationConfig
from fedslm.data import load_task_data
from fedslm.data.partition import institution_data, partition_indices
from fedslm.errors import ConfigError
from fedslm.simulation.compare import local_baselines
from fedslm.privacy import Ledger


def test_iid_and_dirichlet_cover_the_data_once(class_csv):
    data = load_task_data(load_config(overrides=[f"data.source={class_csv}"]).data, "classification")
    for fed in (FederationConfig(num_clients=3, partitioner="iid"),
                FederationConfig(num_clients=3, partitioner="dirichlet", dirichlet_alpha=0.3)):
        parts = partition_indices(data.train, fed)
        flat = [i for p in parts for i in p.indices]
        assert sorted(flat) == list(range(len(data.train)))  # every record in exactly one institution
    assert partition_indices(data.train, fed) == partition_indices(data.train, fed)  # seeded


def test_dirichlet_skews_labels_and_iid_does_not():
    data = load_task_data(load_config().data, "classification")
    def skew(fed):
        parts = partition_indices(data.train, fed)
        top = []
        for p in parts:
            counts = collections.Counter(data.train[i].label for i in p.indices)
            top.append(counts.most_common(1)[0][1] / len(p.indices))
        return max(top)
    assert skew(FederationConfig(num_clients=5, partitioner="dirichlet", dirichlet_alpha=0.1)) > \
        skew(FederationConfig(num_clients=5, partitioner="iid")) + 0.1


def test_column_partitioner_one_institution_per_value(tmp_path):
    path = tmp_path / "multi.csv"
    rows = ["text,label,hospital"] + [f"fever cough {i},resp,{h}" for i, h in enumerate("ABC" * 10)] + \
        [f"arm bone {i},ortho,{h}" for i, h in enumerate("AB" * 10)]
    path.write_text("\n".join(rows) + "\n")
    cfg = load_config(overrides=[f"data.source={path}"])
    data = load_task_data(cfg.data, "classification", group_column="hospital")
    fed = FederationConfig(num_clients=3, partitioner="column", partition_column="hospital")
    parts = partition_indices(data.train, fed)
    assert sorted(p.name for p in parts) == ["A", "B", "C"]
    for p in parts:
        assert {data.train[i].group for i in p.indices} == {p.name}
    with pytest.raises(ConfigError, match="has 3 distinct values; set federation.num_clients=3"):
        partition_indices(data.train, FederationConfig(num_clients=2, partitioner="column", partition_column="hospital"))


def test_institution_split_is_disjoint_and_capped(class_csv):
    data = load_task_data(load_config(overrides=[f"data.source={class_csv}"]).data, "classification")
    fed = FederationConfig(num_clients=2, partitioner="iid")
    inst = institution_data(data, fed, 1, 0.25, 0, max_test=5)
    assert len(inst.test) == 5
    assert not set(map(id, inst.test)) & set(map(id, inst.train))
    assert inst.dataset_id != institution_data(data, fed, 0, 0.25, 0).dataset_id


def test_local_only_baseline_uses_a_separate_ledger(cls_config, tmp_path):
    cfg = cls_config("federation.num_clients=2", "federation.partitioner=iid", "federation.rounds=1")
    res = local_baselines(cfg)
    assert set(res["accuracy"]) == {"0", "1"}
    assert all(0.0 <= v <= 1.0 for v in res["accuracy"].values())
    ledgers = sorted((tmp_path / "run" / "ledgers-local").glob("*.json"))
    assert [p.name for p in ledgers] == ["institution-0.json", "institution-1.json"]
    assert all(len(Ledger(p).summary()) == 1 for p in ledgers)


@pytest.mark.parametrize("partitioner", ["dirichlet", "iid", "column"])
def test_partitions_are_flower_datasets_own_on_a_plain_dataset(partitioner, monkeypatch):
    """The partitioners read whole columns from a numpy-backed dataset (fast); they must give exactly
    what they give on the plain datasets.Dataset they were written for."""
    import random

    from datasets import Dataset

    from fedslm.data import partition
    from fedslm.data.examples import ClassificationExample

    rng = random.Random(3)
    examples = [ClassificationExample(text=f"r{i}", label=rng.choice("abcdefg"), group=f"h{rng.randrange(4)}")
                for i in range(600)]
    fed = FederationConfig(num_clients=4, partitioner=partitioner, dirichlet_alpha=0.5, partition_seed=7)
    fast = partition_indices(examples, fed)

    def plain(rows):
        return Dataset.from_dict({"idx": list(range(len(rows))), "label": [e.label for e in rows],
                                  "group": [e.group for e in rows]})

    monkeypatch.setattr(partition, "_dataset", plain)
    slow = partition_indices(examples, fed)
    assert fast == slow
    assert sorted(i for p in fast for i in p.indices) == list(range(600))  # every record, once


@pytest.mark.parametrize("partitioner", ["dirichlet", "iid", "column"])
def test_one_partition_of_all_institutions_gives_each_its_own_share(partitioner):
    """A simulation's process partitions the scenario once for every institution it serves: each share must
    be the one that institution would compute alone."""
    import random

    from fedslm.data.examples import ClassificationExample, TaskData

    rng = random.Random(5)
    examples = [ClassificationExample(text=f"r{i}", label=rng.choice("abcde"), group=f"h{rng.randrange(3)}")
                for i in range(300)]
    whole = TaskData(task="classification", train=examples, test=[], labels=list("abcde"), source="s")
    fed = FederationConfig(num_clients=3, partitioner=partitioner, dirichlet_alpha=0.5, partition_seed=2)
    every = partition_indices(examples, fed)
    for i in range(3):
        assert every[i] == partition_indices(examples, fed, only=i)[0]
        alone, shared = (institution_data(whole, fed, i, 0.2, 7, None, p) for p in (None, every))
        assert alone.train == shared.train and alone.test == shared.test and alone.dataset_id == shared.dataset_id


def test_simulated_institutions_read_the_partition_the_simulation_wrote(cls_config, monkeypatch):
    """simulate writes the scenario's partition before Flower starts; each ClientApp then takes its share
    from that file (no flwr-datasets split in the Ray actors), the same share it would compute, and splits
    itself again when the file is absent, torn or does not fit."""
    from fedslm.data import partition
    from fedslm.node import institution
    from fedslm.node.plan import NodeContext, plan_round
    from fedslm.simulation.preflight import check_data, share_partitions
    from fedslm.train.prefix import cache_dir

    cfg = cls_config("federation.num_clients=3", "federation.partitioner=dirichlet")
    whole = check_data(cfg)
    expected = partition_indices(whole.train, cfg.federation)
    share_partitions(cfg, whole)
    path = partition.partitions_file(cache_dir(), whole.dataset_id, cfg.federation)
    assert path.is_file()
    splits: list[int] = []
    real = partition.partition_indices
    monkeypatch.setattr(institution, "partition_indices", lambda *a, **k: splits.append(1) or real(*a, **k))

    def shares():
        institution._SHARES.clear()
        institution._WHOLE.clear()
        out = []
        for i in range(3):
            plan = plan_round(cfg, NodeContext(institution=i, num_institutions=3, policy=None))
            out.append(institution.institution_task_data(plan).train)
        return out

    read = shares()
    assert splits == []  # every share from the file
    for i, train in enumerate(read):  # each the share it computes alone
        alone = institution_data(whole, cfg.federation, i, cfg.data.test_fraction, cfg.data.split_seed,
                                 cfg.data.max_test_records)
        assert train and train == alone.train and len(alone.train) < len(expected[i].indices)
    for bad in ('{"format": "fedslm-partitions-1", "institutions": []}', "{torn", ""):
        path.write_text(bad, encoding="utf-8")
        assert [t for t in shares()] == read  # split again, the same shares
    assert len(splits) == 3
    overlapping = {"format": "fedslm-partitions-1", "institutions": [
        {"institution": i, "name": f"institution-{i}", "indices": [0, 1]} for i in range(3)]}
    path.write_text(__import__("json").dumps(overlapping), encoding="utf-8")
    assert partition.load_partitions(path, len(whole.train), cfg.federation) is None  # one record, two institutions


def test_a_warm_simulation_reads_its_saved_split_instead_of_splitting_again(cls_config, monkeypatch):
    """check_data splits the scenario once and share_partitions saves that split; the next simulation of the
    same records and settings reads it (no flwr-datasets split in the main process either), and one whose
    file does not fit, or whose settings differ, splits again."""
    from fedslm.data import partition
    from fedslm.simulation import preflight
    from fedslm.train.prefix import cache_dir

    calls: list[int] = []
    real = partition.partition_indices
    monkeypatch.setattr(partition, "partition_indices", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = cls_config("federation.num_clients=3", "federation.partitioner=dirichlet")
    first = preflight.check_data(cfg)
    assert calls == [1] and first.partitions == real(first.train, cfg.federation)
    preflight.share_partitions(cfg, first)
    assert calls == [1]  # the check's split is the one saved
    again = preflight.check_data(cfg)
    assert calls == [1] and again.partitions == first.partitions  # read, not split
    path = partition.partitions_file(cache_dir(), first.dataset_id, cfg.federation)
    path.write_text('{"format": "fedslm-partitions-1", "institutions": []}', encoding="utf-8")
    assert preflight.check_data(cfg).partitions == first.partitions and calls == [1, 1]
    other = cls_config("federation.num_clients=4", "federation.partitioner=dirichlet")
    assert len(preflight.check_data(other).partitions) == 4 and calls == [1, 1, 1]

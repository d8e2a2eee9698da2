"""The content-keyed frozen-feature cache: zero backbone forwards on a second run of the same increment."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.feature_reuse import ImageCounter
from strata.models.engine import Engine, seed_everything
from strata.models.methods import create_method
from strata.models.streams import LabelledDataset, stream_from_batches
from strata.tasks.training.feature_cache import DiskFeatureCache

APER_SMALL = {"train": {"epochs": 1, "batch_size": 8}}
OVOR_SMALL = {"train": {"epochs": 2, "batch_size": 8}, "vor_epochs": 1, "outliers": {"num_per_class": 4}}


@pytest.fixture()
def task(synthetic_stream):
    return dataclasses.replace(synthetic_stream.tasks[0], data_key="md5-of-batch-a")


def cached_engine(folder) -> Engine:
    return Engine("cpu", seed=0, show_progress=False, feature_cache=DiskFeatureCache(folder))


def learn(name, factory, task, engine, overrides=None, backbone="tiny"):
    """A fresh method learning ``task`` from the same seed; returns it and its inference-mode forwards."""
    seed_everything(0)
    method = create_method(name, factory(backbone), overrides=overrides)
    counter = ImageCounter(method.backbone)
    method.learn(task, engine)
    return method, counter.images


@pytest.mark.parametrize(("name", "overrides", "branches"), [("simplecil", None, 1), ("aper_adapter", APER_SMALL, 2)])
def test_second_run_of_an_increment_does_no_backbone_forward(
    name, overrides, branches, task, tmp_path, tiny_backbone_factory
):
    first, forwards = learn(name, tiny_backbone_factory, task, cached_engine(tmp_path), overrides)
    assert forwards == branches * len(task.train)
    engine = cached_engine(tmp_path)
    second, forwards = learn(name, tiny_backbone_factory, task, engine, overrides)
    assert forwards == 0
    assert (engine.cache_hits, engine.cache_misses) == (1, 0)
    assert torch.equal(first.head.weight, second.head.weight)
    uncached, _ = learn(name, tiny_backbone_factory, task, Engine("cpu", seed=0, show_progress=False), overrides)
    assert torch.equal(uncached.head.weight, second.head.weight)


def test_another_backbone_misses(task, tmp_path, tiny_backbone_factory):
    learn("simplecil", tiny_backbone_factory, task, cached_engine(tmp_path))
    _, forwards = learn("simplecil", tiny_backbone_factory, task, cached_engine(tmp_path), backbone="tiny-wide")
    assert forwards == len(task.train)
    assert len(DiskFeatureCache(tmp_path)) == 2


def test_other_data_or_other_classes_miss(task, tmp_path, tiny_backbone_factory):
    learn("simplecil", tiny_backbone_factory, task, cached_engine(tmp_path))
    other = dataclasses.replace(task, data_key="md5-of-batch-b")
    assert learn("simplecil", tiny_backbone_factory, other, cached_engine(tmp_path))[1] == len(task.train)
    method = create_method("simplecil", tiny_backbone_factory())
    transform = method.test_transform()
    shifted = dataclasses.replace(task, class_ids=(4, 5))  # same batch learned later: other label ids
    assert method.feature_cache_key(task, transform, "train") != method.feature_cache_key(shifted, transform, "train")


def test_changed_pet_state_changes_the_aper_key(task, tiny_backbone_factory):
    method = create_method("aper_adapter", tiny_backbone_factory(), overrides=APER_SMALL)
    transform = method.test_transform()
    before = method.feature_cache_key(task, transform, "train")
    assert before == method.feature_cache_key(task, transform, "train")  # content, not identity
    with torch.no_grad():
        next(method.pet.parameters()).add_(1.0)
    assert method.feature_cache_key(task, transform, "train") != before
    assert method.feature_cache_key(task, transform, "test") != method.feature_cache_key(task, transform, "train")


def test_corrupt_entry_is_recomputed(task, tmp_path, tiny_backbone_factory):
    first, _ = learn("simplecil", tiny_backbone_factory, task, cached_engine(tmp_path))
    (entry,) = tmp_path.glob("*.safetensors")
    entry.write_bytes(b"not a safetensors file")
    engine = cached_engine(tmp_path)
    second, forwards = learn("simplecil", tiny_backbone_factory, task, engine)
    assert forwards == len(task.train)
    assert engine.cache_misses == 1
    assert torch.equal(first.head.weight, second.head.weight)
    assert learn("simplecil", tiny_backbone_factory, task, cached_engine(tmp_path))[1] == 0  # rewritten


def test_no_caching_without_a_data_key(synthetic_stream, tmp_path, tiny_backbone_factory):
    task = synthetic_stream.tasks[0]
    assert task.data_key == ""
    learn("simplecil", tiny_backbone_factory, task, cached_engine(tmp_path))
    assert learn("simplecil", tiny_backbone_factory, task, cached_engine(tmp_path))[1] == len(task.train)
    assert len(DiskFeatureCache(tmp_path)) == 0


def test_ovor_vor_features_are_reused_only_by_an_identical_rerun(task, tmp_path, tiny_backbone_factory):
    first, forwards = learn("ovor", tiny_backbone_factory, task, cached_engine(tmp_path), OVOR_SMALL)
    assert forwards == len(task.train)  # one VOR epoch
    after_first = torch.get_rng_state()
    engine = cached_engine(tmp_path)
    second, forwards = learn("ovor", tiny_backbone_factory, task, engine, OVOR_SMALL)
    assert forwards == 0 and engine.cache_hits == 1
    assert torch.equal(torch.get_rng_state(), after_first)  # the hit left the RNG where the extraction would
    for a, b in zip(first.state_tensors().values(), second.state_tensors().values(), strict=True):
        assert torch.equal(a, b)
    # another RNG state (a different random crop draw) must not be served from the cache
    seed_everything(1)
    method = create_method("ovor", tiny_backbone_factory(), overrides=OVOR_SMALL)
    counter = ImageCounter(method.backbone)
    method.learn(task, cached_engine(tmp_path))
    assert counter.images == len(task.train)


def test_stream_from_batches_keys_tasks_by_content_only(synthetic_stream):
    task = synthetic_stream.tasks[0]
    keyed = LabelledDataset("batch-a", ("a", "b"), task.train, task.test, content_key="abc123")
    anonymous = LabelledDataset("batch-b", ("c", "d"), task.train, task.test)
    stream = stream_from_batches("s", [keyed, anonymous])
    assert [t.data_key for t in stream.tasks] == ["abc123", ""]


def test_disk_cache_rejects_non_digest_keys_and_leaves_no_temporaries(tmp_path):
    cache = DiskFeatureCache(tmp_path / "features")
    with pytest.raises(ValueError, match="hex"):
        cache.put("../escape", {"features": torch.zeros(1, 2)})
    cache.put("ab" * 32, {"features": torch.ones(2, 3), "labels": torch.tensor([0, 1])})
    assert torch.equal(cache.get("ab" * 32)["features"], torch.ones(2, 3))
    assert cache.get("cd" * 32) is None
    assert [p.name for p in (tmp_path / "features").iterdir()] == ["ab" * 32 + ".safetensors"]


def test_another_decoder_misses(task, tiny_backbone_factory, monkeypatch):
    """Features embedded from an older decoder's pixels (e.g. 16-bit images read as white) are never reused."""
    method = create_method("simplecil", tiny_backbone_factory())
    transform = method.test_transform()
    before = method.feature_cache_key(task, transform, "train")
    monkeypatch.setattr("strata.models.methods.base.DECODER", "strata-images-0")
    assert method.feature_cache_key(task, transform, "train") != before

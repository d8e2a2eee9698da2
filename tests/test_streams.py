"""Stream splitting: disjoint classes, disjoint samples, reproducible seeded orders."""

import numpy as np
import pytest

from strata.models.streams import (
    LabelledDataset,
    LabelledImages,
    StreamError,
    class_order,
    split_by_classes,
    stream_from_batches,
    task_sizes,
)
from strata.tasks.data.readers import read_dataset


def test_task_sizes_base_and_increment():
    assert task_sizes(10, 0, 2) == [2, 2, 2, 2, 2]
    assert task_sizes(10, 4, 2) == [4, 2, 2, 2]
    assert task_sizes(10, 0, 3) == [3, 3, 3, 1]
    with pytest.raises(StreamError, match="needs at least 12 classes.*has 10"):
        task_sizes(10, 8, 4)


def test_seeded_order_is_numpy_permutation_and_reproducible():
    np.random.seed(1993)
    assert class_order(100, "seeded", 1993) == np.random.permutation(100).tolist()
    assert class_order(10, "seeded", 7) == class_order(10, "seeded", 7)
    assert class_order(10, "seeded", 7) != class_order(10, "seeded", 8)
    assert class_order(5, "natural") == [0, 1, 2, 3, 4]
    with pytest.raises(StreamError, match="unknown class order"):
        class_order(5, "random")


def test_digits_split_is_disjoint_and_complete():
    dataset = read_dataset("digits", seed=0)
    stream = split_by_classes(dataset, base=0, increment=2, order="seeded", seed=1993)
    assert len(stream) == 5
    seen_classes = [c for task in stream for c in task.class_ids]
    assert seen_classes == list(range(10))  # learning-order ids, each class in exactly one task
    for task in stream:
        assert set(task.train.labels) == set(task.class_ids) == set(task.test.labels)
        train_ids = {id(img) for img in task.train.images}
        test_ids = {id(img) for img in task.test.images}
        assert not train_ids & test_ids
    assert sum(len(t.train) for t in stream) == len(dataset.train)
    assert sum(len(t.test) for t in stream) == len(dataset.test)
    # names follow the permutation
    order = class_order(10, "seeded", 1993)
    assert list(stream.class_names) == [dataset.class_names[c] for c in order]


def test_stratified_split_puts_each_sample_on_one_side():
    from strata.tasks.data.readers import stratified_split

    labels = np.repeat(np.arange(5), 8)
    train, test = stratified_split(list(range(40)), labels, 0.25, seed=3)
    assert not set(train.images) & set(test.images)
    assert sorted(train.images + test.images) == list(range(40))
    assert sorted(set(test.labels)) == list(range(5))  # stratified: every class on both sides
    again, _ = stratified_split(list(range(40)), labels, 0.25, seed=3)
    assert again.images == train.images


def test_same_seed_same_stream():
    a = split_by_classes(read_dataset("digits", seed=1), 0, 2, "seeded", 5)
    b = split_by_classes(read_dataset("digits", seed=1), 0, 2, "seeded", 5)
    assert a.class_names == b.class_names
    assert all((x.train.labels == y.train.labels).all() for x, y in zip(a, b, strict=True))


def test_stream_from_batches_refuses_repeated_classes():
    def batch(name, classes):
        images = [np.zeros((4, 4), np.uint8)] * len(classes)
        return LabelledDataset(
            name,
            tuple(classes),
            LabelledImages(images, range(len(classes))),
            LabelledImages(images, range(len(classes))),
        )

    stream = stream_from_batches("s", [batch("a", ["cat", "dog"]), batch("b", ["owl"])])
    assert [t.class_ids for t in stream] == [(0, 1), (2,)]
    assert stream.tasks[1].train.labels.tolist() == [2]
    with pytest.raises(StreamError, match="repeats classes.*dog"):
        stream_from_batches("s", [batch("a", ["cat", "dog"]), batch("b", ["dog"])])

"""Dataset readers and their errors: every message names the path at fault."""

import pickle

import numpy as np
import pytest
from PIL import Image

from strata.models.streams import StreamError, split_by_classes
from strata.tasks.data.readers import DatasetError, read_dataset


def _image(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), value, np.uint8)).save(path)


def _folder(root, classes=("a", "b", "c"), per_class=4):
    for c, name in enumerate(classes):
        for i in range(per_class):
            _image(root / name / f"{i}.png", 40 * c + i)
    return root


def test_image_folder_with_seeded_split(tmp_path):
    dataset = read_dataset(f"folder:{_folder(tmp_path / 'data')}", seed=0, test_fraction=0.25)
    assert dataset.class_names == ("a", "b", "c")
    assert len(dataset.train) == 9 and len(dataset.test) == 3
    image, label = dataset.train.with_transform(None)[0]
    assert image.mode == "RGB" and label in (0, 1, 2)


def test_image_folder_with_train_and_test_subfolders(tmp_path):
    _folder(tmp_path / "d" / "train", per_class=3)
    _folder(tmp_path / "d" / "test", per_class=1)
    dataset = read_dataset(f"folder:{tmp_path / 'd'}")
    assert (len(dataset.train), len(dataset.test)) == (9, 3)


def test_empty_class_folder_is_named(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "empty").mkdir()
    with pytest.raises(DatasetError, match=f"class folder {root / 'empty'} holds no images"):
        read_dataset(f"folder:{root}")


def test_unreadable_image_is_named(tmp_path):
    root = _folder(tmp_path / "data")
    (root / "b" / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DatasetError, match=f"unreadable image {root / 'b' / 'broken.jpg'}"):
        read_dataset(f"folder:{root}")


def test_truncated_image_is_named(tmp_path):
    root = _folder(tmp_path / "data")
    good = root / "a" / "0.png"
    (root / "a" / "cut.png").write_bytes(good.read_bytes()[:30])
    with pytest.raises(DatasetError, match="cut.png"):
        read_dataset(f"folder:{root}")


def test_too_few_classes_for_the_protocol(tmp_path):
    dataset = read_dataset(f"folder:{_folder(tmp_path / 'data')}")
    with pytest.raises(StreamError, match="B2-Inc2 needs at least 4 classes.*has 3"):
        split_by_classes(dataset, base=2, increment=2)


def test_missing_folder_and_unknown_dataset(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'.*digits.*cifar100:DIR"):
        read_dataset("mnist")


def _write_cifar(root, n_train=20, n_test=10):
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        data = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), b"fine_labels": [i % 100 for i in range(n)]}
        (root / split).write_bytes(pickle.dumps(data))
    (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))


def test_cifar100_pickles_are_read(tmp_path):
    _write_cifar(tmp_path / "cifar")
    dataset = read_dataset(f"cifar100:{tmp_path / 'cifar'}")
    assert len(dataset.class_names) == 100 and len(dataset.train) == 20 and len(dataset.test) == 10
    image, label = dataset.train.with_transform(None)[3]
    assert image.size == (32, 32) and label == 3


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_cifar100_refuses_code_in_pickles(tmp_path):
    _write_cifar(tmp_path / "cifar")
    (tmp_path / "cifar" / "meta").write_bytes(pickle.dumps({b"fine_label_names": Payload()}))
    with pytest.raises(DatasetError, match="refusing to load builtins.print"):
        read_dataset(f"cifar100:{tmp_path / 'cifar'}")


def test_cifar100_missing_file_says_what_is_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="'train', 'test' and 'meta'"):
        read_dataset(f"cifar100:{tmp_path / 'empty'}")

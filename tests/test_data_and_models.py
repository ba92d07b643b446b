import numpy as np
import pytest
import timm
import torch
from PIL import Image

import adq_hf  # noqa: F401  (registers resnet20_cifar)
from adq_hf.data import FASHION_MNIST_CLASSES, load_image_dataset


def test_fashion_mnist_is_the_full_real_data_set():
    train, test = load_image_dataset("fashion_mnist", "train"), load_image_dataset("fashion_mnist", "test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.features["label"].names == FASHION_MNIST_CLASSES
    image = np.asarray(test[0]["image"], dtype=np.uint8)
    assert image.shape == (28, 28) and image.max() > 100
    labels = np.asarray(test["label"])
    assert set(labels.tolist()) == set(range(10)) and np.bincount(labels).tolist() == [1000] * 10


def test_image_folder_and_missing_path(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / "train" / label / f"{i}.png")
    ds = load_image_dataset(str(tmp_path), "train")
    assert len(ds) == 6 and set(ds["label"]) == {0, 1} and ds[0]["image"].size == (8, 8)
    with pytest.raises(ValueError, match="/no/such/folder does not exist"):
        load_image_dataset("/no/such/folder", "train")


def test_resnet20_cifar_is_a_timm_model():
    model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1)
    assert sum(p.numel() for p in model.parameters()) == 272186  # 0.27M, as in He et al.
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    rgb = timm.create_model("resnet20_cifar")
    assert rgb(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert rgb.forward_head(rgb.forward_features(torch.randn(1, 3, 32, 32)), pre_logits=True).shape == (1, 64)
    rgb.reset_classifier(5)
    assert rgb.get_classifier().out_features == 5
    assert timm.data.resolve_data_config({}, model=rgb)["input_size"] == (3, 32, 32)
    copy = timm.create_model("resnet20_cifar", num_classes=5)
    copy.load_state_dict(rgb.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(copy.eval()(x), rgb.eval()(x))

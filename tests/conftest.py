import os
import tempfile

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: with 2+ threads on a busy machine, OpenMP waits dominate the run time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The Hub tests (tests/test_hub.py) run the real huggingface_hub client against tests/hub_server.py
# on 127.0.0.1. huggingface_hub reads its endpoint, offline flag and cache location when it is first
# imported, so they are set here, before any test module imports it: every Hub request of the test
# session goes to 127.0.0.1 (never to huggingface.co), into a cache of its own.
def _reserve_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LOCAL_HUB_PORT = _reserve_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{LOCAL_HUB_PORT}"
os.environ["HF_HUB_OFFLINE"] = "0"  # scripts/test.sh sets 1 for the rest; only 127.0.0.1 is reachable here
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="adq_hf-test-hub-cache-")
os.environ.pop("HF_TOKEN", None)


def fashion_mnist_batches(images: int, batch_size: int) -> list:
    """The first ``images`` real Fashion-MNIST training images, as ResNet-20 (1x28x28) eval batches."""
    import timm
    from torch.utils.data import DataLoader

    from adq_hf.data import collate_images, image_transforms, load_image_dataset, resolve_data_config

    model = timm.create_model("resnet20_cifar", num_classes=10, in_chans=1)
    ds = load_image_dataset("fashion_mnist", "train").select(range(images))
    ds.set_transform(image_transforms(resolve_data_config(model, (1, 28, 28)), "none")[1])
    return list(DataLoader(ds, batch_size=batch_size, collate_fn=collate_images))

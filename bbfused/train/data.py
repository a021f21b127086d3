"""Training data: the MNIST files shipped with bbfused, ImageNet-style folders, and synthetic device batches.

Every source gives a :class:`Data`: a train and a test iterable of (images, labels) batches, where images are
float32 (N, C, H, W) normalised per channel and labels int64 (N,). Under DDP each process sees its own shard.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import signal
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler, Subset

from .errors import DataError

MNIST_DIR = Path(__file__).resolve().parents[1] / "data" / "mnist"
# md5 of the uncompressed idx bytes (the original files' well-known checksums).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Synthetic data: batches per epoch unless limited, and the class count of ImageNet.
SYNTHETIC_TRAIN_STEPS, SYNTHETIC_TEST_STEPS, SYNTHETIC_CLASSES = 100, 10, 1000


@dataclass
class Data:
    """What training needs from a data source. ``train_sampler`` (None for synthetic data) reshuffles with
    ``set_epoch``; the order depends only on the seed and the epoch, so resumed runs see the same batches."""

    train: DataLoader | SyntheticBatches
    test: DataLoader | SyntheticBatches
    train_sampler: DistributedSampler | None
    num_classes: int
    in_channels: int
    image_size: int
    has_test_set: bool = True  # False for synthetic data: its labels are random, so accuracy means nothing


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` data-parallel processes."""

    rank: int = 0
    world: int = 1


# ----------------------------------------------------------------------------------------------- MNIST
def _read_idx(name: str, root: Path) -> bytes:
    path = root / f"{name}.gz"
    if not path.is_file():
        raise DataError(f"MNIST file {path} is missing; reinstall bbfused (the files ship with the package)")
    raw = gzip.decompress(path.read_bytes())
    digest = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    if digest != MNIST_MD5[name]:
        raise DataError(
            f"MNIST file {path} is corrupt: md5 of its contents is {digest}, expected {MNIST_MD5[name]}; "
            f"reinstall bbfused"
        )
    return raw


def _idx_images(raw: bytes) -> torch.Tensor:
    _magic, count, rows, cols = struct.unpack(">4I", raw[:16])  # the md5 check vouches for the header
    return torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).view(count, 1, rows, cols)


def _idx_labels(raw: bytes) -> torch.Tensor:
    _magic, count = struct.unpack(">2I", raw[:8])
    return torch.frombuffer(bytearray(raw[8:]), dtype=torch.uint8).to(torch.int64)


def load_mnist(root: Path = MNIST_DIR) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST as (train images, train labels, test images, test labels): images uint8 (N, 1, 28, 28),
    labels int64 (N,); 60,000 and 10,000 of them. Checks each file's md5."""
    return (
        _idx_images(_read_idx("train-images-idx3-ubyte", root)),
        _idx_labels(_read_idx("train-labels-idx1-ubyte", root)),
        _idx_images(_read_idx("t10k-images-idx3-ubyte", root)),
        _idx_labels(_read_idx("t10k-labels-idx1-ubyte", root)),
    )


class TensorBatches(Dataset):
    """In-memory images and labels indexed a whole batch at a time (one gather, no per-sample collate).
    ``channels`` > 1 repeats single-channel images that many times (a view of the gathered batch)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, channels: int = 1) -> None:
        self.images = images
        self.labels = labels
        self.channels = channels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, device=self.labels.device)
        return self.images[index].expand(-1, self.channels, -1, -1), self.labels[index]


# ----------------------------------------------------------------------------------------------- samplers
class ShardSampler(Sampler[int]):
    """Indices rank, rank+world, ... in order: an exact split for evaluation (no padding, no duplicates)."""

    def __init__(self, size: int, shard: Shard) -> None:
        self.indices = range(shard.rank, size, shard.world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def subset_indices(size: int, limit: int | None, seed: int) -> torch.Tensor | None:
    """A fixed random choice of ``limit`` of ``size`` samples (the same for a seed on every process), or None
    for all of them."""
    if limit is None or limit >= size:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=generator)[:limit].sort().values


def _train_sampler(dataset: Dataset, shard: Shard, seed: int) -> DistributedSampler:
    # DistributedSampler also for one process: its shuffle depends on (seed, epoch) only, and the global
    # batch of N processes with batch b is the same set of samples as one process's batch N*b.
    return DistributedSampler(dataset, num_replicas=shard.world, rank=shard.rank, shuffle=True, seed=seed)


def mnist_data(
    batch_size: int,
    shard: Shard,
    device: torch.device,
    seed: int,
    limit_train: int | None = None,
    limit_test: int | None = None,
    channels: int = 1,
) -> Data:
    """MNIST normalised with its mean and std, held on ``device`` (188 MB as float32) and batched by index.
    ``channels=3`` gives each batch its gray channel three times, for models built for RGB (torchvision's)."""
    train_images, train_labels, test_images, test_labels = load_mnist()

    def tensors(images: torch.Tensor, labels: torch.Tensor, limit: int | None) -> TensorBatches:
        chosen = subset_indices(len(labels), limit, seed)
        if chosen is not None:
            images, labels = images[chosen], labels[chosen]
        images = ((images.to(device, torch.float32) / 255.0) - MNIST_MEAN) / MNIST_STD
        return TensorBatches(images, labels.to(device), channels)

    train = tensors(train_images, train_labels, limit_train)
    test = tensors(test_images, test_labels, limit_test)
    sampler = _train_sampler(train, shard, seed)
    return Data(
        train=DataLoader(train, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None),
        test=DataLoader(
            test, sampler=BatchSampler(ShardSampler(len(test), shard), batch_size, drop_last=False), batch_size=None
        ),
        train_sampler=sampler,
        num_classes=10,
        in_channels=channels,
        image_size=28,
    )


# ----------------------------------------------------------------------------------------------- image folders
def _inside(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip(os.sep) + os.sep)


def _check_link(entry: os.DirEntry | Path, tree: str, root: Path) -> None:
    """Raise DataError when ``entry`` is a symbolic link to a place inside the data folder (real path ``tree``):
    following it would count the same images twice, under two classes or two splits, or loop forever."""
    if not (entry.is_symlink() if isinstance(entry, os.DirEntry) else os.path.islink(entry)):  # DirEntry: no stat
        return
    target = os.path.realpath(entry)
    if _inside(target, tree) or _inside(tree, target):
        raise DataError(
            f"{os.fspath(entry)} is a link to {target}, inside the data folder {root}: following it would count the "
            f"same images twice (or forever, for a link to a folder above it); remove the link, or replace it with "
            f"a copy of what it points to"
        )


def check_image_folder(root: Path) -> None:
    """Raise DataError unless ``root`` holds ``train/`` and ``val/`` folders of class sub-folders of images.
    Links that lead out of ``root`` (a split or a class kept elsewhere) are followed; a split or a class that
    is a link back into ``root`` is refused (see :func:`scan_images` for the images inside the classes)."""
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; pass --data mnist, synthetic or an ImageNet-style folder")
    if not root.is_dir():
        raise DataError(f"--data {root} is a file, not a folder; pass a folder with train/ and val/ sub-folders")
    if not any(root.iterdir()):
        raise DataError(f"data folder {root} is empty; it needs train/ and val/ sub-folders of class folders")
    missing = [name for name in ("train", "val") if not (root / name).is_dir()]
    if missing:
        raise DataError(
            f"data folder {root} has no {' and no '.join(f'{name}/' for name in missing)} sub-folder; an "
            f"ImageNet-style folder holds train/<class>/<image> and val/<class>/<image>"
        )
    tree = os.path.realpath(root)
    classes = {}
    for split in ("train", "val"):
        _check_link(root / split, tree, root)
        entries = sorted((p for p in (root / split).iterdir() if p.is_dir()), key=lambda p: p.name)
        for entry in entries:
            _check_link(entry, tree, root)
        if not entries:
            raise DataError(f"{root / split} has no class sub-folders; put each class's images in its own folder")
        classes[split] = [p.name for p in entries]
    if classes["train"] != classes["val"]:
        only_train = sorted(set(classes["train"]) - set(classes["val"]))
        only_val = sorted(set(classes["val"]) - set(classes["train"]))
        raise DataError(
            f"train/ and val/ in {root} have different classes (only in train/: {only_train[:5]}, only in val/: "
            f"{only_val[:5]}); both need the same class folders"
        )


def scan_images(split: Path, root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """The classes of ``split`` (``root``/train or ``root``/val) and its images as (path, class index), in the
    order of torchvision's ImageFolder: every file with an image extension at any depth of a class folder.
    Links out of ``root`` are followed; a link back into it, or a folder reached twice, raises DataError
    naming the link instead of counting images twice or looping."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    tree = os.path.realpath(root)
    classes = sorted(entry.name for entry in os.scandir(split) if entry.is_dir())
    samples = []
    for index, name in enumerate(classes):
        folders: list[tuple[str, list[str]]] = []
        seen: dict[str, str] = {}  # real path -> the path it was first reached by
        pending = [os.path.join(split, name)]
        while pending:
            folder = pending.pop()
            real = os.path.realpath(folder)
            if real in seen:
                raise DataError(
                    f"{folder} leads to {real}, which {seen[real]} already reaches: its images would count twice "
                    f"(or forever); remove one of the links under {os.path.join(split, name)}"
                )
            seen[real] = folder
            files = []
            try:
                entries = list(os.scandir(folder))
            except OSError as error:
                raise DataError(f"{folder} cannot be read ({error.strerror}); check its permissions") from None
            for entry in entries:
                _check_link(entry, tree, root)
                if entry.is_dir():
                    pending.append(os.path.join(folder, entry.name))
                else:
                    files.append(entry.name)
            folders.append((folder, files))
        found = [
            (os.path.join(folder, file), index)
            for folder, files in sorted(folders)
            for file in sorted(files)
            if file.lower().endswith(IMG_EXTENSIONS)
        ]
        if not found:
            raise DataError(
                f"{os.path.join(split, name)} holds no image (no file ending in {', '.join(IMG_EXTENSIONS)}); "
                f"every class folder needs at least one image"
            )
        samples += found
    return classes, samples


class ImageFiles(Dataset):
    """Image files decoded as torchvision's ImageFolder does (RGB), with their class index, from
    :func:`scan_images`."""

    def __init__(self, split: Path, root: Path, transform) -> None:
        self.classes, self.samples = scan_images(split, root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from torchvision.datasets.folder import default_loader

        path, target = self.samples[index]
        try:
            return self.transform(default_loader(path)), target
        except OSError as error:  # PIL's UnidentifiedImageError, a truncated file, a read error
            raise DataError(f"{path} is not a readable image ({error}); remove it or replace it") from None


def folder_transforms(image_size: int, train: bool):
    """The standard ImageNet transforms: RandomResizedCrop + flip for training, Resize(size*256/224) +
    CenterCrop for evaluation, then per-channel normalisation with the ImageNet mean and std."""
    from torchvision import transforms

    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        return transforms.Compose(
            [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), *normalize]
        )
    resize = round(image_size * 256 / 224)
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size), *normalize])


def folder_data(
    root: Path,
    image_size: int,
    batch_size: int,
    workers: int,
    shard: Shard,
    seed: int,
    pin_memory: bool,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Data:
    """An ImageNet-style folder (train/<class>/*, val/<class>/*) decoded by ``workers`` loader processes.
    Training drops the last incomplete batch of each epoch, as timm does."""
    check_image_folder(root)
    train_set = ImageFiles(root / "train", root, folder_transforms(image_size, train=True))
    test_set = ImageFiles(root / "val", root, folder_transforms(image_size, train=False))
    train: Dataset = train_set
    test: Dataset = test_set
    chosen = subset_indices(len(train_set), limit_train, seed)
    if chosen is not None:
        train = Subset(train_set, chosen.tolist())
    chosen = subset_indices(len(test_set), limit_test, seed)
    if chosen is not None:
        test = Subset(test_set, chosen.tolist())
    sampler = _train_sampler(train, shard, seed)
    loader = dict(
        batch_size=batch_size, num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
        worker_init_fn=quiet_termination,
    )  # fmt: skip
    return Data(
        # Full batches only: batch norm cannot train on a last batch of one image.
        train=DataLoader(train, sampler=sampler, drop_last=True, **loader),
        test=DataLoader(test, sampler=ShardSampler(len(test), shard), **loader),
        train_sampler=sampler,
        num_classes=len(train_set.classes),
        in_channels=3,
        image_size=image_size,
    )


def quiet_termination(worker_id: int) -> None:
    """A loader worker that gets SIGTERM exits at once with status 0. A scheduler that signals the whole process group
    (Slurm's scancel, Kubernetes) reaches the workers too, while the main process saves its checkpoint; killed by
    the signal, they would be reported dead with a traceback as it exits. (Ignoring the signal instead would hang
    that exit: multiprocessing stops its daemonic children with SIGTERM and waits for them.)"""
    signal.signal(signal.SIGTERM, _exit_quietly)


def _exit_quietly(signum: int, frame: object) -> None:
    os._exit(0)


# ----------------------------------------------------------------------------------------------- synthetic
class SyntheticBatches:
    """One random batch kept on the device and served ``steps`` times: training throughput without any data
    loading (like NVIDIA's synthetic data backend). Labels are random, so accuracy means nothing here."""

    def __init__(
        self, steps: int, batch_size: int, image_size: int, num_classes: int, device: torch.device, seed: int
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.steps = steps
        self.images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)
        self.labels = torch.randint(num_classes, (batch_size,), generator=generator).to(device)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.steps):
            yield self.images, self.labels


def synthetic_data(
    image_size: int,
    batch_size: int,
    device: torch.device,
    seed: int,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Data:
    """Synthetic ImageNet-shaped batches: 100 training and 10 test batches per epoch and process, or
    ``limit`` images' worth (at least one batch)."""

    def steps(limit: int | None, default: int) -> int:
        return default if limit is None else max(1, limit // batch_size)

    return Data(
        train=SyntheticBatches(
            steps(limit_train, SYNTHETIC_TRAIN_STEPS), batch_size, image_size, SYNTHETIC_CLASSES, device, seed
        ),
        test=SyntheticBatches(
            steps(limit_test, SYNTHETIC_TEST_STEPS), batch_size, image_size, SYNTHETIC_CLASSES, device, seed + 1
        ),
        train_sampler=None,
        num_classes=SYNTHETIC_CLASSES,
        in_channels=3,
        image_size=image_size,
        has_test_set=False,
    )

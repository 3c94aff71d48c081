"""Image datasets as uint8 tensors, and batches of float32 images in [0, 1].

Example::

    from rqlab import data

    ds = data.load("fashion-mnist", split="test", n=1000, seed=0)
    ds.x.shape, ds.x.dtype          # (1000, 1, 28, 28), torch.uint8 in 0..255
    ds.y.shape, ds.y.dtype          # (1000,), torch.int64 in 0..9
    for x, y in data.batches(ds, 128, shuffle=True, seed=0):
        ...                         # x (B, 1, 28, 28) float32 in [0, 1], y (B,) int64

Datasets: fashion-mnist, mnist, cifar10, cifar100, svhn, read with torchvision's dataset
classes from the data root: the `root` argument, else $RQLAB_DATA, else
~/.cache/rqlab/data (torchvision's own layout under it, e.g. ROOT/cifar-10-batches-py).

Fashion-MNIST is the offline default: Debian's package dataset-fashion-mnist puts the
original gz files in /usr/share/datasets/fashion-mnist, and `load` ungzips them into
ROOT/FashionMNIST/raw the first time. The others are downloaded by torchvision when online
(`rqlab data fetch NAME`, or `load(..., download=True)`).

Images stay unnormalised in [0, 1]: normalising with `mean`/`std` is the model's first
operation (METHODS section 0), so attacks work in pixel space.
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from rqlab.validate import RqlabError, check_choice, check_int

SPLITS = ("train", "test")
DEFAULT_ROOT = "~/.cache/rqlab/data"
# Where Debian's dataset-fashion-mnist package puts the original gz files.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)

CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach "
    "couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster "
    "house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree "
    "motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear "
    "pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road "
    "rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel "
    "streetcar sunflower sweet_pepper table tank telephone television tiger tractor train "
    "trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a dataset without loading it."""

    name: str
    torchvision_class: str        # the class in torchvision.datasets
    location: str                 # where torchvision keeps it under the data root
    input_shape: tuple[int, int, int]   # (C, H, W)
    sizes: dict[str, int]         # examples per split
    mean: tuple[float, ...]       # per channel, of the train split in [0, 1]
    std: tuple[float, ...]
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def path(self, root: Path, split: str = "*") -> Path:
        """Where torchvision keeps this dataset (the `split` file for SVHN) under `root`."""
        return root / self.location.format(split=split)


INFO = {info.name: info for info in (
    DatasetInfo("fashion-mnist", "FashionMNIST", "FashionMNIST/raw", (1, 28, 28),
                {"train": 60000, "test": 10000}, (0.2860,), (0.3530,),
                ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot")),
    DatasetInfo("mnist", "MNIST", "MNIST/raw", (1, 28, 28),
                {"train": 60000, "test": 10000}, (0.1307,), (0.3081,),
                ("0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five",
                 "6 - six", "7 - seven", "8 - eight", "9 - nine")),
    DatasetInfo("cifar10", "CIFAR10", "cifar-10-batches-py", (3, 32, 32),
                {"train": 50000, "test": 10000},
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck")),
    DatasetInfo("cifar100", "CIFAR100", "cifar-100-python", (3, 32, 32),
                {"train": 50000, "test": 10000},
                (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), tuple(CIFAR100_CLASSES)),
    DatasetInfo("svhn", "SVHN", "{split}_32x32.mat", (3, 32, 32),
                {"train": 73257, "test": 26032},
                (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                tuple(str(d) for d in range(10))),
)}
NAMES = tuple(INFO)


def dataset_info(name: str) -> DatasetInfo:
    """Shape, sizes, mean/std and class names of dataset `name`, without loading it."""
    return INFO[check_choice(name, "dataset", NAMES)]


def default_eps(name: str) -> float:
    """The default linf radius of dataset `name` (METHODS section 0): 0.1 on MNIST and
    Fashion-MNIST, 8/255 on CIFAR-10/100 and SVHN."""
    return 0.1 if "mnist" in dataset_info(name).name else 8 / 255


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: `root`, else $RQLAB_DATA, else ~/.cache/rqlab/data."""
    return Path(root or os.environ.get("RQLAB_DATA") or DEFAULT_ROOT).expanduser().absolute()


@dataclass(frozen=True)
class Dataset:
    """One split of a dataset, held in memory.

    x: uint8 (N, C, H, W), values 0..255. y: int64 (N,), values 0..num_classes-1.
    `load` shares x and y with its in-process cache: do not modify them in place.
    """

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]

    def __post_init__(self):
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise RqlabError(f"x must be a uint8 tensor (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or tuple(self.y.shape) != (len(self.x),):
            raise RqlabError(f"y must be an int64 tensor ({len(self.x)},), got {self.y.dtype} {tuple(self.y.shape)}")
        if not len(self.mean) == len(self.std) == self.x.shape[1]:
            raise RqlabError(f"mean and std need one value per channel ({self.x.shape[1]}), "
                             f"got mean={self.mean}, std={self.std}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W)"""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.x)


def load(name: str, split: str = "train", n: int | None = None, seed: int = 0,
         root: str | os.PathLike | None = None, download: bool = False) -> Dataset:
    """Load one split of dataset `name` (see NAMES) into memory.

    n: if given, a random subset of n examples, the first n of a permutation seeded by
    `seed`: the same (n, seed) gives the same examples, and a smaller n a prefix of a
    larger one. download: let torchvision download the data when it is missing.
    Raises RqlabError for an unknown name or split, a bad n, or missing data.
    """
    info = dataset_info(name)
    check_choice(split, "split", SPLITS)
    root = data_root(root)
    try:
        x, y = _load_full(name, split, str(root))
    except RqlabError:
        if not download:
            raise
        _torchvision_dataset(info, split, root, download=True)
        x, y = _load_full(name, split, str(root))
    if n is not None:
        check_int(n, "n", lo=1, hi=len(x))
        check_int(seed, "seed")
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        x, y = x[idx], y[idx]
    return Dataset(name, split, x, y, info.mean, info.std, info.classes)


def fetch(name: str, root: str | os.PathLike | None = None) -> Path:
    """Make both splits of `name` available under the data root; return where they are.

    Fashion-MNIST: from Debian's package (installed with apt-get when we are root and
    it is missing), else downloaded. The others: downloaded by torchvision.
    Fast when the data is already there.
    """
    info = dataset_info(name)
    root = data_root(root)
    if name == "fashion-mnist" and not _place_fashion_mnist(root) and _apt_install_fashion_mnist():
        _place_fashion_mnist(root)
    for split in SPLITS:
        load(name, split, root=root, download=True)
    return info.path(root)


@functools.lru_cache(maxsize=None)
def _load_full(name: str, split: str, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All of one split as (x uint8 (N, C, H, W), y int64 (N,)), cached in-process."""
    info = INFO[name]
    ds = _torchvision_dataset(info, split, Path(root), download=False)
    x = torch.as_tensor(ds.data)
    y = torch.as_tensor(ds.labels if name == "svhn" else ds.targets, dtype=torch.int64)
    if x.dim() == 3:                        # MNIST-like (N, H, W)
        x = x.unsqueeze(1)
    elif x.shape[1] != info.input_shape[0]:  # CIFAR (N, H, W, C)
        x = x.permute(0, 3, 1, 2)
    x = x.contiguous()
    assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == info.input_shape, (x.dtype, x.shape)
    return x, y


def _torchvision_dataset(info: DatasetInfo, split: str, root: Path, download: bool):
    import torchvision.datasets

    if info.name == "fashion-mnist":
        _place_fashion_mnist(root)
    cls = getattr(torchvision.datasets, info.torchvision_class)
    kwargs = {"split": split} if info.name == "svhn" else {"train": split == "train"}
    try:
        return cls(str(root), download=download, **kwargs)
    except (RuntimeError, OSError) as err:  # not found, download failed (offline), corrupt
        raise RqlabError(_missing_message(info, split, root, download, err)) from None


def _missing_message(info: DatasetInfo, split: str, root: Path, download: bool, err) -> str:
    places = [f"{info.path(root, split)} (the data root: --data-root DIR or root=, else $RQLAB_DATA, else {DEFAULT_ROOT})"]
    if info.name == "fashion-mnist":
        places.append(f"{DEBIAN_FASHION_MNIST} (Debian package dataset-fashion-mnist)")
        fixes = ["`rqlab data fetch fashion-mnist` (as root it installs that package, else it downloads)",
                 "`apt-get install dataset-fashion-mnist`"]
    else:
        fixes = [f"`rqlab data fetch {info.name}` when online"]
    fixes.append(f"point --data-root DIR (root= in Python) or RQLAB_DATA at a directory that holds {info.location.format(split=split)}")
    tried = f"download failed: {err}" if download else f"torchvision: {err}"
    return (f"{info.name} ({split} split) not found. Looked in:\n  " + "\n  ".join(places)
            + f"\n({tried})\nFix: " + ", or ".join(fixes))


def _place_fashion_mnist(root: Path) -> bool:
    """Ungzip Debian's Fashion-MNIST files into ROOT/FashionMNIST/raw where missing.

    Each file is written to a temporary name, then renamed, so an interrupted copy leaves
    no partial file. Returns True when all four files are in place.
    """
    raw = INFO["fashion-mnist"].path(root)
    missing = [f for f in FASHION_MNIST_FILES if not (raw / f).is_file()]
    if not missing:
        return True
    source = Path(DEBIAN_FASHION_MNIST)
    if not all((source / f"{f}.gz").is_file() for f in missing):
        return False
    for f in missing:
        tmp = raw / f"{f}.{os.getpid()}.tmp"
        try:
            raw.mkdir(parents=True, exist_ok=True)
            with gzip.open(source / f"{f}.gz", "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, raw / f)
        except (OSError, EOFError) as err:  # unwritable root, corrupt or truncated gz file
            raise RqlabError(f"could not place {source / f'{f}.gz'} into {raw}: {err}") from None
        finally:
            tmp.unlink(missing_ok=True)
    return True


def _apt_install_fashion_mnist() -> bool:
    """Install Debian's dataset-fashion-mnist if apt-get exists and we are root; True if tried."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return False
    print("rqlab: installing Debian package dataset-fashion-mnist", flush=True)
    subprocess.run(["apt-get", "update", "-q"], check=False)
    subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], check=False)
    return True


def batches(ds: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
            augment: bool = False, device: str | torch.device = "cpu",
            drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x float32 (B, C, H, W) in [0, 1], y int64 (B,)) over `ds`, each example once.

    shuffle: order from a torch.Generator seeded with `seed` (pass seed + epoch for a new
    order each epoch); the global RNG is left alone. augment: standard CIFAR augmentation
    per example (random crop with padding 4, horizontal flip), also seeded by `seed`.
    drop_last: skip a last batch smaller than batch_size.
    """
    check_int(batch_size, "batch_size", lo=1)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds), generator=gen) if shuffle else torch.arange(len(ds))
    for start in range(0, len(ds), batch_size):
        idx = order[start:start + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        x = ds.x[idx]                                   # uint8 (B, C, H, W)
        if augment:
            x = _augment(x, gen)
        # Move uint8 (4x fewer bytes), then convert on the device.
        yield x.to(device).float().div_(255), ds.y[idx].to(device)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (padding 4) and horizontal flip of each image of x uint8 (B, C, H, W)."""
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomCrop(tuple(x.shape[-2:]), padding=4), v2.RandomHorizontalFlip()])
    # torchvision draws from the global RNG: seed a private copy of it from `gen`.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
        return torch.stack([transform(img) for img in x])


class Loader:
    """Re-iterable `batches` over a Dataset; len() is the number of batches per epoch.

    Example::

        loader = Loader(ds, 128, shuffle=True, seed=0, augment=True)
        for epoch in range(epochs):
            loader.set_epoch(epoch)   # order and augmentation from seed + epoch
            for x, y in tqdm(loader):
                ...
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                 augment: bool = False, device: str | torch.device = "cpu", drop_last: bool = False):
        self.dataset = dataset
        self.batch_size = check_int(batch_size, "batch_size", lo=1)
        self.shuffle, self.seed, self.augment = shuffle, seed, augment
        self.device, self.drop_last = device, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use seed + epoch for the next iteration's order and augmentation."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return batches(self.dataset, self.batch_size, self.shuffle, self.seed + self.epoch,
                       self.augment, self.device, self.drop_last)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

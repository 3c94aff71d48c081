"""rqlab.data on the real Fashion-MNIST (Debian's dataset-fashion-mnist; `make data`), offline."""
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from rqlab import data
from rqlab.cli import main
from rqlab.validate import RqlabError


def fake_dataset(n=64, same_image=False, seed=0):
    """A small 3x32x32 dataset; y[i] = i so batches can be traced back to examples."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (1 if same_image else n, 3, 32, 32), generator=g, dtype=torch.uint8)
    x = x.expand(n, -1, -1, -1).contiguous()
    return data.Dataset("fake", "train", x, torch.arange(n), (0.5,) * 3, (0.25,) * 3,
                        tuple(str(i) for i in range(n)))


def debian_copy(tmp_path):
    """A copy of Debian's gz files in a tmp dir (to monkeypatch DEBIAN_FASHION_MNIST with)."""
    src = tmp_path / "debian"
    shutil.copytree(data.DEBIAN_FASHION_MNIST, src)
    return src


# --- load -----------------------------------------------------------------------------

@pytest.mark.parametrize("split, size", [("train", 60000), ("test", 10000)])
def test_load_shapes_dtypes_ranges(split, size):
    ds = data.load("fashion-mnist", split)
    assert (ds.name, ds.split, len(ds)) == ("fashion-mnist", split, size)
    assert ds.x.dtype == torch.uint8 and tuple(ds.x.shape) == (size, 1, 28, 28)
    assert ds.y.dtype == torch.int64 and tuple(ds.y.shape) == (size,)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    # Both splits are balanced: 6000 / 1000 examples of each of the 10 classes.
    assert torch.bincount(ds.y).tolist() == [size // 10] * 10
    assert ds.x.max() == 255 and ds.x.min() == 0
    assert list(ds.classes) == torchvision.datasets.FashionMNIST.classes


def test_fashion_mnist_mean_std_constants_match_the_data():
    x = data.load("fashion-mnist", "train").x.double() / 255
    assert x.mean().item() == pytest.approx(data.INFO["fashion-mnist"].mean[0], abs=1e-3)
    assert x.std().item() == pytest.approx(data.INFO["fashion-mnist"].std[0], abs=1e-3)


def test_subsets_are_deterministic_and_nested():
    a = data.load("fashion-mnist", "test", n=200, seed=0)
    b = data.load("fashion-mnist", "test", n=200, seed=0)
    c = data.load("fashion-mnist", "test", n=200, seed=1)
    small = data.load("fashion-mnist", "test", n=50, seed=0)
    assert len(a) == 200 and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    assert torch.equal(small.x, a.x[:50]) and torch.equal(small.y, a.y[:50])
    # A subset is made of distinct examples of the split, with their own labels.
    full = data.load("fashion-mnist", "test")
    rows = [int((full.x == img).flatten(1).all(1).nonzero()[0]) for img in a.x[:20]]
    assert torch.equal(full.y[rows], a.y[:20])


@pytest.mark.parametrize("n", [0, -3, 10001])
def test_subset_size_out_of_range(n):
    with pytest.raises(RqlabError, match=r"n=.*1, 10000"):
        data.load("fashion-mnist", "test", n=n)


def test_unknown_dataset_and_split():
    for call in (lambda: data.load("imagenet"), lambda: data.dataset_info("imagenet")):
        with pytest.raises(RqlabError) as err:
            call()
        msg = str(err.value)
        assert "dataset='imagenet'" in msg and all(name in msg for name in data.NAMES)
    with pytest.raises(RqlabError, match="split='val'.*train, test"):
        data.load("fashion-mnist", "val")


def test_dataset_info_without_loading():
    for name in data.NAMES:
        info = data.dataset_info(name)
        c = info.input_shape[0]
        assert len(info.mean) == len(info.std) == c and all(0 < s < 1 for s in info.std)
        assert info.num_classes == len(set(info.classes)) == (100 if name == "cifar100" else 10)
    assert data.dataset_info("mnist").classes == tuple(torchvision.datasets.MNIST.classes)


def test_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("RQLAB_DATA", str(tmp_path / "env"))
    assert data.data_root() == tmp_path / "env"
    assert data.data_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("RQLAB_DATA")
    assert data.data_root() == Path("~/.cache/rqlab/data").expanduser()


# --- missing data and the Debian files -----------------------------------------------

def test_missing_data_names_every_place_looked_at(monkeypatch, tmp_path):
    nowhere = tmp_path / "no-debian-package"
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(nowhere))
    with pytest.raises(RqlabError) as err:
        data.load("fashion-mnist", "test", root=tmp_path / "empty")
    msg = str(err.value)
    assert str(tmp_path / "empty" / "FashionMNIST" / "raw") in msg and str(nowhere) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "rqlab data fetch fashion-mnist" in msg
    assert "RQLAB_DATA" in msg and "--data-root" in msg
    with pytest.raises(RqlabError) as err:
        data.load("cifar10", "test", root=tmp_path / "empty")
    assert str(tmp_path / "empty" / "cifar-10-batches-py") in str(err.value)
    assert "rqlab data fetch cifar10" in str(err.value)


def test_placing_the_debian_files(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(debian_copy(tmp_path)))
    ds = data.load("fashion-mnist", "test", root=tmp_path / "root")
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(data.FASHION_MNIST_FILES)
    reference = data.load("fashion-mnist", "test")
    assert torch.equal(ds.x, reference.x) and torch.equal(ds.y, reference.y)


def test_a_corrupt_gz_file_leaves_no_partial_file(monkeypatch, tmp_path):
    src = debian_copy(tmp_path)
    gz = src / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:100000])  # truncated
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(src))
    with pytest.raises(RqlabError, match="could not place .*t10k-images-idx3-ubyte.gz"):
        data.load("fashion-mnist", "test", root=tmp_path / "root")
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    assert not list(raw.glob("*.tmp")) and not (raw / "t10k-images-idx3-ubyte").exists()


# --- batches and Loader --------------------------------------------------------------

def test_batches_cover_every_example_once_per_epoch():
    ds = fake_dataset(n=103)
    for shuffle in (False, True):
        ys = [y for _, y in data.batches(ds, 10, shuffle=shuffle, seed=3)]
        assert [len(y) for y in ys] == [10] * 10 + [3]
        order = torch.cat(ys)
        assert sorted(order.tolist()) == list(range(103))
        assert torch.equal(order, torch.arange(103)) != shuffle
    ys = [y for _, y in data.batches(ds, 10, shuffle=True, drop_last=True)]
    assert [len(y) for y in ys] == [10] * 10


def test_shuffle_order_is_seeded_and_leaves_the_global_rng_alone():
    ds = fake_dataset(n=50)
    state = torch.get_rng_state()
    order = lambda seed: torch.cat([y for _, y in data.batches(ds, 8, shuffle=True, seed=seed)])
    assert torch.equal(order(0), order(0)) and not torch.equal(order(0), order(1))
    assert torch.equal(state, torch.get_rng_state())


def test_batch_values_are_the_images_in_0_1():
    ds = data.load("fashion-mnist", "test", n=300)
    x, y = next(iter(data.batches(ds, 128)))
    assert x.dtype == torch.float32 and tuple(x.shape) == (128, 1, 28, 28) and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, ds.x[:128].float() / 255) and torch.equal(y, ds.y[:128])


def test_augment_keeps_shape_is_per_example_and_reproducible():
    ds = fake_dataset(n=64, same_image=True)  # one image 64 times: its crops must differ
    state = torch.get_rng_state()
    run = lambda seed: next(iter(data.batches(ds, 64, seed=seed, augment=True)))[0]
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(state, torch.get_rng_state())
    assert tuple(a.shape) == (64, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(img.flatten().tolist()) for img in a}) > 10
    # Each output is a shifted (zero-padded) and maybe flipped copy of the image.
    img = ds.x[0].float() / 255
    padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
    crops = {(i, j, f) for i in range(9) for j in range(9) for f in (False, True)}
    for out in a[:8]:
        assert any(torch.equal(out, (padded.flip(-1) if f else padded)[:, i:i + 32, j:j + 32])
                   for i, j, f in crops)


def test_loader_len_and_epochs():
    ds = fake_dataset(n=50)
    loader = data.Loader(ds, 16, shuffle=True, seed=5)
    assert len(loader) == 4 and len(data.Loader(ds, 16, drop_last=True)) == 3
    assert loader.dataset is ds and len(list(loader)) == 4
    first = torch.cat([y for _, y in loader])
    assert torch.equal(first, torch.cat([y for _, y in loader]))  # re-iterable, same order
    loader.set_epoch(1)
    second = torch.cat([y for _, y in loader])
    assert torch.equal(second, torch.cat([y for _, y in data.batches(ds, 16, shuffle=True, seed=6)]))
    assert not torch.equal(first, second)


def test_batch_size_must_be_positive():
    ds = fake_dataset(n=4)
    with pytest.raises(RqlabError, match="batch_size=0"):
        next(data.batches(ds, 0))
    with pytest.raises(RqlabError, match="batch_size=0"):
        data.Loader(ds, 0)


# --- CLI -----------------------------------------------------------------------------

def test_cli_data_info(capsys):
    assert main(["data", "info", "fashion-mnist"]) == 0
    out = capsys.readouterr().out
    assert "60000" in out and "10000" in out and "0.286" in out and "0.353" in out


def test_cli_unknown_dataset_is_a_clear_error(capsys):
    assert main(["data", "info", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rqlab: error: dataset='nope' is unknown")
    assert all(name in err for name in data.NAMES) and "Traceback" not in err


def test_cli_fetch_places_the_files_then_is_a_no_op(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(debian_copy(tmp_path)))
    root = tmp_path / "root"
    for _ in range(2):
        assert main(["data", "fetch", "fashion-mnist", "--root", str(root)]) == 0
        assert str(root / "FashionMNIST" / "raw") in capsys.readouterr().out


def test_cli_fetch_installs_the_debian_package_when_missing(monkeypatch, tmp_path, capsys):
    real, src = data.DEBIAN_FASHION_MNIST, tmp_path / "debian"
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(src))
    calls = []

    def fake_apt_install():  # stands in for apt-get install dataset-fashion-mnist
        calls.append(1)
        shutil.copytree(real, src)
        return True

    monkeypatch.setattr(data, "_apt_install_fashion_mnist", fake_apt_install)
    assert main(["data", "fetch", "fashion-mnist", "--root", str(tmp_path / "root")]) == 0
    assert calls == [1] and (tmp_path / "root" / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()

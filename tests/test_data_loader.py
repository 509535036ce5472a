"""The loaders against files written in the real CIFAR-10 and idx formats."""

import gzip
import os

import numpy as np
import pytest
from datafiles import idx_bytes, write_cifar_archive, write_cifar_dir, write_fashion_dir

import data_loader


def expected_cifar(batches):
    def images(data):  # rows hold 1024 red, 1024 green, 1024 blue values, row-major
        return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    train = batches[:5]
    return ((np.concatenate([images(d) for d, _ in train]),
             np.concatenate([lab for _, lab in train])),
            (images(batches[5][0]), np.array(batches[5][1])))


def check_cifar(loaded, batches):
    (x, y), (xt, yt) = loaded
    (ex, ey), (ext, eyt) = expected_cifar(batches)
    assert x.dtype == np.uint8 and x.shape == (100, 32, 32, 3) and xt.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(y, ey)
    np.testing.assert_array_equal(xt, ext)
    np.testing.assert_array_equal(yt, eyt)
    # one pixel by hand: image 0, row 1, column 2, green
    assert x[0, 1, 2, 1] == batches[0][0][0, 1024 + 1 * 32 + 2]


def test_cifar_extracted_dir(tmp_path):
    _, batches = write_cifar_dir(tmp_path)
    check_cifar(data_loader.load_cifar10(tmp_path), batches)
    check_cifar(data_loader.load_cifar10(tmp_path / "cifar-10-batches-py"), batches)


def test_cifar_archive(tmp_path):
    _, batches = write_cifar_archive(tmp_path)
    os.rename(tmp_path / "staging", tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "cifar-10-batches-py").rename(tmp_path / "elsewhere" / "x")
    check_cifar(data_loader.load_cifar10(tmp_path), batches)


def test_cifar_from_environment_variable(tmp_path, monkeypatch):
    _, batches = write_cifar_dir(tmp_path)
    monkeypatch.setenv("OPTINSIGHT_DATA_DIR", str(tmp_path))
    check_cifar(data_loader.load_cifar10(), batches)


def test_cifar_missing_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        data_loader.load_cifar10(tmp_path)


def test_cifar_corrupt_batch(tmp_path):
    directory, _ = write_cifar_dir(tmp_path)
    with open(os.path.join(directory, "data_batch_3"), "wb") as f:
        f.write(b"\x80\x02}q\x00(U\x04data")  # a pickle cut short
    with pytest.raises(ValueError, match="data_batch_3 is not a valid CIFAR-10 batch"):
        data_loader.load_cifar10(tmp_path)


def test_cifar_pickle_with_code_is_refused(tmp_path):
    directory, _ = write_cifar_dir(tmp_path)
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(os.path.join(directory, "test_batch"), "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(ValueError, match="unexpected object"):
        data_loader.load_cifar10(tmp_path)


def test_cifar_wrong_shape(tmp_path):
    directory, _ = write_cifar_dir(tmp_path)
    import pickle

    with open(os.path.join(directory, "data_batch_1"), "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(ValueError, match=r"expected \(N, 3072\)"):
        data_loader.load_cifar10(tmp_path)


def test_cifar_truncated_archive(tmp_path):
    path, _ = write_cifar_archive(tmp_path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    import shutil
    shutil.rmtree(tmp_path / "staging")
    with pytest.raises(ValueError, match="truncated"):
        data_loader.load_cifar10(tmp_path)


def test_fashion_mnist(tmp_path):
    arrays = write_fashion_dir(tmp_path)
    (x, y), (xt, yt) = data_loader.load_fashion_mnist(tmp_path)
    assert x.shape == (40, 28, 28, 1) and xt.shape == (10, 28, 28, 1) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[..., 0], arrays["train-images-idx3-ubyte.gz"])
    np.testing.assert_array_equal(y, arrays["train-labels-idx1-ubyte.gz"])
    np.testing.assert_array_equal(yt, arrays["t10k-labels-idx1-ubyte.gz"])


def test_fashion_mnist_truncated_and_corrupt(tmp_path):
    arrays = write_fashion_dir(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(idx_bytes(arrays["train-images-idx3-ubyte.gz"])[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        data_loader.load_fashion_mnist(tmp_path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="not a readable gzip"):
        data_loader.load_fashion_mnist(tmp_path)
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="not an idx file of 3-d"):
        data_loader.load_fashion_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels"):
        data_loader.load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not os.path.exists(data_loader.DEBIAN_FASHION_DIR),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_is_found(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # an empty Keras cache
    monkeypatch.delenv("OPTINSIGHT_DATA_DIR", raising=False)
    (x, y), (xt, yt) = data_loader.load_fashion_mnist()
    assert x.shape == (60000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1)
    assert sorted(np.unique(y)) == list(range(10))


def test_make_datasets_scales_one_hots_and_splits():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 4, 4, 1), dtype=np.uint8)
    y = rng.integers(0, 10, 50)
    train, val = data_loader.make_datasets(x, y, batch_size=8, validation_split=0.2)
    batches = list(train)  # one pass: each pass is reshuffled
    tx = np.concatenate([b[0].numpy() for b in batches])
    ty = np.concatenate([b[1].numpy() for b in batches])
    vx = np.concatenate([b[0].numpy() for b in val])
    assert tx.shape == (40, 4, 4, 1) and vx.shape == (10, 4, 4, 1)
    assert tx.dtype == np.float32 and tx.min() >= 0 and tx.max() <= 1
    # every example lands in exactly one split, scaled and with its own label
    seen = {tuple(np.round(a.ravel() * 255).astype(int)): int(np.argmax(t))
            for a, t in zip(tx, ty)}
    for image, label in zip(x, y):
        key = tuple(image.ravel().astype(int))
        assert key not in seen or seen[key] == label
    assert len(seen) + len(vx) == 50
    assert ty.sum(axis=1).tolist() == [1.0] * 40
    with pytest.raises(ValueError, match="validation_split"):
        data_loader.make_datasets(x, y, 8, validation_split=1.0)

"""CIFAR-10 and Fashion-MNIST from their original file formats, and tf.data pipelines.

`load_cifar10` reads the CIFAR-10 "python version" (`cifar-10-batches-py/` with
`data_batch_1..5`, `test_batch`, `batches.meta`, or the `cifar-10-python.tar.gz`
archive); `load_fashion_mnist` reads the four idx `.gz` files. Both look in the
directory given, else `$OPTINSIGHT_DATA_DIR`, the Keras cache (`~/.keras/datasets`)
and, for Fashion-MNIST, Debian's `dataset-fashion-mnist` install location, and last
ask Keras to download. They return uint8 images (N, H, W, C) and int64 labels.
Missing files raise FileNotFoundError saying where they looked; truncated or
corrupt files raise ValueError naming the file. `make_datasets` builds the
shuffled, batched, prefetched training and validation pipelines.
"""

import gzip
import io
import os
import pickle
import tarfile
import zlib

import numpy as np

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz",
}
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("cifar10", "fashion-mnist")


def _search_dirs(data_dir, extra=()):
    """Directories to look in: the given one alone, else env, Keras cache, extras."""
    if data_dir is not None:
        return [os.fspath(data_dir)]
    dirs = []
    if os.environ.get("OPTINSIGHT_DATA_DIR"):
        dirs.append(os.environ["OPTINSIGHT_DATA_DIR"])
    dirs.append(os.path.join(os.path.expanduser("~"), ".keras", "datasets"))
    return dirs + list(extra)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and nothing else (no arbitrary code)."""

    _ALLOWED = {"_reconstruct", "ndarray", "dtype", "scalar", "frombuffer"}

    def find_class(self, module, name):
        if (module.split(".")[0] == "numpy" and name in self._ALLOWED) \
                or (module, name) == ("_codecs", "encode"):  # bytes in protocol-2 pickles
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def _parse_cifar_batch(raw, where):
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as e:  # any unpickling failure means a corrupt file
        raise ValueError(f"{where} is not a valid CIFAR-10 batch ({type(e).__name__}: {e}); "
                         "delete it and download cifar-10-python.tar.gz again") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{where} has data of shape {data.shape} and {len(labels)} labels; "
                         "expected (N, 3072) and N labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{where} has labels outside 0..9")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_cifar(read, where):
    """Train and test arrays from `read(member_name) -> bytes`."""
    parts = [_parse_cifar_batch(read(name), f"{where}/{name}") for name in CIFAR_TRAIN]
    x_test, y_test = _parse_cifar_batch(read(CIFAR_TEST), f"{where}/{CIFAR_TEST}")
    return ((np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])),
            (x_test, y_test))


def _cifar_from_dir(directory):
    def read(name):
        with open(os.path.join(directory, name), "rb") as f:
            return f.read()

    missing = [n for n in CIFAR_TRAIN + (CIFAR_TEST,)
               if not os.path.isfile(os.path.join(directory, n))]
    if missing:
        raise FileNotFoundError(f"{directory} lacks the CIFAR-10 files {missing}")
    return _read_cifar(read, directory)


def _cifar_from_archive(path):
    try:
        with tarfile.open(path, "r:gz") as archive:
            def read(name):
                try:
                    member = archive.extractfile(f"{CIFAR_DIR}/{name}")
                except KeyError:
                    raise ValueError(f"{path} has no member {CIFAR_DIR}/{name}") from None
                return member.read()

            return _read_cifar(read, path)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{path} is not a readable CIFAR-10 archive ({e}); it may be "
                         "truncated: download cifar-10-python.tar.gz again") from None


def load_cifar10(data_dir=None):
    """CIFAR-10 as ((x_train, y_train), (x_test, y_test)); x uint8 (N, 32, 32, 3)."""
    looked = []
    for directory in _search_dirs(data_dir):
        for candidate in (os.path.join(directory, CIFAR_DIR), directory):
            if os.path.isfile(os.path.join(candidate, CIFAR_TRAIN[0])):
                return _cifar_from_dir(candidate)
        archive = os.path.join(directory, CIFAR_ARCHIVE)
        if os.path.isfile(archive):
            return _cifar_from_archive(archive)
        looked.append(directory)
    if data_dir is None:
        return _download("cifar10", looked)
    raise FileNotFoundError(
        f"no CIFAR-10 data in {looked}: expected {CIFAR_DIR}/ (data_batch_1..5, test_batch) "
        f"or {CIFAR_ARCHIVE}; download the CIFAR-10 python version into that directory")


def _read_idx(path, expected_dims):
    """An idx file (gzip) as a uint8 array; ValueError if corrupt or truncated."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path} is not a readable gzip file ({e}); it may be truncated: "
                         "reinstall or download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_dims:
        raise ValueError(f"{path} is not an idx file of {expected_dims}-d unsigned bytes "
                         f"(header {raw[:4].hex() or 'empty'})")
    header = 4 + 4 * expected_dims
    if len(raw) < header:
        raise ValueError(f"{path} is truncated inside its header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(expected_dims))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise ValueError(f"{path} holds {len(raw) - header} bytes of data; its header "
                         f"declares shape {shape} ({size} bytes): the file is truncated or corrupt")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(data_dir=None):
    """Fashion-MNIST as ((x_train, y_train), (x_test, y_test)); x uint8 (N, 28, 28, 1)."""
    looked = []
    for directory in _search_dirs(data_dir, extra=(DEBIAN_FASHION_DIR,)):
        for candidate in (directory, os.path.join(directory, "fashion-mnist")):
            paths = {k: os.path.join(candidate, f) for k, f in FASHION_FILES.items()}
            present = [os.path.isfile(p) for p in paths.values()]
            if all(present):
                x_train = _read_idx(paths["train_images"], 3)[..., None]
                y_train = _read_idx(paths["train_labels"], 1).astype(np.int64)
                x_test = _read_idx(paths["test_images"], 3)[..., None]
                y_test = _read_idx(paths["test_labels"], 1).astype(np.int64)
                for x, y, kind in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
                    if len(x) != len(y):
                        raise ValueError(f"{candidate}: {len(x)} {kind} images but {len(y)} "
                                         "labels; the files do not belong together")
                return (x_train, y_train), (x_test, y_test)
            if any(present):
                missing = [f for f, p in zip(FASHION_FILES.values(), present) if not p]
                raise FileNotFoundError(f"{candidate} lacks the Fashion-MNIST files {missing}")
            looked.append(candidate)
    if data_dir is None:
        return _download("fashion-mnist", looked)
    raise FileNotFoundError(
        f"no Fashion-MNIST data in {looked}: expected {sorted(FASHION_FILES.values())}; "
        "on Debian: apt-get install dataset-fashion-mnist")


def _download(name, looked):
    """Keras's own download, for a machine that is online."""
    import keras

    loader = {"cifar10": keras.datasets.cifar10,
              "fashion-mnist": keras.datasets.fashion_mnist}[name]
    try:
        (x, y), (xt, yt) = loader.load_data()
    except Exception as e:  # offline, or the download failed
        hint = ("apt-get install dataset-fashion-mnist" if name == "fashion-mnist"
                else "put the CIFAR-10 python version there or pass --data-dir")
        raise FileNotFoundError(f"no {name} data in {looked} and the download failed "
                                f"({type(e).__name__}); {hint}") from None
    if x.ndim == 3:
        x, xt = x[..., None], xt[..., None]
    return (x, y.reshape(-1).astype(np.int64)), (xt, yt.reshape(-1).astype(np.int64))


def load_dataset(name, data_dir=None):
    """Load `name` (one of DATASETS)."""
    if name == "cifar10":
        return load_cifar10(data_dir)
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


def make_datasets(images, labels, batch_size, validation_split=0.1, num_classes=10, seed=0):
    """(train, validation) tf.data pipelines of (float32 images in [0, 1], one-hot labels).

    The last `validation_split` of the examples (after a seeded shuffle) is held out;
    training batches are reshuffled every epoch.
    """
    import tensorflow as tf

    if not 0 <= validation_split < 1:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split!r}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = int(round(len(images) * validation_split))
    splits = order[: len(order) - n_val], order[len(order) - n_val:]

    def pipeline(index, training):
        ds = tf.data.Dataset.from_tensor_slices((images[index], labels[index]))
        if training:
            ds = ds.shuffle(min(len(index), 50_000), seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size).map(
            lambda x, y: (tf.cast(x, tf.float32) / 255.0, tf.one_hot(y, num_classes)),
            num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    return pipeline(splits[0], True), (pipeline(splits[1], False) if n_val else None)

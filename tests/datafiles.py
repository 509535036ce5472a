"""Small datasets written in the exact on-disk formats of CIFAR-10 and Fashion-MNIST."""

import gzip
import os
import pickle
import tarfile

import numpy as np

CIFAR_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
               b"ship", b"truck"]


def cifar_arrays(per_batch, seed=0):
    """Six batches (5 train, 1 test) of (data (N, 3072) uint8, labels list)."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
             [int(v) for v in rng.integers(0, 10, per_batch)]) for _ in range(6)]


def write_cifar_dir(root, per_batch=20, seed=0):
    """`root/cifar-10-batches-py/` as the python version of CIFAR-10 has it."""
    directory = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(directory, exist_ok=True)
    batches = cifar_arrays(per_batch, seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, (data, labels) in zip(names, batches):
        record = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                  b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
        with open(os.path.join(directory, name), "wb") as f:
            pickle.dump(record, f, protocol=2)
    with open(os.path.join(directory, "batches.meta"), "wb") as f:
        pickle.dump({b"num_cases_per_batch": per_batch, b"label_names": CIFAR_NAMES,
                     b"num_vis": 3072}, f, protocol=2)
    return directory, batches


def write_cifar_archive(root, per_batch=20, seed=0):
    """`root/cifar-10-python.tar.gz` holding cifar-10-batches-py/."""
    staging = os.path.join(root, "staging")
    directory, batches = write_cifar_dir(staging, per_batch, seed)
    path = os.path.join(root, "cifar-10-python.tar.gz")
    with tarfile.open(path, "w:gz") as archive:
        archive.add(directory, arcname="cifar-10-batches-py")
    return path, batches


def idx_bytes(array):
    """An array of uint8 in the idx format (magic 0x0000 08 ndim, big-endian dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_fashion_dir(root, n_train=40, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    os.makedirs(root, exist_ok=True)
    for name, array in arrays.items():
        with gzip.open(os.path.join(root, name), "wb") as f:
            f.write(idx_bytes(array))
    return arrays

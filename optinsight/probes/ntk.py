"""The empirical neural tangent kernel K(x, x') = J(x) J(x')ᵀ and what it tells.

J(x) is the Jacobian of the model's logits with respect to the chosen variables,
evaluated with training=False: the outputs, or their pre-activations when the last
layer ends in a softmax or sigmoid (summed softmax outputs are constant, so their
kernel would be zero). Per-example Jacobians are computed vectorised
(`GradientTape.jacobian`, parallel for) over chunks of `chunk_size` examples, never
pair by pair. Kernels over a subset of variables are that subset's contribution:
the contributions of a partition of the variables sum to the whole kernel.

A Dense layer on vector inputs needs no Jacobian of its kernel: its per-example
gradient is the outer product of the layer's input and its bias's gradient, so its
share of the kernel is (1 + A₁A₂ᵀ) ⊙ J_b₁J_b₂ᵀ (`common.jacobian_gram`), exactly.

Memory: `sum_logits` holds the [n, n_params] Jacobian of the summed outputs,
`trace` and `full` that of every output ([n, k, n_params]), at most `max_bytes` of
it at once; the vectorised backward pass of one chunk holds chunk_size (times k)
copies of the activations.
"""

import keras
import numpy as np
import tensorflow as tf

from optinsight.probes import base
from optinsight.probes.common import (
    MAX_JACOBIAN_BYTES,
    class_labels,
    in_chunks,
    jacobian_gram,
    nearest_outputs,
    num_parameters,
    per_example_jacobian,
    resolve_variables,
)

MODES = ("sum_logits", "trace", "full")


_SQUASHING = (keras.activations.softmax, keras.activations.sigmoid)


def logits(model, x):
    """The model's outputs on x with a final softmax/sigmoid activation left out."""
    last = model.layers[-1] if model.layers else None
    activation = getattr(last, "activation", None)
    if activation not in _SQUASHING:
        return model(x, training=False)
    last.activation = keras.activations.linear
    try:
        return model(x, training=False)
    finally:
        last.activation = activation


def _outputs(model, summed):
    def outputs(xi):
        out = logits(model, xi)
        return tf.reduce_sum(out) if summed else out
    return outputs


def jacobian(model, x, variables=None, chunk_size=None, summed=False):
    """Per-example Jacobian of the logits: numpy [n, k, n_params] in the variables'
    dtype; with `summed`, of the summed logits ([n, 1, n_params])."""
    variables = resolve_variables(model, variables)
    x = np.asarray(x)
    if len(x) == 0:
        raise ValueError("x is empty: the kernel needs at least one example")
    fn = per_example_jacobian(model, variables, _outputs(model, summed), ("ntk", summed))
    return in_chunks(fn, [x], chunk_size).numpy()


def kernel(model, x1, x2=None, mode="sum_logits", variables=None, chunk_size=None,
           max_bytes=MAX_JACOBIAN_BYTES):
    """The empirical NTK between the examples of x1 and x2 (x2=None: x1 with itself).

    mode "sum_logits": the kernel of the summed outputs, Σ_a J_a(x) · Σ_b J_b(x')
    (n1×n2); "trace": Σ_a J_a(x) · J_a(x') (n1×n2); "full": every output pair,
    [n1, n2, k, k] with K[i, j, a, b] = J_a(x1_i) · J_b(x2_j). float64 numpy.

    Computed as Σ over groups of variables of J_g J_gᵀ (`common.jacobian_gram`): the
    Jacobians held at once take at most `max_bytes` (or one variable's worth), the
    products are float32 matrix products in the variables' dtype, summed in float64;
    Dense layers' shares come from their inputs and their biases' Jacobians.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    variables = resolve_variables(model, variables)
    x1 = np.asarray(x1)
    if len(x1) == 0:
        raise ValueError("x is empty: the kernel needs at least one example")
    if x2 is not None:
        x2 = np.asarray(x2)
        if x2.shape[1:] != x1.shape[1:]:
            raise ValueError(f"x1 examples have shape {x1.shape[1:]} but x2 examples have "
                             f"{x2.shape[1:]}; they must match")
    summed = mode == "sum_logits"
    return jacobian_gram(model, variables, _outputs(model, summed), ("ntk", summed), [x1],
                         None if x2 is None else [x2], chunk_size, max_bytes,
                         full=mode == "full")


def _similarity(K, labels):
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    if not (same & off_diagonal).any() or not (~same).any():
        raise ValueError("class similarity needs two examples of one class and two classes")
    s, d = float(K[same & off_diagonal].mean()), float(K[~same].mean())
    return {base.NTK_SAME: s, base.NTK_DIFFERENT: d, "ratio": s / d if d != 0 else float("inf")}


def class_similarity(model, x, y, mode="sum_logits", variables=None, chunk_size=None):
    """Mean kernel entry over same-class pairs and different-class pairs (i != j).

    Returns {"same", "different", "ratio"}: ratio > 1 means the kernel already
    groups examples by class. y: integer labels or one-hot.
    """
    if mode == "full":
        raise ValueError("class_similarity needs a scalar kernel: mode 'sum_logits' or 'trace'")
    labels = class_labels(y)
    if len(labels) != len(x):
        raise ValueError(f"x has {len(x)} examples but y has {len(labels)}")
    return _similarity(kernel(model, x, mode=mode, variables=variables,
                              chunk_size=chunk_size), labels)


def alignment(K, y):
    """Kernel–target alignment ⟨K, YYᵀ⟩_F / (‖K‖_F ‖YYᵀ‖_F), Y one-hot (uncentred), in [-1, 1]."""
    labels = class_labels(y)
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (len(labels), len(labels)):
        raise ValueError(f"K has shape {K.shape}; y has {len(labels)} labels")
    target = (labels[:, None] == labels[None, :]).astype(np.float64)
    return float((K * target).sum() / (np.linalg.norm(K) * np.linalg.norm(target)))


def eigen(K, k):
    """Top-k eigenvalues (descending) and eigenvectors ([n, k]) of a symmetric kernel."""
    K = np.asarray(K, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"K must be a square matrix, got shape {K.shape}")
    if not 1 <= k <= len(K):
        raise ValueError(f"k must be in 1..{len(K)}, got {k!r}")
    values, vectors = np.linalg.eigh((K + K.T) / 2)
    order = np.argsort(values)[::-1][:k]
    return values[order], vectors[:, order]


class NTKProbe:
    """NTK quantities for the callback, on the first `n` probe examples.

    Writes same/different/ratio (class similarity), alignment, trace (tr K),
    eig_1..eig_k, kernel_change ‖K_t − K_0‖_F / ‖K_0‖_F against the kernel of
    its first evaluation (small: the lazy, kernel regime; large: features move), and
    `parameters`, how many parameters the kernel covers.

    Bounded work: the kernel is that of the variables nearest the outputs holding at
    most `max_parameters` (default 2 M; None for all): their exact contribution to
    the full eNTK (contributions of variables add up). The reference CNN has fewer and
    is covered whole; on a ResNet50 it is the classifier and the last block's last
    convolution (about 1.1 M of 23.6 M), and the backward pass stops there.
    """

    kind = base.NTK

    def __init__(self, every="epoch", n=256, k=5, mode="sum_logits", chunk_size=64,
                 max_parameters=2_000_000, max_bytes=MAX_JACOBIAN_BYTES, name="ntk"):
        self.every, self.n, self.k, self.mode = every, n, k, mode
        self.chunk_size, self.max_parameters, self.max_bytes = chunk_size, max_parameters, \
            max_bytes
        self.name = name
        self.initial = None

    def __call__(self, model, x, y):
        x, y = np.asarray(x)[: self.n], np.asarray(y)[: self.n]
        variables = nearest_outputs(model.trainable_variables, self.max_parameters)
        K = kernel(model, x, mode=self.mode, variables=variables, chunk_size=self.chunk_size,
                   max_bytes=self.max_bytes)
        try:
            out = _similarity(K, class_labels(y))
        except ValueError:  # a batch without two classes or a repeated class
            out = {"same": np.nan, "different": np.nan, "ratio": np.nan}
        out.update(alignment=alignment(K, y), trace=float(np.trace(K)),
                   parameters=num_parameters(variables))
        values, _ = eigen(K, min(self.k, len(K)))
        out.update({f"eig_{i + 1}": float(v) for i, v in enumerate(values)})
        if self.initial is None or self.initial.shape != K.shape:
            self.initial = K
        out[base.KERNEL_CHANGE] = float(np.linalg.norm(K - self.initial)
                                     / np.linalg.norm(self.initial))
        return out

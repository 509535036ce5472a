"""What the layers compute: activation histograms, correlations between and within
layers, linear CKA, stability under augmentation, feature spectra, and an export
of per-layer features to TensorBoard's projector.

Each layer's output on n examples is read as a feature matrix [n, d] (the output
flattened per example). Functions need a functional or Sequential model; `layers`
picks layers by name (default: all but the input layers).
"""

import os

import keras
import numpy as np

from optinsight.probes import base
from optinsight.probes.common import layer_features, sampled_layers

#: Layers the representation probes read by default on a deeper model: this many,
#: evenly spaced by depth (`common.sampled_layers`); pass max_layers=None for all.
MAX_LAYERS = 16


def activation_histograms(model, x, bins=40, range=(0, 10), layers=None):  # noqa: A002
    """{layer: counts [bins]} of every output value on x in equal bins over `range`
    (values outside it are not counted, as torch.histc does)."""
    return {name: np.histogram(f, bins=bins, range=range)[0]
            for name, f in layer_features(model, x, layers).items()}


def _subsample(f, max_features):
    """At most max_features columns by a deterministic stride."""
    stride = max(1, -(-f.shape[1] // max_features))
    return f[:, ::stride]


def _correlation(a, b):
    """Pearson correlation of every column of a with every column of b: [da, db],
    NaN where a column is constant."""
    # Constant columns, found on the values themselves: after the mean is subtracted
    # they hold rounding residue, not zeros, in float64 as in float32.
    constant_a, constant_b = np.ptp(a, axis=0) == 0, np.ptp(b, axis=0) == 0
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = (a.T @ b) / np.outer(na, nb)
    c[constant_a, :] = np.nan
    c[:, constant_b] = np.nan
    return c


def layer_correlations(model, x, layers=None, max_features=1024, full=False):
    """Mean |Pearson correlation| between the features of every pair of layers.

    Returns (names, matrix [L, L]) — or (names, matrix, {(a, b): [da, db]}) with
    full=True. Constant features (dead units) are left out of the means, and so is
    each feature's correlation with itself on the diagonal; layers
    wider than `max_features` are read at a deterministic stride of features.
    """
    return _correlations(layer_features(model, x, layers), max_features, full)


def _correlations(features, max_features, full=False):
    """layer_correlations on {layer: features [n, d]}."""
    features = {k: _subsample(f, max_features) for k, f in features.items()}
    names = list(features)
    matrix = np.zeros((len(names), len(names)))
    pairs = {}
    for i, a in enumerate(names):
        for j, b in enumerate(names[i:], start=i):
            c = _correlation(features[a], features[b])
            others = np.abs(c)
            if i == j:  # a layer with itself: each feature's correlation with itself left out
                np.fill_diagonal(others, np.nan)
            matrix[i, j] = matrix[j, i] = np.nanmean(others) if np.isfinite(others).any() \
                else np.nan
            if full:
                pairs[(a, b)] = c
    return (names, matrix, pairs) if full else (names, matrix)


def intra_layer_correlation(model, x, layer, max_features=1024):
    """One layer's feature×feature and sample×sample correlation matrices."""
    f = layer_features(model, x, [layer])[layer]
    return {"features": _correlation(_subsample(f, max_features),
                                     _subsample(f, max_features)),
            "samples": _correlation(f.T, f.T)}


def _centred_gram(f):
    f = f - f.mean(axis=0)
    return f @ f.T


def _cka_of_grams(ka, kb):
    denominator = np.linalg.norm(ka) * np.linalg.norm(kb)
    return float((ka * kb).sum() / denominator) if denominator > 0 else np.nan


def linear_cka(a, b):
    """Linear CKA of two feature matrices over the same n examples, in [0, 1]:
    ‖Bᵀ A‖_F² / (‖Aᵀ A‖_F ‖Bᵀ B‖_F) on centred features, through n×n Gram matrices."""
    return _cka_of_grams(_centred_gram(a), _centred_gram(b))


def cka(model, x, layers=None):
    """(names, linear CKA matrix [L, L]) between every pair of layers on x; each
    layer's n×n Gram matrix is computed once."""
    features = layer_features(model, x, layers)
    return list(features), _cka_matrix(features)


def _cka_matrix(features):
    """The linear CKA matrix [L, L] of {layer: features [n, d]}."""
    grams = [_centred_gram(f) for f in features.values()]
    return np.array([[_cka_of_grams(a, b) for b in grams] for a in grams])


def default_augmentation(seed=0):
    """Flips, small rotations and translations, contrast: Keras preprocessing layers."""
    return keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomRotation(0.05, seed=seed + 1),
        keras.layers.RandomTranslation(0.1, 0.1, seed=seed + 2),
        keras.layers.RandomContrast(0.1, seed=seed + 3),
    ])


def augmentation_variance(model, x, augment=None, n=300, seed=0, layers=None):
    """How much each layer's features move when the same inputs are augmented.

    Runs the model on `n` augmented copies of x (augment: a callable
    `augment(x, training=True)` or a Keras layer; default `default_augmentation`).
    Returns {layer: {"variance": mean over inputs and features of the variance
    across augmentations, "relative": that over the variance of the features across
    the (unaugmented) inputs}}: small relative values mean invariant features.
    """
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    augment = augment or default_augmentation(seed)
    mean = m2 = None  # Welford's running mean and sum of squares, per layer
    for i in range(n):
        features = layer_features(model, np.asarray(augment(x, training=True)), layers)
        if mean is None:
            mean = {k: np.zeros_like(f) for k, f in features.items()}
            m2 = {k: np.zeros_like(f) for k, f in features.items()}
        for k, f in features.items():
            delta = f - mean[k]
            mean[k] += delta / (i + 1)
            m2[k] += delta * (f - mean[k])
    clean = layer_features(model, x, layers)
    out = {}
    for k in mean:
        variance = float((m2[k] / (n - 1)).mean())
        spread = float(clean[k].var(axis=0, ddof=1).mean()) if len(x) > 1 else np.nan
        out[k] = {"variance": variance,
                  "relative": variance / spread if spread > 0 else np.nan}
    return out


def feature_spectrum(model, x, layers=None):
    """{layer: {"singular_values" (of the centred [n, d] feature matrix, descending),
    "effective_rank" (exp of the entropy of the normalised singular values,
    Roy & Vetterli 2007: 1 for rank one, up to min(n, d))}}."""
    return {k: _spectrum(f) for k, f in layer_features(model, x, layers).items()}


def _spectrum(f):
    """feature_spectrum of one feature matrix [n, d]."""
    s = np.linalg.svd(f - f.mean(axis=0), compute_uv=False)
    p = s / s.sum() if s.sum() > 0 else s
    entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
    return {"singular_values": s, "effective_rank": float(np.exp(entropy))}


def export_projector(model, x, y, log_dir, layers=None):
    """Write each layer's features on x, labelled by y, for TensorBoard's projector
    (t-SNE, UMAP, PCA there). Open with `tensorboard --logdir log_dir`.

    Writes `log_dir/<layer>.tsv` files via a checkpoint of embedding variables and a
    projector config; returns the layer names exported.
    """
    import tensorflow as tf
    from tensorboard.plugins import projector

    features = layer_features(model, x, layers)
    labels = np.asarray(y)
    labels = labels.argmax(axis=1) if labels.ndim == 2 and labels.shape[1] > 1 \
        else labels.reshape(-1)
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, "metadata.tsv"), "w") as f:
        f.writelines(f"{label}\n" for label in labels)
    config = projector.ProjectorConfig()
    embeddings = {}
    for i, (name, values) in enumerate(features.items()):
        key = f"layer_{i}"
        embeddings[key] = tf.Variable(values.astype(np.float32), name=name)
        embedding = config.embeddings.add()
        embedding.tensor_name = f"{key}/.ATTRIBUTES/VARIABLE_VALUE"
        embedding.metadata_path = "metadata.tsv"
    tf.train.Checkpoint(**embeddings).save(os.path.join(log_dir, "embeddings.ckpt"))
    projector.visualize_embeddings(log_dir, config)
    return list(features)


def saturated_fraction(layer, outputs):
    """Fraction of a tanh or sigmoid layer's outputs in the flat tails of its
    activation (derivative below ~0.02: |tanh| > 0.99, sigmoid < 0.01 or > 0.99);
    None for other activations."""
    activation = getattr(layer, "activation", None)
    if activation is keras.activations.tanh:
        return float(np.mean(np.abs(outputs) > 0.99))
    if activation is keras.activations.sigmoid:
        return float(np.mean((outputs < 0.01) | (outputs > 0.99)))
    return None


class ActivationProbe:
    """Writes per layer the array `hist/<layer>` (activation histogram counts), the
    scalar `<layer>/zero_fraction` (outputs exactly 0: dead ReLUs) and, for tanh and
    sigmoid layers, `<layer>/saturated_fraction`; the histograms over time make the
    'activations over time' heatmap. Layers: `layers`, else at most `max_layers`
    evenly spaced by depth (all of the reference CNN's)."""

    kind = base.ACTIVATIONS

    def __init__(self, every=100, bins=40, range=(0, 10), layers=None,  # noqa: A002
                 max_layers=MAX_LAYERS, name="activations"):
        self.every, self.bins, self.range, self.layers, self.name = (
            every, bins, range, layers, name)
        self.max_layers = max_layers

    def __call__(self, model, x, y):
        out = {}
        layers = sampled_layers(model, self.layers, self.max_layers)
        for k, f in layer_features(model, x, layers).items():
            out[base.ACTIVATION_HISTOGRAM + k] = np.histogram(f, bins=self.bins,
                                                              range=self.range)[0]
            out[f"{k}/{base.ZERO_FRACTION}"] = float(np.mean(f == 0))
            saturated = saturated_fraction(model.get_layer(k), f)
            if saturated is not None:
                out[f"{k}/{base.SATURATED_FRACTION}"] = saturated
        return out


class RepresentationProbe:
    """Writes the arrays `cka` and `correlations` ([L, L]) and, per layer,
    `<layer>/effective_rank`, from one pass of the model over x. Layers: `layers`,
    else at most `max_layers` evenly spaced by depth (all of the reference CNN's; 16
    of a ResNet50's 176), each read at no more than `max_features` features for the
    correlations."""

    kind = "representations"

    def __init__(self, every="epoch", layers=None, max_layers=MAX_LAYERS, max_features=1024,
                 name="representations"):
        self.every, self.layers, self.name = every, layers, name
        self.max_layers, self.max_features = max_layers, max_features

    def __call__(self, model, x, y):
        features = layer_features(model, x, sampled_layers(model, self.layers, self.max_layers))
        out = {"cka": _cka_matrix(features),
               "correlations": _correlations(features, self.max_features)[1]}
        for k, f in features.items():
            out[f"{k}/effective_rank"] = _spectrum(f)["effective_rank"]
        return out


class AugmentationProbe:
    """Writes `<layer>/variance` and `<layer>/relative` of augmentation_variance.
    Layers: `layers`, else at most `max_layers` evenly spaced by depth."""

    kind = "augmentation"

    def __init__(self, every="epoch", augment=None, n=30, layers=None, seed=0,
                 max_layers=MAX_LAYERS, name="augmentation"):
        self.every, self.augment, self.n, self.layers, self.seed, self.name = (
            every, augment, n, layers, seed, name)
        self.max_layers = max_layers

    def __call__(self, model, x, y):
        out = {}
        layers = sampled_layers(model, self.layers, self.max_layers)
        for k, v in augmentation_variance(model, x, self.augment, self.n, self.seed,
                                          layers).items():
            out[f"{k}/variance"], out[f"{k}/relative"] = v["variance"], v["relative"]
        return out

"""What the diagnosis needs to know of the model, read once when recording starts:
the activation after each trainable variable's layer, the output activation and the
loss, and the optimizer's second-moment decay. With them it names a cause (a ReLU
that never fires, a sigmoid that saturates, a ReLU output under cross-entropy)
instead of guessing it from the gradients alone. Written to insight.json's meta."""

#: Activations that output exact zeros on a whole range of inputs, with a zero
#: derivative there: a unit can die.
EXACT_ZERO = frozenset({"relu", "relu6", "hard_sigmoid", "hard_silu", "hard_swish",
                        "threshold", "hard_tanh"})
#: Activations whose derivative tends to zero in their tails: gradients vanish through
#: stacks of them (hard_sigmoid and hard_tanh also reach exact zeros).
SATURATING = frozenset({"sigmoid", "tanh", "softmax", "exponential", "softsign",
                        "hard_sigmoid", "hard_tanh", "log_softmax", "softplus"})


def _pass_through():
    """Layers that pass a previous layer's output on without an activation of their
    own (Keras is imported here, not with the module: the diagnosis reads the names
    above without loading TensorFlow)."""
    import keras

    return (keras.layers.BatchNormalization, keras.layers.LayerNormalization,
            keras.layers.Dropout, keras.layers.GroupNormalization)


def _name(activation):
    """A Keras activation's name ("relu", "sigmoid"...); "linear" for None."""
    if activation is None:
        return "linear"
    name = getattr(activation, "__name__", None) or type(activation).__name__
    return name.lower()


def _layer_activation(layer):
    """The activation a layer applies itself, or None when it has none."""
    import keras

    if isinstance(layer, keras.layers.Activation):
        return _name(layer.activation)
    if isinstance(layer, keras.layers.ReLU):
        return "relu"
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    for kind, name in ((getattr(keras.layers, "LeakyReLU", None), "leaky_relu"),
                       (getattr(keras.layers, "PReLU", None), "prelu"),
                       (getattr(keras.layers, "ELU", None), "elu")):
        if kind is not None and isinstance(layer, kind):
            return name
    activation = getattr(layer, "activation", None)
    return None if activation is None else _name(activation)


def _all_layers(model):
    """The layers of `model` and of the models nested in it, depth first, in order."""
    for layer in getattr(model, "layers", ()):
        yield layer
        yield from _all_layers(layer)


def variable_activations(model, variables):
    """The activation name for each of `variables` of `model` (a list; None where
    unknown): the activation of the layer that owns it, or, when that is linear, of
    the first activation layer after it (normalisation and dropout in between are
    passed over) in `model.layers` order."""
    layers = list(_all_layers(model))
    owner = {}
    for index, layer in enumerate(layers):
        for weight in layer.weights:
            owner.setdefault(id(weight), index)
    out = []
    for variable in variables:
        index = owner.get(id(variable))
        if index is None:
            out.append(None)
            continue
        activation = _layer_activation(layers[index])
        if activation in (None, "linear"):
            for after in layers[index + 1:]:
                if isinstance(after, _pass_through()):
                    continue
                following = _layer_activation(after)
                if following is not None and not after.weights:
                    activation = following
                break
        out.append(activation)
    return out


#: Losses that read the model's outputs as probabilities unless from_logits=True.
PROBABILISTIC_LOSSES = frozenset({"categorical_crossentropy", "sparse_categorical_crossentropy",
                                  "binary_crossentropy", "categorical_focal_crossentropy",
                                  "binary_focal_crossentropy", "kl_divergence"})
_LOSS_NAMES = {"CategoricalCrossentropy": "categorical_crossentropy",
               "SparseCategoricalCrossentropy": "sparse_categorical_crossentropy",
               "BinaryCrossentropy": "binary_crossentropy",
               "CategoricalFocalCrossentropy": "categorical_focal_crossentropy",
               "BinaryFocalCrossentropy": "binary_focal_crossentropy",
               "KLDivergence": "kl_divergence"}


def _loss_facts(loss):
    """(name, from_logits) of a compiled Keras loss: a string, a Loss or a function."""
    if isinstance(loss, str):
        return loss.lower(), False
    name = _LOSS_NAMES.get(type(loss).__name__)
    if name is None:
        name = getattr(loss, "__name__", None) or getattr(loss, "name", None) \
            or type(loss).__name__
    from_logits = getattr(loss, "from_logits", None)
    if from_logits is None:  # a LossFunctionWrapper keeps it among its fn's kwargs
        from_logits = (getattr(loss, "_fn_kwargs", None) or {}).get("from_logits", False)
    return str(name).lower(), bool(from_logits)


def output_facts(model, activations):
    """{"activation", "units", "loss", "from_logits"} of a single-output compiled
    model (`activations`: `variable_activations` of its trainable variables, in model
    order, the last one the output layer's), or None when unknown."""
    loss = getattr(model, "loss", None)
    outputs = getattr(model, "outputs", None) or []
    if loss is None or isinstance(loss, (list, dict, tuple)) or len(outputs) != 1 \
            or not activations:
        return None
    name, from_logits = _loss_facts(loss)
    return {"activation": activations[-1], "units": int(outputs[0].shape[-1] or 0),
            "loss": name, "from_logits": from_logits}


def optimizer_facts(optimizer):
    """{"class", "beta_2"} of a Keras optimizer (a loss-scale wrapper's inner one);
    beta_2 is None for optimizers without a second-moment average."""
    optimizer = getattr(optimizer, "inner_optimizer", None) or optimizer
    beta_2 = getattr(optimizer, "beta_2", None)
    if beta_2 is None and type(optimizer).__name__ == "RMSprop":
        beta_2 = getattr(optimizer, "rho", None)
    return {"class": type(optimizer).__name__,
            "beta_2": None if beta_2 is None else float(beta_2)}

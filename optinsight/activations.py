"""What follows each trainable variable's layer: the name of the activation applied to
its outputs, which the diagnosis reads to name a cause (a ReLU that never fires, a
sigmoid that saturates) instead of guessing it from the gradients alone."""

import keras

#: Activations that output exact zeros on a whole range of inputs, with a zero
#: derivative there: a unit can die.
EXACT_ZERO = frozenset({"relu", "relu6", "hard_sigmoid", "hard_silu", "hard_swish",
                        "threshold", "hard_tanh"})
#: Activations whose derivative tends to zero in their tails: gradients vanish through
#: stacks of them (hard_sigmoid and hard_tanh also reach exact zeros).
SATURATING = frozenset({"sigmoid", "tanh", "softmax", "exponential", "softsign",
                        "hard_sigmoid", "hard_tanh", "log_softmax", "softplus"})
#: Layers that pass a previous layer's output on without an activation of their own.
_PASS_THROUGH = (keras.layers.BatchNormalization, keras.layers.LayerNormalization,
                 keras.layers.Dropout, keras.layers.GroupNormalization)


def _name(activation):
    """A Keras activation's name ("relu", "sigmoid"...); "linear" for None."""
    if activation is None:
        return "linear"
    name = getattr(activation, "__name__", None) or type(activation).__name__
    return name.lower()


def _layer_activation(layer):
    """The activation a layer applies itself, or None when it has none."""
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
                if isinstance(after, _PASS_THROUGH):
                    continue
                following = _layer_activation(after)
                if following is not None and not after.weights:
                    activation = following
                break
        out.append(activation)
    return out

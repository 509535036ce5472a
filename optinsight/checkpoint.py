"""Checkpoints that `resume` continues from, in `log_dir/checkpoint/`:

* `model-<epochs>.weights.h5`: the model's weights (Keras `save_weights`; it holds
  the model's compiled optimizer too);
* `optimizer-<epochs>.npz`: the variables of an optimizer that is not the model's
  own (a custom loop's), as `v<i>` in `optimizer.variables` order;
* `insight-<epochs>.npz`: the `DynamicsTracker` state;
* `state.json`: {"epoch", "step", "weights", "insight", "optimizer"} naming the
  latest files, replaced atomically after they are written.

Only files of these names are ever deleted: the older checkpoints.
"""

import os
import re

import numpy as np

from optinsight.logs.jsonlog import read_json, write_json_atomic

_OWN_FILE = re.compile(r"(model-\d+\.weights\.h5|optimizer-\d+\.npz|insight-\d+\.npz)$")


def _separate_optimizer(model, optimizer):
    return optimizer is not None and optimizer is not getattr(model, "optimizer", None)


def save_checkpoint(directory, epochs_done, step, model, optimizer, tracker_state):
    """Write a checkpoint after `epochs_done` epochs and `step` steps."""
    os.makedirs(directory, exist_ok=True)
    state = {"epoch": epochs_done, "step": step,
             "weights": f"model-{epochs_done:05d}.weights.h5",
             "insight": f"insight-{epochs_done:05d}.npz", "optimizer": None}
    model.save_weights(os.path.join(directory, state["weights"]))
    if _separate_optimizer(model, optimizer):
        state["optimizer"] = f"optimizer-{epochs_done:05d}.npz"
        np.savez(os.path.join(directory, state["optimizer"]),
                 **{f"v{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)})
    np.savez(os.path.join(directory, state["insight"]), **tracker_state)
    write_json_atomic(os.path.join(directory, "state.json"), state)
    current = {state["weights"], state["insight"], state["optimizer"]}
    for name in os.listdir(directory):
        if _OWN_FILE.match(name) and name not in current:
            os.remove(os.path.join(directory, name))


def load_checkpoint(directory, model, optimizer, tracker):
    """Restore the latest checkpoint into model, optimizer and tracker; returns its
    state.json dict, or None when there is no checkpoint. The tracker is checked
    first, so a checkpoint of another model changes no weights."""
    state_path = os.path.join(directory, "state.json")
    if not os.path.exists(state_path):
        return None
    state = read_json(state_path)
    with np.load(os.path.join(directory, state["insight"])) as saved:
        tracker.load_state(dict(saved))
    model.load_weights(os.path.join(directory, state["weights"]))
    if state.get("optimizer") and _separate_optimizer(model, optimizer):
        with np.load(os.path.join(directory, state["optimizer"])) as saved:
            if len(saved.files) != len(optimizer.variables):
                raise ValueError(
                    f"checkpoint {state['optimizer']} holds {len(saved.files)} optimizer "
                    f"variables but the optimizer has {len(optimizer.variables)}")
            for i, variable in enumerate(optimizer.variables):
                variable.assign(saved[f"v{i}"])
    return state

"""Checkpoints that `resume` continues from, in `log_dir/checkpoint/`:

* `model-<epochs>.weights.h5`: the model's weights (Keras `save_weights`; it holds
  the model's compiled optimizer too);
* `optimizer-<epochs>.npz`: the variables of an optimizer that is not the model's
  own (a custom loop's), as `v<i>` in `optimizer.variables` order;
* `insight-<epochs>.npz`: the `DynamicsTracker` state, with `positions`: where each
  recorded variable stands in `model.weights` (which fine-tuning does not reorder);
* `state.json`: {"epoch", "step", "weights", "insight", "optimizer"} naming the
  latest files, replaced atomically after they are written.

Only files of these names are ever deleted: the older checkpoints.

Resume restores the weights, the optimizer's iterations and slots and the tracker's
state, and keeps the learning rate the user compiled (a common fine-tuning step is to
lower it and resume). When the trainable set changed (layers frozen or unfrozen since
the checkpoint), the variables trained in both keep their optimizer slots, the others
start fresh, and the tracker starts as after `trainable_changed` within a session.
"""

import math
import os
import re
import warnings

import h5py
import numpy as np

from optinsight.logs.jsonlog import read_json, write_json_atomic
from optinsight.logs.summary import SCHEMA_VERSION

_OWN_FILE = re.compile(r"(model-\d+\.weights\.h5|optimizer-\d+\.npz|insight-\d+\.npz)$")


def _separate_optimizer(model, optimizer):
    return optimizer is not None and optimizer is not getattr(model, "optimizer", None)


def weight_positions(model, variables):
    """Where each of `variables` stands in `model.weights` (int list)."""
    index = {id(w): i for i, w in enumerate(model.weights)}
    return [index.get(id(v), -1) for v in variables]


def save_checkpoint(directory, epochs_done, step, model, optimizer, tracker, extra=None):
    """Write a checkpoint after `epochs_done` epochs and `step` steps; `extra`: more
    state arrays saved beside the tracker's (the instruments')."""
    os.makedirs(directory, exist_ok=True)
    state = {"epoch": epochs_done, "step": step,
             "weights": f"model-{epochs_done:05d}.weights.h5",
             "insight": f"insight-{epochs_done:05d}.npz", "optimizer": None}
    model.save_weights(os.path.join(directory, state["weights"]))
    if _separate_optimizer(model, optimizer):
        state["optimizer"] = f"optimizer-{epochs_done:05d}.npz"
        np.savez(os.path.join(directory, state["optimizer"]),
                 **{f"v{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)})
    positions = np.array(weight_positions(model, tracker.tracked_variables), np.int64)
    np.savez(os.path.join(directory, state["insight"]), **tracker.state_dict(),
             **(extra or {}), positions=positions)
    write_json_atomic(os.path.join(directory, "state.json"), state)
    current = {state["weights"], state["insight"], state["optimizer"]}
    for name in os.listdir(directory):
        if _OWN_FILE.match(name) and name not in current:
            os.remove(os.path.join(directory, name))


def read_checkpoint(directory):
    """(state.json dict, tracker state {name: array}) of the latest checkpoint, or
    None when there is none. Reads only: nothing is restored."""
    state_path = os.path.join(directory, "state.json")
    if not os.path.exists(state_path):
        return None
    state = read_json(state_path)
    with np.load(os.path.join(directory, state["insight"])) as saved:
        return state, dict(saved)


def _short_name(variable):
    """The last part of a variable's path: "iteration", "learning_rate", ..."""
    return (getattr(variable, "path", None) or variable.name).split("/")[-1]


def _is_learning_rate(variable):
    return _short_name(variable).startswith("learning_rate")


def _saved_optimizer(directory, state, model, optimizer):
    """The saved optimizer variables as a list of arrays, in `optimizer.variables`
    order (the .npz of a separate optimizer, or the optimizer group of the .h5)."""
    if _separate_optimizer(model, optimizer):
        if not state.get("optimizer"):
            return []
        with np.load(os.path.join(directory, state["optimizer"])) as saved:
            return [saved[f"v{i}"] for i in range(len(saved.files))]
    with h5py.File(os.path.join(directory, state["weights"]), "r") as f:
        group = f.get("optimizer/vars")
        if group is None:
            return []
        return [np.asarray(group[str(i)]) for i in range(len(group))]


def _slots(arrays, n_variables):
    """Split optimizer variables into (leading scalars, one list of slots per model
    variable), assuming Keras's layout: the scalars (iterations, learning rate, loss
    scale) first, then each variable's slots together, in the variables' order."""
    lead = 0
    while lead < len(arrays) and np.ndim(arrays[lead]) == 0:
        lead += 1
    rest = len(arrays) - lead
    if n_variables == 0 or rest % n_variables:
        return None
    k = rest // n_variables
    return arrays[:lead], [arrays[lead + i * k:lead + (i + 1) * k] for i in range(n_variables)]


def restore_optimizer(optimizer, saved, saved_positions, positions):
    """Assign the saved optimizer variables `saved` (arrays) to `optimizer`, keeping its
    learning rate. With the same trainable set, one to one; else the scalars and the
    slots of the variables trained in both (`saved_positions`, `positions`: their
    places in `model.weights`). Returns what was restored, in words."""
    variables = list(optimizer.variables)
    if not saved:
        return "no optimizer state was saved"
    if list(saved_positions) == list(positions) and len(saved) == len(variables):
        pairs = list(zip(variables, saved))
        kept = "its iterations and slots"
    else:
        new, old = _slots(variables, len(positions)), _slots(saved, len(saved_positions))
        if new is None or old is None or len(new[0]) != len(old[0]):
            pairs = [(v, a) for v, a in zip(variables, saved)
                     if np.ndim(a) == 0 and _short_name(v).startswith("iteration")][:1]
            kept = "its iterations only (its slots did not match the model's variables)"
        else:
            pairs = list(zip(new[0], old[0]))
            slot_of = dict(zip(saved_positions, old[1]))
            both = 0
            for position, slots in zip(positions, new[1]):
                if position in slot_of:
                    pairs += zip(slots, slot_of[position])
                    both += 1
            kept = (f"its iterations and the slots of the {both} variables trained before; "
                    f"{len(positions) - both} newly trained ones start fresh")
    for variable, value in pairs:
        if tuple(variable.shape) != np.shape(value):
            raise ValueError(f"checkpoint's optimizer variable of shape {np.shape(value)} "
                             f"does not fit {variable.path} {tuple(variable.shape)}")
        if not _is_learning_rate(variable):
            variable.assign(value)
    return kept


def learning_rates(optimizer):
    """{path: value} of the optimizer's learning-rate variables (none for a schedule)."""
    return {v.path: float(np.asarray(v)) for v in optimizer.variables if _is_learning_rate(v)}


def load_weights(directory, state, model, optimizer, saved_positions, positions):
    """Restore the checkpoint's model weights and optimizer state (see
    `restore_optimizer`); returns what was restored, in words."""
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)
    compiled = learning_rates(optimizer) if optimizer is not None else {}
    with warnings.catch_warnings():  # a changed trainable set: restore_optimizer maps it
        warnings.filterwarnings("ignore", "Skipping variable loading for optimizer")
        model.load_weights(os.path.join(directory, state["weights"]))
    if optimizer is None:
        return "no optimizer"
    saved = _saved_optimizer(directory, state, model, optimizer)
    words = restore_optimizer(optimizer, saved, saved_positions, positions)
    for variable in optimizer.variables:  # the compiled learning rate stays
        if variable.path in compiled:
            variable.assign(compiled[variable.path])
    if compiled:
        rate = next(iter(compiled.values()))
        words += f"; learning rate {rate:g} as compiled"
        before = [float(a) for v, a in zip(optimizer.variables, saved)
                  if _is_learning_rate(v) and np.ndim(a) == 0]
        if before and not math.isclose(before[0], rate, rel_tol=1e-6):
            words += f" (the checkpoint's was {before[0]:g})"
    return words


def restore_tracker(tracker, saved, positions, weight_sizes):
    """Load the saved tracker state `saved` into `tracker`.

    positions: where the tracker's variables stand in `model.weights`; weight_sizes:
    the sizes of `model.weights`. With the trainable set of the checkpoint, everything
    is restored and None returned. With another set of the same model (fine-tuning),
    the tracker keeps its fresh state but for the step, its variables take the run's
    names, and {"added", "removed"} (run names) is returned. ValueError for a
    checkpoint of another model.
    """
    saved_positions = saved.get("positions")
    if saved_positions is None or list(saved_positions) == list(positions):
        tracker.load_state(saved)
        return None
    names = [str(n) for n in saved["names"]]
    sizes = [int(n) for n in saved["sizes"]]
    if any(not 0 <= p < len(weight_sizes) or weight_sizes[p] != size
           for p, size in zip(saved_positions.tolist(), sizes)):
        raise ValueError(
            f"saved insight state is for {len(names)} variables of sizes {sizes} "
            f"({', '.join(names[:3])}, ...) that this model does not have; resume needs "
            "the same model")
    name_of = dict(zip(saved_positions.tolist(), names))
    tracker.names = tuple(name_of.get(p, n) for p, n in zip(positions, tracker.names))
    tracker.step.assign(int(saved["step"]))
    return {"added": [n for p, n in zip(positions, tracker.names) if p not in name_of],
            "removed": [name_of[p] for p in saved_positions.tolist() if p not in positions]}


def check_resume(log_dir, document, options, model_keys):
    """ValueError in one line when the run in `log_dir` (its insight.json `document`)
    cannot be continued with `options`: another log schema, a log without keys this
    version writes (`model_keys`), or another zero-band threshold, moving-average
    decay or histogram bin count. Called before anything is restored or truncated."""
    version = document.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"the run in {log_dir!r} has log schema {version}, written by an older "
            f"optinsight; this one writes schema {SCHEMA_VERSION} and cannot continue it "
            "(read it with optinsight.read_log; resume into a new log_dir)")
    meta = document.get("meta", {})
    for name in ("thresholds", "ema_decay", "histogram_bins"):
        now, then = getattr(options, name), meta.get(name)
        if name == "thresholds":
            now, then = list(now), [float(t) for t in then or []]
        if now != then:
            raise ValueError(
                f"resume with {name}={now!r}, but the run in {log_dir!r} was recorded "
                f"with {name}={then!r}: resume with the run's value, or record the new "
                "setting in a new log_dir")
    missing = [k for k in model_keys if k not in document.get("batch_wise", {})]
    if missing:
        raise ValueError(
            f"the run in {log_dir!r} was written by an older optinsight without "
            f"{missing[0]!r}; this one cannot continue it (read it with "
            "optinsight.read_log; resume into a new log_dir)")

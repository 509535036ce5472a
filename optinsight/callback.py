"""OptimizationInsightCallback: schedules recording, probes, writers and resume.

The callback computes nothing itself: it installs the insight train step
(`model.insight_train_step`) with a `DynamicsTracker` on the model being fitted,
reads the tracker's few hundred scalars per batch in bursts (READ_EVERY_STEPS /
READ_EVERY_SECONDS), and hands them to the writers (`logs.step_log`, `logs.jsonlog`,
`logs.tensorboard`) on the writer thread, on the schedule its arguments set. Every
write goes through a `WriteGuard`: a failing file never stops training.
"""

import functools
import json
import math
import os
import sys
import tempfile
import time

import keras
import numpy as np
import pandas as pd

from optinsight.diagnose import VARIABLE_KEYS, diagnose_run
from optinsight.dynamics import DynamicsTracker, metric_names
from optinsight.logs.background import BackgroundWriter
from optinsight.logs.guard import WriteGuard
from optinsight.logs.jsonlog import (
    JsonFragment,
    JsonList,
    JsonlWriter,
    plain,
    read_json,
    truncate_jsonl,
    write_json_atomic,
)
from optinsight.logs.reader import ArrayFrames, Run, epoch_frame, part_matrix, probes_frame
from optinsight.logs.step_log import StepLog, histogram_table
from optinsight.logs.store import PartWriter, part_paths, truncate_parts
from optinsight.logs.tensorboard import TensorBoardWriter, truncate_events
from optinsight.model import InsightModel, insight_train_step
from optinsight.signs import sign_codes, sign_map_image

SCHEMA_VERSION = 2
EPOCH_KEYS = ("train_mean_loss", "val_mean_loss", "train_mean_acc", "val_mean_acc")
#: The tracker's rows are read (and their log lines written) once this many steps
#: have accumulated or this many seconds have passed, whichever comes first: one
#: device read and one hand-over to the writer thread per burst instead of per step.
READ_EVERY_STEPS = 32
READ_EVERY_SECONDS = 1.0
_ACCURACY_NAMES = ("accuracy", "acc", "categorical_accuracy", "sparse_categorical_accuracy",
                   "binary_accuracy")


def validate_thresholds(thresholds):
    """Tuple of floats, each positive and strictly increasing; else ValueError."""
    try:
        values = tuple(float(t) for t in thresholds)
    except (TypeError, ValueError):
        raise ValueError(
            f"thresholds must be a sequence of positive numbers, got {thresholds!r}") from None
    if not values or any(not (math.isfinite(t) and t > 0) for t in values):
        raise ValueError(f"thresholds must be positive and finite, got {thresholds!r}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"thresholds must be strictly increasing, got {thresholds!r}")
    return values


def validate_ema_decay(ema_decay):
    """None or a float in [0, 1); else ValueError."""
    if ema_decay is None:
        return None
    if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) \
            or not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must be None or a number in [0, 1), got {ema_decay!r}")
    return float(ema_decay)


def validate_freq(name, value, allowed_words=()):
    """A non-negative int, or one of `allowed_words`; else ValueError."""
    if isinstance(value, str) and value in allowed_words:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        words = "".join(f" or {w!r}" for w in allowed_words)
        raise ValueError(f"{name} must be a non-negative integer{words}, got {value!r}")
    return int(value)


def validate_update_freq(update_freq):
    """"batch" (as 1), "epoch", or a positive integer; else ValueError."""
    value = validate_freq("update_freq", update_freq, ("batch", "epoch"))
    if value == 0:
        raise ValueError("update_freq must be 'batch', 'epoch' or a positive integer, got 0")
    return 1 if value == "batch" else value


def prepare_log_dir(log_dir):
    """Create `log_dir` if missing and check it is a writable directory."""
    log_dir = os.fspath(log_dir)
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise ValueError(f"log_dir {log_dir!r} is a file; expected a directory")
    try:
        os.makedirs(log_dir, exist_ok=True)
        probe = os.path.join(log_dir, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"log_dir {log_dir!r} is not writable ({e.strerror})") from None
    return log_dir


def _accuracy(logs, prefix=""):
    for name in _ACCURACY_NAMES:
        if prefix + name in logs:
            return logs[prefix + name]
    return None


class OptimizationInsightCallback(keras.callbacks.Callback):
    """Records per-batch, per-layer optimization dynamics of `fit` (README, docs/logs.md).

    Args:
        log_dir: directory of the run's logs; created if missing.
        thresholds: zero-band thresholds, positive and increasing; one metric
            family per threshold.
        ema_decay: decay of the gradient/weight moving averages ("_09avg" family
            for 0.9); None disables that family.
        histogram_freq: batches between gradient/weight histograms; 0 disables.
        histogram_bins: bins per histogram.
        sign_map_freq: "epoch", or batches between gradient sign maps; 0 disables.
        sign_map_max_params: most parameters per variable in a sign map (a
            deterministic stride picks them).
        probes: probe objects with `name`, `every` (steps or "epoch") and
            `__call__(model, x, y) -> dict`; each also runs once at the start of a
            fresh run (step 0), so changes are measured from initialisation.
        probe_data: the (x, y) batch probes run on; needed when `probes` is set.
        tensorboard: also write TensorBoard event files.
        update_freq: "batch", "epoch", or batches between whole-model TensorBoard
            scalars.
        variable_update_freq: batches between per-variable TensorBoard scalars
            (`insight/<variable>/<key>`, the values of that batch), "epoch" (epoch
            means) or 0 (none). Every value is in `layers/` whatever this is.
        resume: continue the run in `log_dir` from its last checkpoint: model
            weights, optimizer and insight state are restored and steps and
            epochs keep counting; logs written after the checkpoint are dropped
            (those batches are trained again). Without a checkpoint the run starts
            fresh.
        checkpoint_freq: epochs between checkpoints (model weights, optimizer,
            insight state) in `log_dir/checkpoint`; 0 disables.
        diagnosis: at each epoch end, print the diagnosis' new warnings and errors
            (`optinsight.diagnose`), one line each, to stderr.
        verbose: 1 prints where the logs go at train begin.
    """

    def __init__(self, log_dir, thresholds=(1e-7, 1e-5), ema_decay=0.9,
                 histogram_freq=30, histogram_bins=1000, sign_map_freq="epoch",
                 sign_map_max_params=65536, probes=(), probe_data=None, tensorboard=True,
                 update_freq="batch", variable_update_freq=200, resume=False,
                 checkpoint_freq=1, diagnosis=True, verbose=0):
        super().__init__()
        if not isinstance(log_dir, (str, os.PathLike)):
            raise ValueError(f"log_dir must be a path, got {log_dir!r}")
        self.log_dir = os.fspath(log_dir)
        self.thresholds = validate_thresholds(thresholds)
        self.ema_decay = validate_ema_decay(ema_decay)
        self.histogram_freq = validate_freq("histogram_freq", histogram_freq)
        self.histogram_bins = validate_freq("histogram_bins", histogram_bins)
        if self.histogram_bins < 1:
            raise ValueError(f"histogram_bins must be at least 1, got {histogram_bins!r}")
        self.sign_map_freq = validate_freq("sign_map_freq", sign_map_freq, ("epoch",))
        self.sign_map_max_params = validate_freq("sign_map_max_params", sign_map_max_params)
        self.update_freq = validate_update_freq(update_freq)
        self.variable_update_freq = validate_freq("variable_update_freq",
                                                  variable_update_freq, ("epoch",))
        self.probes = tuple(probes)
        for probe in self.probes:
            if not (hasattr(probe, "name") and hasattr(probe, "every") and callable(probe)):
                raise ValueError(f"probe {probe!r} needs a name, an every and __call__")
            validate_freq(f"probe {probe.name!r} every", probe.every, ("epoch",))
        if self.probes and probe_data is None:
            raise ValueError("probes need probe_data=(x, y), the batch they run on")
        self.probe_data = probe_data
        self.tensorboard = bool(tensorboard)
        self.resume = bool(resume)
        self.checkpoint_freq = validate_freq("checkpoint_freq", checkpoint_freq)
        self.diagnosis = bool(diagnosis)
        self._reported = set()  # (code, layer) of findings already printed
        self.verbose = verbose
        self._tracker = None
        self._step = 0  # steps trained
        self._written = 0  # steps whose rows were read from the tracker
        self._epoch_start = 0  # self._step when the current epoch began
        self._epoch = 0
        self._keys = metric_names(self.thresholds, self.ema_decay)
        # Per finished epoch: its number, its steps' numbers, whole-model rows [s, keys]
        # and per-variable means [n_vars, keys].
        self._history = {"epoch": [], "step": [], "model": [], "layer_means": []}
        # insight.json's growing lists, each finished epoch's values encoded once:
        # batch_wise per model key, epoch_wise means per (variable, key).
        self._json_lists = {}
        self._json_epochs = 0  # epochs appended to them
        self._epoch_wise = {k: [] for k in EPOCH_KEYS}
        self._probe_history = {}
        self._writers = {}
        self._started = False
        self._root = self.log_dir
        self._guard = WriteGuard(self._root)
        self._step_log = None
        self._traced = None  # (what it was traced for, the insight train function)
        self._histogram_step = 0  # the last histogram step written

    # ----------------------------------------------------------------- paths
    def _path(self, *parts):
        return os.path.join(self._root, *parts)

    # Writers open their files on first write; setdefault (atomic) makes the training
    # thread and the writer thread share one writer per file. Keyed by the names the
    # write guard reports.
    def _writer(self, name):
        return self._writers.get(name) or self._writers.setdefault(
            name, JsonlWriter(self._path(name)))

    @property
    def _tb(self):
        return self._writers.get("tensorboard/") or self._writers.setdefault(
            "tensorboard/", TensorBoardWriter(self._path("tensorboard", "train")))

    @property
    def _histogram_store(self):
        return self._writers.get("histograms/") or self._writers.setdefault(
            "histograms/", PartWriter(self._path("histograms"), flush_rows=1))

    def _write(self, name, write, *args):
        """write(*args) through the guard (`name`: the file or folder it writes)."""
        return self._guard.run(name, write, *args)

    # ------------------------------------------------------------- lifecycle
    def on_train_begin(self, logs=None):
        model = self.model
        if not model.trainable_variables:
            raise ValueError(f"model {model.name!r} has no trainable variables; "
                             "there is no optimization to record")
        if self._tracker is None:  # a further fit() with this callback continues the run
            # Only the chief writes into log_dir; other workers of a multi-worker
            # strategy write to a scratch dir (they still take part in every step).
            chief = getattr(model.distribute_strategy.extended, "should_checkpoint", True)
            self._root = prepare_log_dir(self.log_dir) if chief else tempfile.mkdtemp(
                prefix="optinsight-worker-")
            self._guard = WriteGuard(self._root)
            if not self.resume and os.path.exists(self._path("steps.jsonl")):
                raise ValueError(
                    f"log_dir {self.log_dir!r} already holds a run; pass resume=True to "
                    "continue it, or choose another log_dir")
            self._tracker = DynamicsTracker(
                model.trainable_variables, self.thresholds, self.ema_decay,
                self.histogram_freq, self.histogram_bins,
                buffer_size=READ_EVERY_STEPS + self._steps_per_call(model),
                # A custom op cannot run inside an XLA-compiled train step.
                kernel="xla" if getattr(model, "jit_compile", False) else "auto",
                strategy=model.distribute_strategy)
            self._step_log = StepLog(
                self._root, self._tracker.names, self.thresholds, self.ema_decay,
                self._tb if self.tensorboard else None, self.update_freq,
                self.variable_update_freq, VARIABLE_KEYS, self._guard,
                self._writer("steps.jsonl"))
            if self.resume:
                try:
                    self._restore()
                except Exception:
                    self._tracker = None  # nothing half-restored for a retry
                    raise
            if self.verbose:
                print(f"optinsight: logging to {self.log_dir}", file=sys.stderr)
        self._background = BackgroundWriter()
        self._next_read = time.monotonic() + READ_EVERY_SECONDS
        self._install(model)
        if self._step == 0 and not self._started:
            self._epoch = 0
            for probe in self.probes:  # the starting point: step 0
                self._run_probe(probe)
        self._started = True

    def _install(self, model):
        if isinstance(model, InsightModel):
            model.attach_tracker(self._tracker)
        else:
            model.train_step = functools.partial(insight_train_step, model,
                                                 tracker=self._tracker)
        # A further fit of the same compiled model reuses the insight train function
        # instead of tracing it again (tens of seconds for a ResNet50).
        traced_for = self._traced_for(model)
        if self._traced is not None and len(self._traced[0]) == len(traced_for) and all(
                a is b for a, b in zip(self._traced[0], traced_for)):
            model.train_function = self._traced[1]
        else:
            model.make_train_function(force=True)
            self._traced = (traced_for, model.train_function)

    def _traced_for(self, model):
        """What the traced train function depends on, compared by identity."""
        return (model, self._tracker, model.optimizer, getattr(model, "_compile_loss", None),
                getattr(model, "_compile_metrics", None), model.jit_compile, model.run_eagerly,
                self._steps_per_call(model), *model.trainable_variables)

    def _uninstall(self, model):
        if isinstance(model, InsightModel):
            model.attach_tracker(None)
        else:
            model.__dict__.pop("train_step", None)
        model.train_function = None

    def on_train_end(self, logs=None):
        self._uninstall(self.model)
        self._read_rows()
        self._background.close()
        self._step_log.close()
        for name, writer in self._writers.items():
            self._write(name, writer.close)
        self._writers.clear()

    # --------------------------------------------------------------- batches
    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start = self._step

    @staticmethod
    def _steps_per_call(model):
        return int(getattr(model, "steps_per_execution", 1) or 1)

    def on_train_batch_end(self, batch, logs=None):
        previous = self._step
        if self._steps_per_call(self.model) == 1:
            self._step = self._epoch_start + batch + 1
        else:  # an epoch's last call may run fewer steps than `batch` counts
            self._step = int(self._tracker.step.numpy())
        if self._step - self._written >= READ_EVERY_STEPS \
                or time.monotonic() >= self._next_read:
            self._read_rows()

        def reached(every):  # a multiple of `every` among the steps just trained
            return every and self._step // every > previous // every

        if reached(self.histogram_freq):
            self._record_histograms()
        if isinstance(self.sign_map_freq, int) and reached(self.sign_map_freq):
            self._record_sign_map(f"step_{self._step:08d}")
        for probe in self.probes:
            if probe.every != "epoch" and reached(probe.every):
                self._run_probe(probe)

    def _read_rows(self):
        """Hand the tracker's rows after the last read to the writer thread."""
        self._next_read = time.monotonic() + READ_EVERY_SECONDS
        rows = self._tracker.read_rows(self._written)
        if rows:
            self._written = rows[-1][0]
            self._background.submit(self._step_log.write, rows, self._epoch,
                                    self._epoch_start)

    @property
    def _model_keys(self):
        return self._step_log.model_keys

    def _record_histograms(self):
        step, histograms = self._tracker.read_histograms()
        if step <= self._histogram_step:
            return
        self._histogram_step = step
        self._background.submit(self._write_histograms, step, self._epoch, histograms)

    def _write_histograms(self, step, epoch, histograms):
        """A histogram step to histograms/ and TensorBoard (on the writer thread)."""
        names = self._tracker.names
        self._write("histograms/", self._histogram_store.write,
                    histogram_table(step, epoch, histograms, names), epoch)
        if self.tensorboard:
            self._write("tensorboard/", self._tb.histograms, {
                f"{kind}/{name}": (counts[i], ranges[i, 0], ranges[i, 1])
                for kind, (counts, ranges) in histograms.items()
                for i, name in enumerate(names)}, step)

    def _record_sign_map(self, label):
        gradients = self._tracker.last_gradients(self.sign_map_max_params or None)
        codes = {name: sign_codes(g) for name, (g, _) in gradients.items()}
        strides = {name: stride for name, (_, stride) in gradients.items()}
        path = self._path("signs", f"{label}.npz")
        meta = json.dumps({"step": self._step, "epoch": self._epoch, "strides": strides})

        def save():
            os.makedirs(self._path("signs"), exist_ok=True)
            try:
                np.savez_compressed(f"{path}.tmp.npz", _meta=np.array(meta), **codes)
                os.replace(f"{path}.tmp.npz", path)
            finally:
                if os.path.exists(f"{path}.tmp.npz"):
                    os.remove(f"{path}.tmp.npz")

        self._write("signs/", save)
        if self.tensorboard:
            for name, c in codes.items():
                self._write("tensorboard/", self._tb.image, f"signs/{name}",
                            sign_map_image(c), self._step)

    # ---------------------------------------------------------------- epochs
    def on_epoch_end(self, epoch, logs=None):
        self._read_rows()
        self._background.flush()
        logs = logs or {}
        steps, model, layer_means = self._step_log.end_epoch(self._step)
        self._history["epoch"].append(epoch)
        self._history["step"].append(steps)
        self._history["model"].append(model)
        self._history["layer_means"].append(layer_means)
        values = {"train_mean_loss": logs.get("loss"), "val_mean_loss": logs.get("val_loss"),
                  "train_mean_acc": _accuracy(logs), "val_mean_acc": _accuracy(logs, "val_")}
        for key, value in values.items():
            self._epoch_wise[key].append(None if value is None else float(value))
        if self.sign_map_freq == "epoch":
            self._record_sign_map(f"epoch_{epoch:04d}")
        for probe in self.probes:
            if probe.every == "epoch":
                self._run_probe(probe)
        if self.tensorboard:
            scalars = {f"insight/epoch/{k}": v[-1] for k, v in self._epoch_wise.items()}
            self._write("tensorboard/", self._tb.scalars, scalars, self._step)
            self._write("tensorboard/", self._tb.flush)
        document = self.summary()
        self._write("insight.json", write_json_atomic, self._path("insight.json"), document)
        if self.checkpoint_freq and (epoch + 1) % self.checkpoint_freq == 0:
            self._write("checkpoint/", self._save_checkpoint, epoch + 1)
        if self.diagnosis:
            self._print_new_findings(document)

    def _print_new_findings(self, document):
        for finding in diagnose_run(self._run_so_far(document)):
            key = (finding.code, finding.layer)
            if finding.severity != "info" and key not in self._reported:
                self._reported.add(key)
                print(f"optinsight: {finding}", file=sys.stderr)

    def _run_so_far(self, document):
        """The run as `read_log` loads it, from memory (`document`: `summary()`) rather
        than re-read from logs that grow with every step: every step's whole-model
        metrics, and per variable the keys the diagnosis reads at up to 4,096 evenly
        spaced steps (`ThinnedHistory`)."""
        history = self._history
        columns = {
            "step": np.concatenate(history["step"]),
            "epoch": np.concatenate([np.full(len(steps), epoch) for epoch, steps
                                     in zip(history["epoch"], history["step"])]),
            "batch": np.concatenate([np.arange(len(a)) for a in history["step"]]),
        }
        columns.update(zip(self._model_keys, np.concatenate(history["model"]).T))
        thinned = self._step_log.history
        return Run(steps=pd.DataFrame(columns), epochs=epoch_frame(document, "insight.json"),
                   summary=document, probes=probes_frame(self._path("probes.jsonl")),
                   log_dir=self._root, variable_data=ArrayFrames(
                       thinned.steps, self._tracker.names, thinned.keys, thinned.values))

    def summary(self):
        """The insight.json document (docs/logs.md) of what is recorded so far; each
        finished epoch's lists are `JsonFragment`s, encoded once."""
        counter = [0]
        lists, names = self._json_lists, self._tracker.names
        for e in range(self._json_epochs, len(self._history["model"])):
            model, means = self._history["model"][e], self._history["layer_means"][e]
            for i, key in enumerate(self._model_keys):
                lists.setdefault(key, JsonList()).append(model[:, i].tolist())
            for v, name in enumerate(names):
                for i, key in enumerate(self._keys):
                    lists.setdefault((name, key), JsonList()).append(means[v, i])
        self._json_epochs = len(self._history["model"])
        empty = JsonFragment([])
        batch_wise = {k: lists[k].fragment() if k in lists else empty
                      for k in self._model_keys}
        layers = {name: {"epoch_wise": {
            k: lists[(name, k)].fragment() if (name, k) in lists else empty
            for k in self._keys}} for name in names}
        document = {
            "schema_version": SCHEMA_VERSION,
            "meta": {
                "thresholds": list(self.thresholds), "ema_decay": self.ema_decay,
                "variables": list(self._tracker.names),
                "variable_sizes": list(self._tracker.sizes),
                "steps": self._step, "epochs": len(self._history["model"]),
                "histogram_freq": self.histogram_freq, "histogram_bins": self.histogram_bins,
                "sign_map_freq": self.sign_map_freq,
                "update_freq": self.update_freq,
                "variable_update_freq": self.variable_update_freq,
            },
            "batch_wise": batch_wise,
            "epoch_wise": dict(self._epoch_wise),
            "layers": layers,
            "probes": self._probe_history,
        }
        document = plain(document, counter)
        document["meta"]["null_values"] = counter[0]
        return document

    # ---------------------------------------------------------------- probes
    def _run_probe(self, probe):
        x, y = self.probe_data
        record = {"step": self._step, "epoch": self._epoch, "probe": probe.name}
        try:
            result = probe(self.model, x, y)
        except Exception as e:  # a probe must not end a long training run
            message = f"{type(e).__name__}: {e}".splitlines()[0]
            print(f"optinsight: probe {probe.name!r} failed at step {self._step}: {message}",
                  file=sys.stderr)
            self._write("probes.jsonl", self._writer("probes.jsonl").write,
                        {**record, "error": message})
            return
        scalars, arrays = {}, {}
        for key, value in result.items():
            if np.ndim(value) == 0:
                scalars[key] = float(value)
            else:
                arrays[key] = np.asarray(value)
        record["values"] = scalars
        if arrays:
            name = f"{probe.name}_{self._step:08d}.npz"

            def save():
                os.makedirs(self._path("probes"), exist_ok=True)
                np.savez_compressed(self._path("probes", name), **arrays)
                return True

            if self._write("probes/", save):
                record["arrays"] = f"probes/{name}"
        self._write("probes.jsonl", self._writer("probes.jsonl").write, record)
        history = self._probe_history.setdefault(probe.name, {"step": []})
        history["step"].append(self._step)
        for key, value in scalars.items():
            history.setdefault(key, []).append(value)
        if self.tensorboard:
            self._write("tensorboard/", self._tb.scalars,
                        {f"probes/{probe.name}/{k}": v for k, v in scalars.items()}, self._step)

    # ------------------------------------------------------ checkpoint/resume
    def _save_checkpoint(self, epochs_done):
        directory = self._path("checkpoint")
        os.makedirs(directory, exist_ok=True)
        weights = f"model-{epochs_done:05d}.weights.h5"
        insight = f"insight-{epochs_done:05d}.npz"
        self.model.save_weights(os.path.join(directory, weights))
        np.savez(os.path.join(directory, insight), **self._tracker.state_dict())
        write_json_atomic(os.path.join(directory, "state.json"), {
            "epoch": epochs_done, "step": self._step, "weights": weights, "insight": insight})
        for name in os.listdir(directory):  # older checkpoints
            if name not in (weights, insight, "state.json"):
                os.remove(os.path.join(directory, name))

    def _restore(self):
        state_path = self._path("checkpoint", "state.json")
        if not os.path.exists(state_path):
            if os.path.exists(self._path("steps.jsonl")):
                raise ValueError(
                    f"log_dir {self.log_dir!r} holds a run but no checkpoint to resume "
                    "from (checkpoint_freq was 0 or it stopped in its first epoch)")
            return
        state = read_json(state_path)
        model = self.model
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(self._path("checkpoint", state["weights"]))
        with np.load(self._path("checkpoint", state["insight"])) as saved:
            self._tracker.load_state(dict(saved))
        self._step = self._written = int(state["step"])
        epochs = int(state["epoch"])
        model._initial_epoch = epochs  # as keras.callbacks.BackupAndRestore does
        for name in ("steps.jsonl", "probes.jsonl"):
            truncate_jsonl(self._path(name), self._step)
        for name in ("model", "layers", "histograms"):
            truncate_parts(self._path(name), self._step)
        truncate_events(self._path("tensorboard", "train"), self._step)
        self._histogram_step = self._step
        if os.path.exists(self._path("insight.json")):
            self._load_history(read_json(self._path("insight.json")), epochs)
        self._load_thinned_history()

    def _load_thinned_history(self):
        """Refill the diagnosis' thinned per-variable history from layers/, part by part."""
        history = self._step_log.history
        for path in part_paths(self._path("layers")):
            steps, values = part_matrix(path, history.keys, self._tracker.names)
            history.append(steps, values)

    def _load_history(self, document, epochs):
        """Reload the first `epochs` epochs of a previous insight.json."""
        def array(lists):
            return np.array([np.nan if v is None else v for v in lists], dtype=np.float64)

        self._history["epoch"] = list(range(epochs))
        last_step = self._step  # restored epochs hold steps ..., last_step, contiguous
        for e in reversed(range(epochs)):
            rows = len(document["batch_wise"][self._model_keys[0]][e])
            self._history["step"].insert(0, np.arange(last_step - rows + 1, last_step + 1))
            last_step -= rows
        for e in range(epochs):
            self._history["model"].append(np.stack(
                [array(document["batch_wise"][k][e]) for k in self._model_keys], axis=1))
            self._history["layer_means"].append(np.array([
                array([document["layers"][n]["epoch_wise"][k][e] for k in self._keys])
                for n in self._tracker.names]))
        self._epoch_wise = {k: document["epoch_wise"][k][:epochs] for k in EPOCH_KEYS}
        self._probe_history = {}
        for name, history in document.get("probes", {}).items():
            keep = [i for i, s in enumerate(history["step"]) if s <= self._step]
            self._probe_history[name] = {k: [v[i] for i in keep] for k, v in history.items()}

"""OptimizationInsightCallback: an `InsightRecorder` driven by `model.fit`.

The callback installs the insight train step (`model.insight_train_step`, whose
`apply_gradients` is the recorder's) on the model being fitted, and tells the recorder
where `fit` is: batch ends, epoch ends, train end. Everything else (reading the
device rows, writing, checkpoints and resume, probes) is the recorder's.
"""

import functools

import keras

from optinsight.model import InsightModel, insight_train_step
from optinsight.options import InsightOptions, validate_log_dir
from optinsight.recorder import InsightRecorder


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
        self.log_dir = validate_log_dir(log_dir)
        self.options = InsightOptions(
            thresholds=thresholds, ema_decay=ema_decay, histogram_freq=histogram_freq,
            histogram_bins=histogram_bins, sign_map_freq=sign_map_freq,
            sign_map_max_params=sign_map_max_params, probes=probes, probe_data=probe_data,
            tensorboard=tensorboard, update_freq=update_freq,
            variable_update_freq=variable_update_freq, resume=resume,
            checkpoint_freq=checkpoint_freq, diagnosis=diagnosis, verbose=verbose)
        self.recorder = None  # made at the first fit; a further fit continues its run
        self._traced = None  # (what it was traced for, the insight train function)

    def on_train_begin(self, logs=None):
        model = self.model
        if self.recorder is None:
            recorder = InsightRecorder(
                self.log_dir, model, model.optimizer, **self.options.as_kwargs(),
                jit_compile=bool(getattr(model, "jit_compile", False)),
                steps_per_call=self._steps_per_call(model))
            recorder.start()
            self.recorder = recorder
            if recorder.initial_epoch:  # resumed: fit continues after the checkpoint
                model._initial_epoch = recorder.initial_epoch  # as BackupAndRestore does
        self.recorder.optimizer = model.optimizer  # recompiling may have changed it
        self._install(model)

    @staticmethod
    def _steps_per_call(model):
        return int(getattr(model, "steps_per_execution", 1) or 1)

    def _install(self, model):
        if isinstance(model, InsightModel):
            model.attach_recorder(self.recorder)
        else:
            model.train_step = functools.partial(insight_train_step, model,
                                                 recorder=self.recorder)
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
        return (model, self.recorder, model.optimizer, getattr(model, "_compile_loss", None),
                getattr(model, "_compile_metrics", None), model.jit_compile, model.run_eagerly,
                self._steps_per_call(model), *model.trainable_variables)

    def _uninstall(self, model):
        if isinstance(model, InsightModel):
            model.attach_recorder(None)
        else:
            model.__dict__.pop("train_step", None)
        model.train_function = None

    def on_train_batch_end(self, batch, logs=None):
        recorder = self.recorder
        if self._steps_per_call(self.model) == 1:
            recorder.batch_end(recorder.epoch_start_step + batch + 1)
        else:  # an epoch's last call may run fewer steps than `batch` counts
            recorder.batch_end(int(recorder.tracker.step.numpy()))

    def on_epoch_end(self, epoch, logs=None):
        self.recorder.epoch_end(logs=logs)

    def on_train_end(self, logs=None):
        self._uninstall(self.model)
        self.recorder.close()

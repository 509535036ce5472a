"""OptimizationInsightCallback: an `InsightRecorder` driven by `model.fit`.

The callback installs the insight train step (`model.insight_train_step`, whose
`apply_gradients` is the recorder's) on the model being fitted, and tells the recorder
where `fit` is: batch ends, epoch ends, train end. Everything else (reading the
device rows, writing, checkpoints and resume, probes) is the recorder's.
"""

import atexit
import functools
import math

import keras
import tensorflow as tf

from optinsight import compat
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
            `__call__(model, x, y) -> dict` (`optinsight.probes.base`); each also runs
            once at the start of a fresh run (step 0), so changes are measured from
            initialisation.
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
        stop_on: "error" stops training cleanly (logs complete) at the first error
            of the diagnosis: at the step for NaN/Inf gradients or loss (within the
            32 steps of a burst for gradients, at once for the loss), otherwise at the
            epoch end that first shows it; None (default) never stops.
        verbose: 1 prints where the logs go at train begin, and a line per probe
            evaluation with its time (the step-0 evaluations take a while).
        instruments: Cockpit's instruments on the training batch (instruments.jsonl,
            TensorBoard `instruments/<name>`, `read_log(...).instruments`): a preset,
            "economy" (alpha, distance, norm_test, inner_test, ortho_test),
            "business" (+ tic_diag, tic_trace) or "full" (+ mean_gsnr, cabs,
            early_stopping, grad_hist_2d), or a list of names; None (default) records
            none.
        instrument_freq: steps between two steps the instruments are recorded at
            (Alpha also takes the next step's batch).
    """

    def __init__(self, log_dir, thresholds=(1e-7, 1e-5), ema_decay=0.9,
                 histogram_freq=30, histogram_bins=1000, sign_map_freq="epoch",
                 sign_map_max_params=65536, probes=(), probe_data=None, tensorboard=True,
                 update_freq="batch", variable_update_freq=200, resume=False,
                 checkpoint_freq=1, diagnosis=True, stop_on=None, verbose=0,
                 instruments=None, instrument_freq=1):
        super().__init__()
        compat.check_backend()
        self.log_dir = validate_log_dir(log_dir)
        self.options = InsightOptions(
            thresholds=thresholds, ema_decay=ema_decay, histogram_freq=histogram_freq,
            histogram_bins=histogram_bins, sign_map_freq=sign_map_freq,
            sign_map_max_params=sign_map_max_params, probes=probes, probe_data=probe_data,
            tensorboard=tensorboard, update_freq=update_freq,
            variable_update_freq=variable_update_freq, resume=resume,
            checkpoint_freq=checkpoint_freq, diagnosis=diagnosis, stop_on=stop_on,
            verbose=verbose, instruments=instruments, instrument_freq=instrument_freq)
        self.recorder = None  # made at the first fit; a further fit continues its run
        self._traced = None  # (what it was traced for, the insight train function)
        self._fits = 0  # fits begun on the model (`_count_fits`)
        self._fit = None  # the number of the fit being recorded, None between fits

    def on_train_begin(self, logs=None):
        model = self.model
        self._end_fit()  # a previous fit that ended in an exception outside the step
        if not isinstance(model, InsightModel) \
                and type(model).train_step is not keras.Model.train_step:
            raise ValueError(
                f"model {model.name!r} has its own train_step, which the callback would "
                "replace; record it with oi.InsightRecorder instead: call "
                "recorder.apply_gradients where it calls optimizer.apply_gradients "
                "(README: Custom training loops)")
        if self.recorder is None:
            recorder = InsightRecorder(
                self.log_dir, model, model.optimizer, **self.options.as_kwargs(),
                jit_compile=bool(getattr(model, "jit_compile", False)),
                steps_per_call=self._steps_per_call(model))
            if model.built:  # else it starts in the first step, once the model is built
                recorder.start()
            elif self.options.resume:
                raise ValueError(f"resume needs model {model.name!r} built before fit "
                                 "(an Input first, or model.build(input_shape))")
            self.recorder = recorder
            if recorder.initial_epoch:  # resumed: fit continues after the checkpoint
                compat.set_initial_epoch(model, recorder.initial_epoch)
        self.recorder.sync_step()  # a step interrupted after it was applied counts
        self.recorder.optimizer = model.optimizer  # recompiling may have changed it
        self.recorder.trainable_changed()  # fine-tuning: layers unfrozen or frozen
        self.recorder.ensure_steps_per_call(self._steps_per_call(model))
        self._install(model)
        self._fit = self._fits  # this fit's number
        atexit.register(self._end_fit)

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
        if self._traced is None or len(self._traced[0]) != len(traced_for) or not all(
                a is b for a, b in zip(self._traced[0], traced_for)):
            model.make_train_function(force=True)
            self._traced = (traced_for, model.train_function)
        model.train_function = self._guarded(self._traced[1])
        self._count_fits(model)

    def _count_fits(self, model):
        """Count the fits of `model` from now on: each calls make_train_function before
        its callbacks begin, evaluate and predict do not (Keras before 3.4 gives those
        a History of their own on `model.history`, so it cannot tell a fit)."""
        make = type(model).make_train_function.__get__(model)

        def make_train_function(force=False):
            self._fits += 1
            return make(force)

        model.make_train_function = make_train_function

    def _guarded(self, train_function):
        """`train_function` that ends the recording when it raises (Ctrl-C, an error in
        the step: Keras does not call on_train_end then), and that hands a later fit
        without this callback the model's own train function."""
        def guarded(iterator):
            if self._fits != self._fit:  # a fit this callback is not in
                self._end_fit()
                self.model.make_train_function()
                return self.model.train_function(iterator)
            try:
                return train_function(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                raise  # a dataset of unknown length ended: fit goes on to the next epoch
            except BaseException:
                self._end_fit()
                raise
        return guarded

    def _traced_for(self, model):
        """What the traced train function depends on, compared by identity."""
        return (model, self.recorder, model.optimizer, getattr(model, "_compile_loss", None),
                getattr(model, "_compile_metrics", None), model.jit_compile, model.run_eagerly,
                self._steps_per_call(model), *model.trainable_variables)

    @property
    def async_safe(self):
        """Keras may run `on_train_batch_end` on a thread pool, overlapping the next
        step (its asynchronous dispatch), unless stop_on asks for a stop at the very
        step whose loss is not finite. The recording's host work happens in
        `on_train_batch_begin`, on the training thread, between two steps."""
        return self.options.stop_on is None

    def on_train_batch_begin(self, batch, logs=None):
        self._catch_up(batch)  # `batch` steps of this epoch have finished

    def on_train_batch_end(self, batch, logs=None):
        if not self.options.stop_on:
            return
        # synchronous (not async_safe): the schedule's work now, and the loss checked
        self._catch_up(batch + 1 if self._steps_per_call(self.model) == 1 else None)
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.recorder.stop(f"the loss is {float(loss)} at step {self.recorder.step}")
        self.model.stop_training |= self.recorder.stop_reason is not None

    def _catch_up(self, finished=None):
        """Tell the recorder about the steps finished since it last heard (histograms,
        sign maps, probes due among them run now, at the weights they were due at).

        finished: steps finished in this epoch; None reads the tracker's device count
        (an epoch's last call of steps_per_execution may run fewer steps)."""
        recorder = self.recorder
        if recorder.tracker is None:  # built in the first step
            return
        step = int(recorder.tracker.step.numpy()) if finished is None \
            else recorder.epoch_start_step + finished
        if step > recorder.step:
            recorder.batch_end(step)

    def on_epoch_end(self, epoch, logs=None):
        self._catch_up()
        self.recorder.epoch_end(logs=logs)
        if self.recorder.stop_reason is not None:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self._end_fit()

    def _end_fit(self):
        """Restore the model's own train step and write everything recorded; once per
        fit, however the fit ends."""
        if self._fit is None:
            return
        model, self._fit = self.model, None
        atexit.unregister(self._end_fit)
        if isinstance(model, InsightModel):
            model.attach_recorder(None)
        else:
            model.__dict__.pop("train_step", None)
        model.__dict__.pop("make_train_function", None)
        model.train_function = None
        if self.recorder.tracker is not None:
            self.recorder.end_partial_epoch()  # fit stopped inside an epoch
            self.recorder.close()

"""InsightRecorder: records the optimization of a training loop, `fit`'s or your own.

In the compiled step, `apply_gradients` replaces `optimizer.apply_gradients`: it
applies the gradients and has the `DynamicsTracker` reduce the step to a few hundred
numbers on the device. On the host, `batch_end` reads those rows and the histograms
in bursts (READ_EVERY_STEPS / READ_EVERY_SECONDS) and hands them to the `RunLog`; it
also schedules sign maps and probes. `epoch_end` closes an epoch: insight.json,
checkpoint, diagnosis. `OptimizationInsightCallback` drives one recorder from `fit`.

Under a multi-worker strategy every worker records the same steps on its device (the
statistics are of the all-reduced gradient) and runs the probes (which may use
collective ops), but only the chief reads the rows and writes `log_dir`; the other
workers touch no file.
"""

import math
import re
import sys
import time

import numpy as np
import tensorflow as tf

from optinsight import compat
from optinsight.architecture import optimizer_facts, output_facts, variable_activations
from optinsight.checkpoint import (
    check_resume,
    load_weights,
    read_checkpoint,
    restore_tracker,
    save_checkpoint,
    weight_positions,
)
from optinsight.diagnose import diagnose_run
from optinsight.dynamics import DynamicsTracker
from optinsight.instrument_tracker import InstrumentTracker
from optinsight.instruments import StepInstruments, plain_sgd
from optinsight.locate import NonfiniteLocator
from optinsight.logs.run_log import Layout, RunLog
from optinsight.metrics import GLOBAL_STATS, model_metric_names
from optinsight.options import InsightOptions, prepare_log_dir, validate_log_dir
from optinsight.probes.common import check_input_shape, optimizer_learning_rate

#: The tracker's rows are read (and their log lines written) once this many steps
#: have accumulated or this many seconds have passed, whichever comes first: one
#: device read and one hand-over to the writer thread per burst instead of per step.
READ_EVERY_STEPS = 32
READ_EVERY_SECONDS = 1.0
#: Histograms wait on the device with the rows, read with them, when every histogram
#: step between two reads fits in this many bytes of the tracker's ring buffer;
#: otherwise each is read at its step, which waits for that step to finish.
HISTOGRAM_BUFFER_BYTES = 64 << 20


def applied_gradients(optimizer, gradients):
    """What a Keras `optimizer` will apply for `gradients` (call it before
    `apply_gradients`, while the loss scale is the one the gradients carry): loss
    scaling removed, then clipped as the optimizer clips (clipnorm, global_clipnorm,
    clipvalue). None gradients count as zeros.

    Returns (applied, raw): raw the gradients before clipping when the optimizer
    clips, else None (they are the applied ones)."""
    inner = getattr(optimizer, "inner_optimizer", None)  # keras LossScaleOptimizer
    scale = None
    if inner is not None:
        scale = optimizer.dynamic_scale if optimizer.built else optimizer.initial_scale
        optimizer = inner
    factor = getattr(optimizer, "loss_scale_factor", None)
    out = []
    for g in gradients:
        g = tf.cast(tf.convert_to_tensor(g), tf.float32)
        if scale is not None:
            g = g / tf.cast(scale, tf.float32)
        if factor:
            g = g / factor
        out.append(g)
    if getattr(optimizer, "clipnorm", None) or getattr(optimizer, "global_clipnorm", None) \
            or getattr(optimizer, "clipvalue", None):
        return compat.clip_gradients(optimizer, out), out
    return out, None


def skips_step(optimizer, gradients):
    """Whether a Keras `LossScaleOptimizer` will apply nothing for these (unscaled)
    `gradients`: it skips a step with a non-finite gradient and lowers its scale.
    A bool tensor; False for any other optimizer."""
    if getattr(optimizer, "inner_optimizer", None) is None:
        return False
    return tf.logical_not(tf.reduce_all(
        tf.stack([tf.reduce_all(tf.math.is_finite(g)) for g in gradients])))


def error_line(error):
    """The line that says what went wrong: the innermost cause of `error`, without the
    wrappers Keras and TensorFlow add ("Exception encountered when calling ...",
    "in user code:", file lines, the arguments received)."""
    while error.__cause__ is not None:
        error = error.__cause__
    skip = ("Exception encountered when calling", "in user code:", "File ", "Arguments received",
            "•", "Traceback", "Call arguments received")
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and not line.startswith(skip)]
    name, line = type(error).__name__, lines[-1] if lines else ""
    return line if line.startswith(f"{name}: ") else f"{name}: {line}".rstrip(": ")


def is_chief(strategy):
    """Whether this process writes the logs: the chief of a multi-worker strategy, and
    any process under a single-worker one."""
    return bool(getattr(strategy.extended, "should_checkpoint", True))


class InsightRecorder:
    """Records a training loop's optimization dynamics into `log_dir` (docs/logs.md).

    Args:
        log_dir: directory of the run's logs; created if missing.
        model: the keras.Model being trained (probes run on it, checkpoints save it).
        optimizer: the Keras optimizer that applies the gradients (`apply_gradients`).
        jit_compile: the train step is compiled with XLA (`tf.function(jit_compile=
            True)`); the statistics then use their XLA version, not the native kernel.
        steps_per_call: the most train steps run between two `batch_end` calls.
        **options: as `OptimizationInsightCallback` (thresholds, ema_decay,
            histogram_freq, histogram_bins, sign_map_freq, sign_map_max_params,
            probes, probe_data, tensorboard, update_freq, variable_update_freq,
            resume, checkpoint_freq, diagnosis, stop_on, verbose).

    Use it as a context manager (`close()` on exit, also on an exception). With
    `resume=True`, continue the loop at epoch `initial_epoch`, step `step`.
    """

    def __init__(self, log_dir, model, optimizer, *, jit_compile=False, steps_per_call=1,
                 **options):
        compat.check_backend()
        self.log_dir = validate_log_dir(log_dir)
        self.layout = Layout(self.log_dir)  # where each file of the run lives
        self.options = InsightOptions.of(options)
        self._probes = self.options.probe_schedules()  # [(probe, kind, Every)]
        self.model, self.optimizer = model, optimizer
        self.jit_compile, self.steps_per_call = bool(jit_compile), int(steps_per_call)
        self.tracker = None  # of the variables trained now
        self.instrument_tracker = None  # with instruments=: Cockpit's, in the step
        self.step_instruments = None  # its rows -> instruments.jsonl records
        self.names, self.sizes = [], {}  # every variable the run has trained, in order
        self.variable_changes = []  # [{"step", "added", "removed"}]: trainable_changed
        self.partial_epochs = []  # epochs that training stopped inside
        self.nonfinite_origin = None  # where NaN/Inf first appeared before a resume
        self.log = None  # the run's RunLog on the chief; None on other workers
        self.step = 0  # steps trained
        self.epoch = 0  # the epoch being trained (epochs finished)
        self.initial_epoch = 0  # where this session started: > 0 after resume
        self._read = 0  # steps whose rows were read from the tracker
        self.epoch_start_step = 0  # self.step when the current epoch began
        self._histogram_step = 0  # the last histogram step written
        self._reported = set()  # (code, layer) of findings already printed
        self._next_read = 0.0
        self.stop_reason = None  # with stop_on="error": why training should stop
        if model.trainable_variables:
            self.start()

    # ------------------------------------------------------------- lifecycle
    def start(self):
        """Build the tracker, open (or resume) the log dir and run the step-0 probes.
        Runs at construction when the model is built, else at the first
        `apply_gradients`."""
        if self.tracker is not None:
            return
        model, options = self.model, self.options
        variables = list(model.trainable_variables)
        if not variables:
            raise ValueError(f"model {model.name!r} has no trainable variables; "
                             "there is no optimization to record")
        strategy = self._strategy()
        chief = is_chief(strategy)
        if chief:
            prepare_log_dir(self.log_dir)
            if not options.resume and self.layout.holds_run():
                raise ValueError(
                    f"log_dir {self.log_dir!r} already holds a run; pass resume=True to "
                    "continue it, or choose another log_dir")
        elif options.resume:
            raise ValueError("resume=True is not supported under a multi-worker "
                             "strategy: the checkpoint is on the chief only")
        if options.probes:  # before any step or probe runs
            check_input_shape(model, options.probe_data[0], "probe_data's x")
        tracker = self._new_tracker(variables, strategy)
        instrument_tracker = self._new_instrument_tracker(variables, strategy)
        checkpoint = read_checkpoint(self.layout.checkpoint) if options.resume \
            else None
        if options.resume and checkpoint is None and self.layout.holds_run():
            raise ValueError(
                f"log_dir {self.log_dir!r} holds a run but no checkpoint to resume "
                "from (checkpoint_freq was 0 or it stopped in its first epoch)")
        self.names, self.sizes = list(tracker.names), dict(zip(tracker.names, tracker.sizes))
        self.variable_changes = []
        self.activations, self.positions, self.model_facts = {}, {}, {}
        document = None
        if checkpoint is not None:
            document = self._resume(tracker, *checkpoint)
            if instrument_tracker is not None:
                instrument_tracker.load_state(checkpoint[1])
        self._note_model(tracker)
        if chief:
            self.log = RunLog(self.layout, self.names, options)
        self.tracker = tracker
        self._use_instruments(instrument_tracker)
        self.locator = NonfiniteLocator(model, tracker._state)
        if checkpoint is not None:
            self._restore(checkpoint[0], document)
        if options.verbose and chief:
            print(f"optinsight: logging to {self.log_dir}", file=sys.stderr)
        self._next_read = time.monotonic() + READ_EVERY_SECONDS
        if self.step == 0:
            for probe, kind, _ in self._probes:  # the starting point: step 0
                self._run_probe(probe, kind)

    def _resume(self, tracker, state, saved):
        """Check the run in log_dir against the options, then restore the tracker, the
        weights and the optimizer from the checkpoint (`state`, the tracker's `saved`
        state) and take the run's variable names and changes; returns insight.json's
        document (None if there is none). Nothing is changed when a check fails."""
        document = RunLog.previous_document(self.layout)
        if document is not None:
            check_resume(self.log_dir, document, self.options, model_metric_names(
                self.options.thresholds, self.options.ema_decay))
        model = self.model
        positions = weight_positions(model, tracker.tracked_variables)
        change = restore_tracker(tracker, saved, positions,
                                 [int(np.prod(w.shape)) for w in model.weights])
        restored = load_weights(self.layout.checkpoint, state, model, self.optimizer,
                                saved.get("positions", positions), positions)
        self.names = list(tracker.names)
        if document is not None:
            meta = document["meta"]
            self.sizes.update(zip(meta["variables"], meta["variable_sizes"]))
            # Changes at or after the checkpoint's step came after it: dropped, with
            # the variables only they added.
            changes = meta.get("variable_changes", [])
            self.variable_changes = [c for c in changes if c["step"] < state["step"]]
            later = {n for c in changes if c["step"] >= state["step"] for n in c["added"]}
            known = [n for n in meta["variables"] if n not in later]
            self.names = known + [n for n in self.names if n not in known]
            self.partial_epochs = [e for e in meta.get("partial_epochs", [])
                                   if e < state["epoch"]]
            origin = meta.get("nonfinite_origin")
            self.nonfinite_origin = origin if origin and origin["step"] <= state["step"] \
                else None
        self.sizes.update(zip(tracker.names, tracker.sizes))
        if change is not None:
            self.variable_changes.append({"step": int(state["step"]), **change})
        if is_chief(self._strategy()):
            print(f"optinsight: resumed {self.log_dir} after epoch {state['epoch']} (step "
                  f"{state['step']}): weights, recording state and optimizer ({restored}) "
                  "restored" + ("" if change is None else
                                f"; trainable variables changed: {len(change['added'])} "
                                f"added, {len(change['removed'])} removed"),
                  file=sys.stderr)
        return document

    def _note_model(self, tracker):
        """What the diagnosis reads of the model (`architecture`), under the run's
        variable names: each variable's activation and place in `model.weights`, the
        output activation and loss, the optimizer's second-moment decay."""
        variables = tracker.tracked_variables
        found = variable_activations(self.model, variables)
        self.activations.update({n: a for n, a in zip(tracker.names, found) if a})
        positions = weight_positions(self.model, variables)
        self.positions.update({n: p for n, p in zip(tracker.names, positions) if p >= 0})
        in_order = [a for _, a in sorted(zip(positions, found), key=lambda pa: pa[0]) if a]
        self.model_facts = {"output": output_facts(self.model, in_order),
                            "optimizer": None if self.optimizer is None
                            else optimizer_facts(self.optimizer)}

    def sync_step(self):
        """Count the steps the tracker recorded (the device's count): a step that an
        exception (Ctrl-C, another callback) interrupted after it was applied counts,
        although no `batch_end` followed it."""
        if self.tracker is not None:
            self.step = max(self.step, int(self.tracker.step.numpy()))

    def _strategy(self):
        """The tf.distribute strategy the model trains under."""
        return getattr(self.model, "distribute_strategy", None) or tf.distribute.get_strategy()

    def _new_tracker(self, variables, strategy):
        """A DynamicsTracker of `variables`, its step counter at the run's; the
        optimizer built for them if it is not yet."""
        options = self.options
        tracker = DynamicsTracker(
            variables, options.thresholds, options.ema_decay, options.histogram_freq.steps,
            options.histogram_bins, buffer_size=READ_EVERY_STEPS + self.steps_per_call,
            # A custom op cannot run inside an XLA-compiled train step.
            kernel="xla" if self.jit_compile else "auto", strategy=strategy)
        tracker.ensure_buffer(0, self._histogram_steps(tracker))
        tracker.step.assign(self.step)
        if self.optimizer is not None and not self.optimizer.built:
            with strategy.scope():  # its state exists before the step is traced
                self.optimizer.build(variables)
        return tracker

    def _new_instrument_tracker(self, variables, strategy):
        """An InstrumentTracker of `variables` with the instruments= option, or None."""
        options = self.options
        if not options.instruments:
            return None
        if strategy.num_replicas_in_sync > 1:
            raise ValueError("instruments= is not supported under a strategy with "
                             f"{strategy.num_replicas_in_sync} replicas: the per-example "
                             "gradients would need every replica's batch")
        return InstrumentTracker(
            self.model, variables, options.instruments, options.instrument_freq.steps,
            READ_EVERY_STEPS + self.steps_per_call, strategy,
            loss_scaled=getattr(self.optimizer, "inner_optimizer", None) is not None,
            kernel="xla" if self.jit_compile else "auto")

    def _use_instruments(self, instrument_tracker):
        """Record the instruments with `instrument_tracker` (None: no instruments) from
        the next step on, for the tracker's variables."""
        self.instrument_tracker = instrument_tracker
        if instrument_tracker is None:
            return
        optimizer = self.optimizer
        sgd = optimizer is not None and plain_sgd(optimizer)
        self.step_instruments = StepInstruments(
            self.options.instruments, self.tracker.names,
            optimizer_learning_rate(optimizer) if sgd else None)

    def trainable_changed(self):
        """Record the model's trainable variables as they are now (fine-tuning: layers
        unfrozen or frozen). Call between steps, outside the compiled step, and trace
        the step again. Variables that stop training have null rows from the next step
        on; new ones have null rows before it; `meta.variable_changes` in insight.json
        lists each change. The first step after it has no previous gradient: its
        metrics that compare with step t-1 are null, as at a run's first step."""
        old = self.tracker
        variables = list(self.model.trainable_variables)
        if old is None or tuple(map(id, variables)) == tuple(map(id, old.tracked_variables)):
            return
        if self.log is not None:
            self._read_rows()
        tracker = self._new_tracker(variables, self._strategy())
        added = [n for n in tracker.names if n not in old.names]
        removed = [n for n in old.names if n not in tracker.names]
        self.variable_changes.append({"step": self.step, "added": added, "removed": removed})
        new = [n for n in added if n not in self.names]
        self.names += new
        self.sizes.update(zip(tracker.names, tracker.sizes))
        self._note_model(tracker)
        if self.log is not None and new:
            self.log.add_variables(new)
        self.tracker = tracker
        if self.log is not None and self.step_instruments is not None:
            self.log.instruments(self.step_instruments.flush())
        # distance counts from here, for the variables trained from here on
        self._use_instruments(self._new_instrument_tracker(variables, self._strategy()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        """Write every step recorded so far and insight.json (of the finished epochs),
        and close the files. A later step or
        epoch (a further `fit` with the callback) opens them again."""
        if self.log is None:
            return
        self._read_rows()
        if self.step_instruments is not None:
            self.log.instruments(self.step_instruments.flush())
        self.log.flush()
        self.log.write_summary(self.summary(), self.step, epoch_end=False)
        self.log.zero_since(self.tracker.read_zero_since(), self.step)
        self.log.close()

    def ensure_steps_per_call(self, steps):
        """Make room for `steps` train steps between two `batch_end` calls (a model
        recompiled with a larger steps_per_execution); the step must be traced again."""
        self.steps_per_call = max(self.steps_per_call, int(steps))
        if self.tracker is not None:
            self.tracker.ensure_buffer(READ_EVERY_STEPS + self.steps_per_call,
                                       self._histogram_steps(self.tracker))
        if self.instrument_tracker is not None:
            self.instrument_tracker.ensure_buffer(READ_EVERY_STEPS + self.steps_per_call)

    # ----------------------------------------------------------- in the step
    def training_pass_layers(self):
        """The layers whose inputs and output gradients the train step should record for
        the instruments (`per_example.recording`), or None."""
        tracker = self.instrument_tracker
        return None if tracker is None else tracker.training_pass_layers()

    def apply_gradients(self, grads_and_vars, loss=None, inputs=None, targets=None,
                        training_pass=None):
        """`optimizer.apply_gradients(grads_and_vars)`, recorded. Call it in the
        (compiled) train step, in each replica under a tf.distribute strategy.

        Args:
            grads_and_vars: (gradient, variable) pairs; variables not among the
                model's trainable variables raise ValueError, missing ones count as
                zero gradients.
            loss: the scalar whose gradients these are (under a strategy, each
                replica's share: train_loss is the sum over replicas); None leaves
                train_loss null.
            inputs: the batch's model inputs (optional): at the run's first step with
                NaN/Inf, the first layer whose output is not finite is located on them
                (`optinsight.locate`), for the diagnosis.
            targets: the batch's targets, as the compiled loss takes them; with
                `instruments=`, the instruments need both inputs and targets.
            training_pass: (records, output gradients, model outputs, tape) of the
                step's pass around `per_example.recording(training_pass_layers())`,
                the gradients of the unscaled batch-mean loss, and its tape,
                persistent (needed for the TIC only); optional: without it the
                instruments take a pass of their own.
        Returns what `optimizer.apply_gradients` returns.
        """
        pairs = list(grads_and_vars)
        if self.tracker is None:
            with tf.init_scope():  # the tracker's state lives outside the traced step
                self.start()
        tracked = {id(v): i for i, v in enumerate(self.tracker.tracked_variables)}
        grads = [None] * len(tracked)
        for g, v in pairs:
            if id(v) not in tracked:
                raise ValueError(
                    f"variable {getattr(v, 'path', v.name)!r} is not among the "
                    f"{len(tracked)} trainable variables the recorder of "
                    f"{self.model.name!r} records now (made trainable after recording "
                    "started, as in fine-tuning? call recorder.trainable_changed() "
                    "before the next step, and trace the step again)")
            grads[tracked[id(v)]] = g
        grads = [tf.zeros(v.shape) if g is None else g
                 for g, v in zip(grads, self.tracker.tracked_variables)]
        applied, raw = applied_gradients(self.optimizer, grads)  # before the scale moves
        skipped = skips_step(self.optimizer, applied if raw is None else raw)
        weights_before = self.tracker.read_weights()
        self.locator.in_step(inputs, loss, skipped, self.tracker.step.read_value() + 1)
        result = self.optimizer.apply_gradients(pairs)
        self.tracker.update(applied, weights_before,
                            tf.constant(math.nan, tf.float64) if loss is None else loss, raw,
                            skipped)
        if self.instrument_tracker is not None:
            if inputs is None or targets is None:
                raise ValueError("instruments= needs the batch: pass inputs= and targets= "
                                 "to recorder.apply_gradients")
            self.instrument_tracker.record(self.tracker.step.read_value(), weights_before,
                                           inputs, targets, training_pass)
        return result

    # --------------------------------------------------------------- batches
    def batch_end(self, step=None):
        """After a train step (host side): hand finished steps to the writers, and
        take histograms, sign maps and probes when due.

        step: the number of steps trained so far in the run; None counts one more.
        """
        previous = self.step
        self.step = previous + 1 if step is None else int(step)

        options = self.options
        if self.log is not None:
            if self.step - self._read >= READ_EVERY_STEPS \
                    or time.monotonic() >= self._next_read:
                self._read_rows()
            if options.histogram_freq.due(previous, self.step) \
                    and not self._histograms_wait():
                self._record_histograms()
            if options.sign_map_freq.due(previous, self.step):
                self._record_sign_map(f"step_{self.step:08d}")
        for probe, kind, every in self._probes:
            if every.due(previous, self.step):
                self._run_probe(probe, kind)

    def _read_rows(self):
        """Hand the tracker's rows after the last read to the writer thread."""
        self._next_read = time.monotonic() + READ_EVERY_SECONDS
        rows = self.tracker.read_rows(self._read)
        if not rows:
            return
        if rows[0][0] > self._read + 1:
            print(f"optinsight: steps {self._read + 1} to {rows[0][0] - 1} were not "
                  f"recorded: more than {self.tracker.buffer_size} steps ran between two "
                  "batch_end calls (raise steps_per_call)", file=sys.stderr)
        self._read = rows[-1][0]
        if list(self.tracker.names) != self.names:  # the run's variables in the run's order
            slots = [self.names.index(n) for n in self.tracker.names]
            expanded = []
            for row in rows:
                full = np.full((len(self.names), row.stats.shape[1]), np.nan)
                full[slots] = row.stats
                expanded.append(row._replace(stats=full))
            rows = expanded
        self.log.rows(rows, self.epoch, self.epoch_start_step)
        if self.tracker.histogram_freq:
            self._record_histograms()
        if self.instrument_tracker is not None:
            self.log.instruments(self.step_instruments.records(
                self.instrument_tracker.read_rows(rows[0].step - 1), self.epoch,
                self.epoch_start_step))
        if self.options.stop_on:
            nonfinite = GLOBAL_STATS.index("nonfinite")
            for row in rows:  # a loss-scale skip discards its overflow by design
                if not row.skipped and np.nansum(row.stats[:, nonfinite]) > 0:
                    self.stop(f"NaN/Inf gradients at step {row.step}")
                    break

    def _histogram_steps(self, tracker):
        """Steps whose histograms `tracker`'s ring buffer must hold: every step between
        two reads of the rows when that fits HISTOGRAM_BUFFER_BYTES, else one call's."""
        steps, every = READ_EVERY_STEPS + self.steps_per_call, tracker.histogram_freq
        slot_bytes = 2 * len(tracker.sizes) * (4 * max(tracker.histogram_bins, 1) + 16) + 8
        fits = every and (math.ceil(steps / every) + 1) * slot_bytes <= HISTOGRAM_BUFFER_BYTES
        return steps if fits else self.steps_per_call

    def _histograms_wait(self):
        """Whether the histograms wait for the rows' read (`_histogram_steps`)."""
        tracker = self.tracker
        return (tracker.histogram_slots - 1) * tracker.histogram_freq \
            >= READ_EVERY_STEPS + self.steps_per_call

    def _record_histograms(self):
        steps = self.tracker.read_histograms(self._histogram_step)
        if steps:
            self._histogram_step = steps[-1][0]
            self.log.histograms(steps, self.epoch, self.tracker.names)

    def _record_sign_map(self, label):
        self.log.sign_map(label, self.step, self.epoch, self.tracker.last_gradients(
            self.options.sign_map_max_params or None))

    # ---------------------------------------------------------------- epochs
    def epoch_end(self, epoch=None, logs=None):
        """End the current epoch (number `self.epoch`; `epoch`, if given, must equal
        it). logs: Keras-style epoch logs ("loss", "val_loss", "accuracy", ...)."""
        if epoch is not None and epoch != self.epoch:
            raise ValueError(f"epoch_end({epoch}) but the recorder is at epoch "
                             f"{self.epoch}; after resume, count epochs from "
                             "recorder.initial_epoch")
        epoch = self.epoch
        if self.log is not None:
            self._end_epoch(epoch, logs or {})
        else:  # other workers run the probes too: they may use collective ops
            self._run_epoch_probes()
        self.epoch, self.epoch_start_step = epoch + 1, self.step

    def _end_epoch(self, epoch, logs):
        options = self.options
        self._read_rows()
        self.log.end_epoch(epoch, self.step, logs)
        if options.sign_map_freq.at_epoch_end:
            self._record_sign_map(f"epoch_{epoch:04d}")
        self._run_epoch_probes()
        document = self.summary()
        self.log.write_summary(document, self.step)
        self.log.zero_since(self.tracker.read_zero_since(), self.step)
        if options.checkpoint_freq.due(epoch, epoch + 1):
            self.log.guarded("checkpoint/", save_checkpoint, self.layout.checkpoint,
                             epoch + 1, self.step, self.model, self.optimizer, self.tracker,
                             self.instrument_tracker.state_dict()
                             if self.instrument_tracker is not None else None)
        if options.diagnosis or options.stop_on:
            self._check_findings(document)

    def end_partial_epoch(self):
        """Close the epoch in progress as a partial one, if it has steps (training
        stopped inside it: an exception, Ctrl-C). Its steps keep their numbers; it is
        listed in `meta.partial_epochs`, has no epoch-wise losses, probes or checkpoint,
        and the next step starts the next epoch."""
        self.sync_step()
        if self.step == self.epoch_start_step:
            return
        if self.log is not None:
            self._read_rows()
            self.log.end_epoch(self.epoch, self.step, {})
        self.partial_epochs.append(self.epoch)
        self.epoch, self.epoch_start_step = self.epoch + 1, self.step

    def run_so_far(self, document):
        """The run as `read_log` loads it, from memory (`document`: `summary()`), with
        the per-variable keys of the diagnosis at up to 4,096 evenly spaced steps."""
        return self.log.run(document)

    def _check_findings(self, document):
        """The diagnosis of the run so far: its new warnings and errors printed (with
        `diagnosis`), and the first error stops training (with stop_on="error")."""
        for finding in diagnose_run(self.run_so_far(document)):
            key = (finding.code, finding.layer)
            if self.options.diagnosis and finding.severity != "info" \
                    and key not in self._reported:
                self._reported.add(key)
                print(f"optinsight: {finding}", file=sys.stderr)
            if finding.severity == "error":
                self.stop(str(finding))

    def stop(self, reason):
        """Ask training to stop (stop_on="error"; `stop_reason` says why; the callback
        sets model.stop_training, a custom loop checks `stop_reason`). The first reason
        is kept and printed."""
        if self.options.stop_on and self.stop_reason is None:
            self.stop_reason = reason
            print(f"optinsight: stop_on='error': stopping training: {reason}",
                  file=sys.stderr)

    def summary(self):
        """The insight.json document (docs/logs.md) of the finished epochs."""
        options = self.options
        return self.log.document({
            "thresholds": list(options.thresholds), "ema_decay": options.ema_decay,
            "variables": list(self.names),
            "variable_sizes": [self.sizes[n] for n in self.names],
            "variable_changes": self.variable_changes,
            "partial_epochs": self.partial_epochs,
            "nonfinite_origin": self.locator.read() or self.nonfinite_origin,
            "activations": self.activations, "positions": self.positions,
            **self.model_facts,
            "steps": self.step, "histogram_bins": options.histogram_bins,
            **options.schedules(),
        })

    # ---------------------------------------------------------------- probes
    def _run_epoch_probes(self):
        for probe, kind, every in self._probes:
            if every.at_epoch_end:
                self._run_probe(probe, kind)

    def _run_probe(self, probe, kind):
        x, y = self.options.probe_data
        record = {"step": self.step, "epoch": self.epoch, "probe": probe.name, "kind": kind}
        began = time.monotonic()
        try:
            result = probe(self.model, x, y)
            if self.options.verbose and self.log is not None:
                print(f"optinsight: probe {probe.name!r} at step {self.step}: "
                      f"{time.monotonic() - began:.1f} s", file=sys.stderr, flush=True)
        except Exception as e:  # a probe must not end a long training run
            if self.log is None:
                return
            message = error_line(e)
            print(f"optinsight: probe {probe.name!r} failed at step {self.step}: {message}",
                  file=sys.stderr)
            self.log.probe_error(record, message)
            return
        scalars, arrays = {}, {}
        for key, value in result.items():
            if value is None:  # undefined (e.g. no stability limit): written as null
                scalars[key] = math.nan
            elif np.ndim(value) == 0:
                scalars[key] = float(value)
            else:
                arrays[key] = np.asarray(value)
        if self.log is None:
            return
        self.log.probe(record, scalars, arrays)

    # ---------------------------------------------------------------- resume
    def _restore(self, state, document):
        """Continue after the checkpoint `state` (its state.json): counters, the
        finished epochs of insight.json's `document` (None if there is none), and the
        logs truncated to its step."""
        self.step = self._read = self.epoch_start_step = int(state["step"])
        self.epoch = self.initial_epoch = int(state["epoch"])
        self._histogram_step = self.step
        self.log.truncate_to(self.step, self.epoch, document)

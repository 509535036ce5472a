"""`RunLog`: the one owner of a run's record (docs/logs.md; docs/architecture.md).

It holds the log dir's layout, the writers and their thread (`RunWriter`), the
finished epochs kept in memory (`RunHistory`), the thinned per-variable history the
diagnosis reads, and the probe evaluations. The recorder hands it what it read from
the device and asks it for the run so far (`run`, from memory, never from disk) and,
at resume, to drop what came after a checkpoint (`truncate_to`). It names every file
through `Layout`; the recorder names none.
"""

import os

import pandas as pd

from optinsight.logs.jsonlog import read_json, read_jsonl, truncate_jsonl
from optinsight.logs.layout import Layout
from optinsight.logs.reader import instrument_row, part_matrix, probe_row
from optinsight.logs.run_writer import RunWriter
from optinsight.logs.store import part_paths, truncate_parts
from optinsight.logs.summary import RunHistory
from optinsight.logs.tensorboard import truncate_events
from optinsight.metrics import metric_names, model_metric_names

__all__ = ["Layout", "RunLog"]  # the facade the recorder imports

#: Instrument steps a run in memory keeps (evenly spaced), for the diagnosis.
MAX_INSTRUMENT_ROWS = 4096


class RunLog:
    """The record of the run laid out as `layout` (a `Layout`; its dir exists), of
    variables `names` in the tracker's order, recorded with `options` (an
    `InsightOptions`)."""

    def __init__(self, layout, names, options):
        self.layout = layout
        self.history = RunHistory(names, metric_names(options.thresholds, options.ema_decay),
                                  model_metric_names(options.thresholds, options.ema_decay))
        self.writer = RunWriter(self.layout, names, options)
        self._probes = []  # every probe evaluation, as `read_log`'s probes frame rows
        self._instruments = []  # instrument steps, whole-model, thinned (`_keep`)
        self._instrument_stride, self._instrument_seen = 1, 0

    @staticmethod
    def previous_document(layout):
        """insight.json of the run already laid out as `layout`, or None."""
        path = layout.insight_json
        return read_json(path) if os.path.exists(path) else None

    # ------------------------------------------------------------- writing
    def rows(self, rows, epoch, epoch_start):
        """A burst of device rows (`metrics.Row`) of `epoch`, whose first step is
        epoch_start + 1, to every per-step file (on the writer thread)."""
        self.writer.rows(rows, epoch, epoch_start)

    def histograms(self, steps, epoch, names):
        self.writer.histograms(steps, epoch, names)

    def sign_map(self, label, step, epoch, gradients):
        self.writer.sign_map(label, step, epoch, gradients)

    def zero_since(self, arrays, step):
        self.writer.zero_since(arrays, step)

    def probe(self, record, scalars, arrays):
        """A probe evaluation: `record` ({"step", "epoch", "probe", "kind"}), its scalars
        and arrays."""
        self._probes.append(probe_row(self.writer.probe(record, scalars, arrays)))

    def probe_error(self, record, message):
        """A probe evaluation that failed, and why (one line)."""
        self._probes.append(probe_row(self.writer.probe_error(record, message)))

    def instruments(self, records):
        """Instrument records (`instruments.StepInstruments`) of steps after the last."""
        self.writer.instruments(records)
        for record in records:
            self._keep(instrument_row(record, distances=False))

    def _keep(self, row):
        """Keep at most MAX_INSTRUMENT_ROWS evenly spaced instrument steps in memory:
        when full, every other one goes and only every 2nd (4th, ...) later one is
        kept."""
        if self._instrument_seen % self._instrument_stride == 0:
            self._instruments.append(row)
        self._instrument_seen += 1
        if len(self._instruments) > MAX_INSTRUMENT_ROWS:
            self._instruments = self._instruments[::2]
            self._instrument_stride *= 2

    def add_variables(self, names):
        """Variables trained from now on that were not before."""
        self.writer.add_variables(names)
        self.history.add_variables(names)

    def end_epoch(self, epoch, step, logs):
        """Close epoch `epoch` (the run at `step`; Keras-style `logs`, {} for a partial
        epoch): its rows are flushed and kept in memory."""
        steps, model_rows, means = self.writer.end_epoch(step)
        self.history.add_epoch(epoch, steps, model_rows, means, logs)

    def document(self, meta):
        """The insight.json document of the finished epochs, with `meta`."""
        return self.history.document(meta, self._probes)

    def write_summary(self, document, step, epoch_end=True):
        """insight.json, and at an epoch end the epoch-wise TensorBoard scalars."""
        scalars = {k: v[-1] for k, v in self.history.epoch_wise.items()} if epoch_end else {}
        self.writer.epoch_summary(document, scalars, step)

    def guarded(self, name, write, *args):
        """write(*args) for `name` (a file or folder of the log dir) through the write
        guard: a failure prints one line and is not raised."""
        return self.writer.guard.run(name, write, *args)

    def flush(self):
        """Wait until everything handed over is written."""
        self.writer.flush()

    def close(self):
        self.writer.close()

    # ------------------------------------------------------------- reading
    def run(self, document):
        """The run as `read_log` loads it, from memory (`document`: `document()`), with
        the per-variable keys of the diagnosis at up to 4,096 evenly spaced steps."""
        return self.history.run(document, self.layout.root, self.writer.step_log.history,
                                pd.DataFrame(self._probes), pd.DataFrame(self._instruments))

    # -------------------------------------------------------------- resume
    def truncate_to(self, step, epochs, document):
        """Continue after a checkpoint at `step`, after `epochs` epochs: every file
        loses what came after it, and memory is refilled from what is left
        (`document`: the previous insight.json, or None)."""
        layout = self.layout
        for path in (layout.steps_jsonl, layout.probes_jsonl, layout.instruments_jsonl):
            truncate_jsonl(path, step)
        for path in (layout.model, layout.layers, layout.histograms):
            truncate_parts(path, step)
        truncate_events(layout.tensorboard_train, step)
        if document is not None:
            self.history.load(document, epochs, step)
        thinned = self.writer.step_log.history  # refilled from layers/, part by part
        for path in part_paths(layout.layers):
            steps, values = part_matrix(path, thinned.keys, self.history.names)
            thinned.append(steps, values)
        if os.path.exists(layout.probes_jsonl):
            self._probes = [probe_row(r) for r in read_jsonl(layout.probes_jsonl)]
        self._instruments, self._instrument_stride, self._instrument_seen = [], 1, 0
        for record in read_jsonl(layout.instruments_jsonl):
            self._keep(instrument_row(record, distances=False))

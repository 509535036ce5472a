"""Every file of a run's log dir (docs/logs.md), written on one writer thread.

`RunWriter` takes what the recorder read from the device (bursts of step rows,
histogram steps, sign maps, probe results, epoch summaries) and writes it: steps.jsonl,
model/, layers/ and TensorBoard through `StepLog`, histograms/, signs/, probes.jsonl,
probes/, instruments.jsonl and insight.json here. Writes of one kind go through a
`WriteGuard`, so a full disk or a failing file never stops training. Files open on
first write; `close()` closes them, and a later write opens them again (a further `fit`
continues the run).
"""

import json
import os

import numpy as np

from optinsight.logs.background import BackgroundWriter
from optinsight.logs.guard import WriteGuard
from optinsight.logs.jsonlog import JsonlWriter, write_json_atomic
from optinsight.logs.step_log import StepLog, histogram_table
from optinsight.logs.store import PartWriter
from optinsight.logs.tensorboard import TensorBoardWriter
from optinsight.metrics import diagnosis_keys
from optinsight.signs import sign_codes, sign_map_image


def save_npz_atomic(path, arrays, compressed):
    """Replace `path` with an .npz of `arrays` through a temporary file and a rename, so
    that it is always a whole file; its folder is created if missing."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.npz"
    try:
        (np.savez_compressed if compressed else np.savez)(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class RunWriter:
    """The writers of one log dir.

    Args:
        layout: the log dir's `Layout` (the dir exists).
        names: variable names, in the tracker's order.
        options: the run's `InsightOptions`.
    """

    def __init__(self, layout, names, options):
        self.layout, self.names, self.options = layout, tuple(names), options
        self.guard = WriteGuard(layout.root)
        self._writers = {}
        self._background = None
        self.step_log = StepLog(
            layout, self.names, options.thresholds, options.ema_decay,
            self._tb if options.tensorboard else None, options.update_freq,
            options.variable_update_freq, diagnosis_keys(options.thresholds), self.guard,
            self._jsonl("steps.jsonl", layout.steps_jsonl))

    # Writers open their files on first write; setdefault (atomic) makes the training
    # thread and the writer thread share one writer per file. Keyed by the names the
    # write guard reports.
    def _jsonl(self, name, path):
        return self._writers.get(name) or self._writers.setdefault(name, JsonlWriter(path))

    @property
    def _tb(self):
        return self._writers.get("tensorboard/") or self._writers.setdefault(
            "tensorboard/", TensorBoardWriter(self.layout.tensorboard_train))

    @property
    def _histogram_store(self):
        return self._writers.get("histograms/") or self._writers.setdefault(
            "histograms/", PartWriter(self.layout.histograms, flush_rows=1))

    def _write(self, name, write, *args):
        """write(*args) through the guard (`name`: the file or folder it writes)."""
        return self.guard.run(name, write, *args)

    def _submit(self, fn, *args):
        """fn(*args) on the writer thread (started on first use)."""
        if self._background is None:
            self._background = BackgroundWriter()
        self._background.submit(fn, *args)

    def flush(self):
        """Wait until everything submitted is written."""
        if self._background is not None:
            self._background.flush()

    # ----------------------------------------------------------------- steps
    def rows(self, rows, epoch, epoch_start):
        """A burst of tracker rows [(step, loss, has_prev, stats)] of `epoch`, whose
        first step is epoch_start + 1."""
        self._submit(self.step_log.write, rows, epoch, epoch_start)

    def histograms(self, steps, epoch, names):
        """Histogram steps [(step, {"gradients"|"weights": (counts, ranges)})] of
        `epoch`, of the variables `names` (those trained at those steps): one write
        of each file."""
        self._submit(self._write_histograms, steps, epoch, names)

    def _write_histograms(self, steps, epoch, names):
        self._write("histograms/", self._histogram_store.write,
                    histogram_table(steps, epoch, names), epoch)
        if self.options.tensorboard:
            self._write("tensorboard/", self._tb.histograms, [({
                f"{kind}/{name}": (counts[i], ranges[i, 0], ranges[i, 1])
                for kind, (counts, ranges) in histograms.items()
                for i, name in enumerate(names)}, step) for step, histograms in steps])

    def add_variables(self, names):
        """Variables trained from now on that were not before (see
        `StepLog.add_variables`); histograms/ starts a new part too."""
        self.flush()
        self.names += tuple(names)
        self.step_log.add_variables(names)
        self._write("histograms/", self._histogram_store.close)

    def sign_map(self, label, step, epoch, gradients):
        """signs/<label>.npz of {name: (strided gradient, stride)}, and TensorBoard
        images."""
        codes = {name: sign_codes(g) for name, (g, _) in gradients.items()}
        strides = {name: stride for name, (_, stride) in gradients.items()}
        meta = json.dumps({"step": step, "epoch": epoch, "strides": strides})
        self._write("signs/", save_npz_atomic, self.layout.sign_map(label),
                    {"_meta": np.array(meta), **codes}, True)
        if self.options.tensorboard:
            for name, c in codes.items():
                self._write("tensorboard/", self._tb.image, f"signs/{name}",
                            sign_map_image(c), step)

    def zero_since(self, arrays, step):
        """units.npz: {variable: zero_since [units]} as of `step`, replaced atomically
        (written now, not on the writer thread: the diagnosis reads it next). Compressed:
        mostly zeros, it was 0.9 MB for a ResNet50 and is a few KB."""
        self._write("units.npz", save_npz_atomic, self.layout.units_npz,
                    {"_step": np.array(step), **arrays}, True)

    # ---------------------------------------------------------------- probes
    def probe(self, record, scalars, arrays):
        """A probe's result: `record` ({"step", "epoch", "probe", "kind"}) with its
        scalars to probes.jsonl, its arrays to probes/<probe>_<step>.npz, scalars to
        TensorBoard. Returns the probes.jsonl record."""
        record = {**record, "values": scalars}
        if arrays:
            path, relative = self.layout.probe_arrays(record["probe"], record["step"])

            def save():
                os.makedirs(self.layout.probes, exist_ok=True)
                np.savez_compressed(path, **arrays)
                return True

            if self._write("probes/", save):
                record["arrays"] = relative
        self._write("probes.jsonl", self._probes_jsonl.write, record)
        if self.options.tensorboard:
            self._write("tensorboard/", self._tb.scalars, {
                f"probes/{record['probe']}/{k}": v for k, v in scalars.items()},
                record["step"])
        return record

    def probe_error(self, record, message):
        """A failed probe's record, with why (one line), to probes.jsonl; returns it."""
        record = {**record, "error": message}
        self._write("probes.jsonl", self._probes_jsonl.write, record)
        return record

    @property
    def _probes_jsonl(self):
        return self._jsonl("probes.jsonl", self.layout.probes_jsonl)

    # ----------------------------------------------------------- instruments
    def instruments(self, records):
        """Instrument records (`instruments.StepInstruments`) to instruments.jsonl and
        their whole-model values to TensorBoard (instruments/<name>)."""
        self._submit(self._write_instruments, records)

    def _write_instruments(self, records):
        jsonl = self._jsonl("instruments.jsonl", self.layout.instruments_jsonl)
        self._write("instruments.jsonl", jsonl.write_many, records)
        if self.options.tensorboard:
            self._write("tensorboard/", self._tb.scalars_at, [
                ({f"instruments/{k}": v for k, v in r["instruments"].items()}, r["step"])
                for r in records])

    # ---------------------------------------------------------------- epochs
    def end_epoch(self, step):
        """Flush the epoch's rows; returns `StepLog.end_epoch`'s (steps, model rows,
        per-variable means)."""
        self.flush()
        return self.step_log.end_epoch(step)

    def epoch_summary(self, document, epoch_scalars, step):
        """insight.json and the epoch-wise TensorBoard scalars."""
        if self.options.tensorboard and epoch_scalars:
            self._write("tensorboard/", self._tb.scalars,
                        {f"insight/epoch/{k}": v for k, v in epoch_scalars.items()}, step)
            self._write("tensorboard/", self._tb.flush)
        self._write("insight.json", write_json_atomic, self.layout.insight_json, document)

    def close(self):
        """Write everything pending and close every file (a later write reopens)."""
        if self._background is not None:
            background, self._background = self._background, None
            background.close()
        self.step_log.close()
        for name, writer in list(self._writers.items()):
            self._write(name, writer.close)

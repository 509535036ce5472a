"""TensorBoard event files of a run, written with tf.summary.

Scalars of one step go out as one Summary protocol buffer (however many tags), those
of many steps in one call; histograms from the counts computed in the train step
(merged into at most `TB_BUCKETS` buckets, as many as TensorBoard shows), all of one
step in one call, and sign maps as images. A failed write raises OSError. The writer
is opened on first use, by whichever thread writes first (the callback's writer thread
or the training thread), and flushed/closed by its owner. Tags: docs/logs.md.
"""

import glob
import math
import os
import threading

import numpy as np
import tensorflow as tf
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorboard.util import tensor_util

#: Buckets per TensorBoard histogram: adjacent bins of the recorded histogram merged.
TB_BUCKETS = 30


def merged_buckets(counts, lo, hi, buckets=TB_BUCKETS):
    """[k, 3] (left edge, right edge, count) of equal-width `counts` over [lo, hi],
    adjacent bins summed so that k <= buckets (counts exact, edges bin edges)."""
    counts = np.asarray(counts, np.float64)
    group = -(-counts.size // buckets)
    starts = np.arange(0, counts.size, group)
    edges = np.linspace(lo, hi, counts.size + 1)
    ends = np.minimum(starts + group, counts.size)
    return np.stack([edges[starts], edges[ends], np.add.reduceat(counts, starts)], axis=1)


def _as_os_error(fn):
    """TensorFlow's write errors (a full disk, I/O) as OSError."""
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except tf.errors.OpError as e:
            raise OSError(str(e.message).splitlines()[0] if e.message else repr(e)) from None
    wrapped.__doc__ = fn.__doc__
    return wrapped


class TensorBoardWriter:
    """Writes scalars, histograms and images under one event-file directory."""

    def __init__(self, directory):
        self.directory = directory
        self._writer = None
        self._write_summaries = None
        self._lock = threading.Lock()  # one opening, seen whole by every thread

    def _get(self):
        with self._lock:
            if self._writer is None:
                writer = tf.summary.create_file_writer(self.directory)

                @tf.function(input_signature=(tf.TensorSpec([None], tf.string),
                                              tf.TensorSpec([None], tf.int64)))
                def write_summaries(summaries, steps):  # traced with `writer` as default
                    for i in tf.range(tf.size(steps)):
                        tf.summary.experimental.write_raw_pb(summaries[i], step=steps[i])

                with writer.as_default():
                    self._write_summaries = write_summaries.get_concrete_function()
                self._writer = writer
            return self._writer

    @_as_os_error
    def scalars(self, values, step):
        """Write {tag: number or None} at `step`; None and non-finite are skipped."""
        self.scalars_at([(values, step)])

    @_as_os_error
    def scalars_at(self, records):
        """Write [({tag: number or None}, step), ...] (see `scalars`) in one call."""
        summaries = []
        for values, _ in records:
            summary = summary_pb2.Summary()
            for tag, value in values.items():
                if value is not None and math.isfinite(value):
                    summary.value.add(tag=tag, simple_value=float(value))
            summaries.append(summary.SerializeToString())
        self._write(summaries, [step for _, step in records])

    def _write(self, summaries, steps):
        self._get()
        self._write_summaries(tf.constant(summaries, tf.string),
                              tf.constant([int(step) for step in steps], tf.int64))

    @_as_os_error
    def histograms(self, records):
        """Write [({tag: (counts over equal bins, lo, hi)}, step), ...] in one call (see
        merged_buckets)."""
        summaries = []
        for histograms, _ in records:
            summary = summary_pb2.Summary()
            for tag, (counts, lo, hi) in histograms.items():
                summary.value.add(
                    tag=tag, metadata=histogram_metadata.create_summary_metadata(tag, None),
                    tensor=tensor_util.make_tensor_proto(merged_buckets(counts, lo, hi)))
            summaries.append(summary.SerializeToString())
        self._write(summaries, [step for _, step in records])

    @_as_os_error
    def image(self, tag, rgb, step):
        """Write one RGB uint8 image [rows, cols, 3]."""
        with self._get().as_default():
            tf.summary.image(tag, np.asarray(rgb)[None], step=int(step))

    @_as_os_error
    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    @_as_os_error
    def close(self):
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = self._write_summaries = None


def truncate_events(directory, last_step):
    """Drop the events after `last_step` from the event files in `directory` (resume:
    those steps are trained again and written anew, so each step appears once). Each
    file is rewritten through a temporary file; a torn last record is dropped."""
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        kept, dropped = [], False
        try:
            for record in tf.data.TFRecordDataset(path):
                raw = record.numpy()
                if event_pb2.Event.FromString(raw).step <= last_step:
                    kept.append(raw)
                else:
                    dropped = True
        except tf.errors.DataLossError:  # a torn last record: the process was killed
            dropped = True
        if dropped:
            with tf.io.TFRecordWriter(f"{path}.tmp") as writer:
                for raw in kept:
                    writer.write(raw)
            os.replace(f"{path}.tmp", path)

"""TensorBoard event files of a run, written with tf.summary.

Scalars of one step go out as one Summary protocol buffer (however many tags), those
of many steps in one call; histograms from the counts computed in the train step, and
sign maps as images. The writer is opened on first use, by whichever thread writes
first (the callback's writer thread or the training thread), and flushed/closed by
its owner. Tags follow DESIGN.md section 4.
"""

import math
import threading

import numpy as np
import tensorflow as tf
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.histogram import metadata as histogram_metadata


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

    def scalars(self, values, step):
        """Write {tag: number or None} at `step`; None and non-finite are skipped."""
        self.scalars_at([(values, step)])

    def scalars_at(self, records):
        """Write [({tag: number or None}, step), ...] (see `scalars`) in one call."""
        summaries = []
        for values, _ in records:
            summary = summary_pb2.Summary()
            for tag, value in values.items():
                if value is not None and math.isfinite(value):
                    summary.value.add(tag=tag, simple_value=float(value))
            summaries.append(summary.SerializeToString())
        self._get()
        self._write_summaries(tf.constant(summaries, tf.string),
                              tf.constant([int(step) for _, step in records], tf.int64))

    def histogram(self, tag, counts, lo, hi, step):
        """Write a histogram of `counts` over equal bins spanning [lo, hi]."""
        counts = np.asarray(counts, np.float64)
        edges = np.linspace(lo, hi, counts.size + 1)
        buckets = np.stack([edges[:-1], edges[1:], counts], axis=1)
        with self._get().as_default():
            tf.summary.write(
                tag, tf.constant(buckets), step=int(step),
                metadata=histogram_metadata.create_summary_metadata(tag, None))

    def image(self, tag, rgb, step):
        """Write one RGB uint8 image [rows, cols, 3]."""
        with self._get().as_default():
            tf.summary.image(tag, np.asarray(rgb)[None], step=int(step))

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = self._write_summaries = None

"""The per-variable store: compact, append-only Arrow IPC streams of a run's
per-variable data, readable with pyarrow (or pandas through it) without optinsight.

Layout (docs/logs.md): a folder of part files `<name>/part-<first step, 9 digits>.arrows`,
each an Arrow IPC *stream* with zstd-compressed buffers, one record batch per flush.
A part starts at each epoch (or after `PART_STEPS` steps), so resume rewrites at most
one part. Rows are (step, variable) pairs, or any rows with a `step` column; a killed
process leaves every flushed batch readable and at most a torn last batch, which
`read_parts` skips.

    import pyarrow as pa, glob
    table = pa.concat_tables(pa.ipc.open_stream(p).read_all()
                             for p in sorted(glob.glob("runs/exp1/layers/*.arrows")))
"""

import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Steps a part file holds at most before the next one starts.
PART_STEPS = 10_000
_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


def part_paths(directory):
    """The part files of a store folder, in step order."""
    return sorted(glob.glob(os.path.join(directory, "part-*.arrows")))


def _first_step(path):
    return int(os.path.basename(path)[len("part-"):-len(".arrows")])


class PartWriter:
    """Appends record batches to a store folder, one part file per epoch.

    `write(table, epoch)` buffers rows; they reach the file as one record batch once
    `flush_rows` rows are buffered, at `flush()` and at `close()`. A new epoch (or
    `PART_STEPS` steps in the part) ends the current part file.
    """

    def __init__(self, directory, flush_rows):
        self.directory = directory
        self.flush_rows = flush_rows
        self._pending, self._rows = [], 0
        self._file = self._stream = None
        self._epoch = self._first = None

    def write(self, table, epoch):
        """Buffer `table` (a pyarrow Table with an int64 `step` column, rows in step
        order) as rows of `epoch`."""
        first = int(table["step"][0].as_py())
        if self._pending and (epoch != self._epoch or first - self._first >= PART_STEPS):
            self.flush()
        if self._stream is not None and (epoch != self._epoch
                                         or first - self._first >= PART_STEPS):
            self._close_part()
        if self._stream is None and not self._pending:
            self._epoch, self._first = epoch, first
        self._pending.append(table)
        self._rows += table.num_rows
        if self._rows >= self.flush_rows:
            self.flush()

    def flush(self):
        """Write the buffered rows as one record batch and flush the file."""
        if not self._pending:
            return
        table = pa.concat_tables(self._pending).combine_chunks()
        self._pending, self._rows = [], 0
        if self._stream is None:
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, f"part-{self._first:09d}.arrows")
            self._file = open(path, "wb")
            self._stream = pa.ipc.new_stream(self._file, table.schema, options=_OPTIONS)
        for batch in table.to_batches(max_chunksize=table.num_rows):
            self._stream.write_batch(batch)
        self._file.flush()

    def _close_part(self):
        stream, file = self._stream, self._file
        self._stream = self._file = None
        try:
            stream.close()
        finally:
            file.close()

    def close(self):
        """Flush and end the current part file."""
        try:
            self.flush()
        finally:
            self._pending, self._rows = [], 0
            if self._stream is not None:
                self._close_part()


def iter_batches(directory, columns=None):
    """The record batches of a store folder, in step order, with only `columns`
    decompressed (None: all). A torn last batch of a part (the process was killed
    mid-write) ends that part."""
    for path in part_paths(directory):
        with open(path, "rb") as f:
            try:
                reader = pa.ipc.open_stream(f)
                if columns is not None:
                    names = reader.schema.names
                    f.seek(0)
                    reader = pa.ipc.open_stream(f, options=pa.ipc.IpcReadOptions(
                        included_fields=[names.index(c) for c in columns if c in names]))
            except (pa.ArrowInvalid, OSError):  # killed before its first batch
                continue
            while True:
                try:
                    batch = reader.read_next_batch()
                except (StopIteration, pa.ArrowInvalid, OSError):
                    break
                yield batch


def read_parts(directory, columns=None, filter_column=None, filter_values=None):
    """The rows of a store folder as one pyarrow Table (None if it has no rows).

    Args:
        columns: names of the columns to decompress (None: all).
        filter_column, filter_values: keep only rows whose `filter_column` is one of
            `filter_values` (applied batch by batch: memory is that of the result).
    """
    tables = []
    for batch in iter_batches(directory, columns):
        if filter_column is not None:
            batch = batch.filter(pc.is_in(batch[filter_column],
                                          value_set=pa.array(list(filter_values))))
        if batch.num_rows:
            tables.append(pa.Table.from_batches([batch]))
    return pa.concat_tables(tables) if tables else None


def truncate_parts(directory, last_step):
    """Keep only rows with step <= last_step: later parts are deleted, the part that
    straddles `last_step` rewritten (one part at most: the size of an epoch)."""
    for path in part_paths(directory):
        if _first_step(path) > last_step:
            os.remove(path)
    paths = part_paths(directory)
    if not paths:
        return
    path = paths[-1]
    with open(path, "rb") as f:
        try:
            reader = pa.ipc.open_stream(f)
            schema = reader.schema
        except (pa.ArrowInvalid, OSError):
            schema = None
        batches = []
        while schema is not None:
            try:
                batch = reader.read_next_batch()
            except (StopIteration, pa.ArrowInvalid, OSError):
                break
            batches.append(batch.filter(pc.less_equal(batch["step"], last_step)))
    if schema is None:
        os.remove(path)
        return
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f, pa.ipc.new_stream(f, schema, options=_OPTIONS) as stream:
        for batch in batches:
            if batch.num_rows:
                stream.write_batch(batch)
    os.replace(tmp, path)


def dictionary(values, names):
    """A dictionary-encoded string column: `values` (ints) indexing `names`."""
    return pa.DictionaryArray.from_arrays(pa.array(np.asarray(values, np.int16)),
                                          pa.array(list(names), pa.string()))

"""The per-variable store: compact, append-only Arrow files of a run's per-variable
rows, readable with pyarrow (or pandas through it) without optinsight.

Layout (docs/logs.md): a folder of part files named by their first step. The part
being written is `part-<step, 9 digits>.arrows`, an Arrow IPC *stream* (zstd) that
gets one record batch per flush, rows in step order: a killed process leaves every
flushed batch readable and at most a torn last batch, which the readers here skip.
When a part ends (each epoch, or after `PART_STEPS` steps) it is rewritten as
`part-<step>.arrow`, an Arrow IPC *file* with its rows sorted by variable, then step,
record batch i holding variables [i·k, (i+1)·k) (k in the schema metadata), so that
one variable's rows are one batch of each part. Rows have a `step` and a dictionary
`variable` column; resume rewrites at most one part.

    import glob, pyarrow as pa
    tables = [pa.ipc.open_file(p).read_all() if p.endswith(".arrow")
              else pa.ipc.open_stream(p).read_all()
              for p in sorted(glob.glob("runs/exp1/layers/part-*"))]
"""

import glob
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Steps a part file holds at most before the next one starts.
PART_STEPS = 10_000
#: Rows a record batch of a finished part holds at least (unless the part is smaller).
BATCH_ROWS = 8192
LIVE, FINISHED = ".arrows", ".arrow"
_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")
_PER_BATCH = b"optinsight.variables_per_batch"


def part_paths(directory):
    """The part files of a store folder, in step order. A live part whose finished
    twin exists (a process killed between writing the one and removing the other)
    is left out: the finished part holds the same rows."""
    finished = glob.glob(os.path.join(directory, f"part-*{FINISHED}"))
    done = set(finished)
    live = [p for p in glob.glob(os.path.join(directory, f"part-*{LIVE}"))
            if p[:-len(LIVE)] + FINISHED not in done]
    return sorted(finished + live, key=_first_step)


def _first_step(path):
    return int(os.path.basename(path).split(".")[0][len("part-"):])


class PartWriter:
    """Appends rows to a store folder, one part file per epoch.

    `write(table, epoch)` buffers rows; they reach the live part as one record batch
    once `flush_rows` rows are buffered, at `flush()` and at `close()`. A new epoch (or
    `PART_STEPS` steps in the part) ends the current part, which is then finished.
    """

    def __init__(self, directory, flush_rows):
        self.directory = directory
        self.flush_rows = flush_rows
        self._pending, self._rows = [], 0
        self._file = self._stream = None
        self._epoch = self._first = None

    def write(self, table, epoch):
        """Buffer `table` (a pyarrow Table with `step` and `variable` columns, rows in
        step order) as rows of `epoch`."""
        first = int(table["step"][0].as_py())
        if self._first is not None and (epoch != self._epoch
                                        or first - self._first >= PART_STEPS):
            self.close()
        if self._first is None:
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
            self._file = open(self._live_path(), "wb")
            self._stream = pa.ipc.new_stream(self._file, table.schema, options=_OPTIONS)
        for batch in table.to_batches(max_chunksize=table.num_rows):
            self._stream.write_batch(batch)
        self._file.flush()

    def _live_path(self):
        return os.path.join(self.directory, f"part-{self._first:09d}{LIVE}")

    def close(self):
        """Flush, end the current part and finish it (`finish_part`)."""
        try:
            self.flush()
        finally:
            self._pending, self._rows = [], 0
            stream, file = self._stream, self._file
            self._stream = self._file = None
            self._first = None
            if stream is not None:
                try:
                    stream.close()
                finally:
                    file.close()
                finish_part(file.name)


def _read_live(path, columns=None):
    """The complete record batches of a live part (a torn last one is left out)."""
    batches = []
    with open(path, "rb") as f:
        try:
            reader = pa.ipc.open_stream(f)
            if columns is not None:
                names = reader.schema.names
                f.seek(0)
                reader = pa.ipc.open_stream(f, options=pa.ipc.IpcReadOptions(
                    included_fields=[names.index(c) for c in columns if c in names]))
        except (pa.ArrowInvalid, OSError):  # killed before its first batch
            return [], None
        while True:
            try:
                batches.append(reader.read_next_batch())
            except (StopIteration, pa.ArrowInvalid, OSError):
                return batches, reader.schema


def _write_finished(table, path):
    """Write `table` as a finished part at `path`: variable-major (see module doc), or,
    for rows without a `variable` column, in step order."""
    table = table.combine_chunks()
    if "variable" not in table.schema.names:
        table = table.take(pa.array(np.argsort(table["step"].to_numpy(), kind="stable")))
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f, pa.ipc.new_file(f, table.schema, options=_OPTIONS) as w:
            w.write_table(table, max_chunksize=BATCH_ROWS)
        os.replace(tmp, path)
        return
    variables = table["variable"].chunk(0) if table.num_rows else None
    n_vars = len(variables.dictionary) if variables is not None else 1
    codes = variables.indices.to_numpy() if variables is not None else np.zeros(0, int)
    order = np.lexsort((table["step"].to_numpy(), codes))  # by variable, then step
    table, codes = table.take(pa.array(order)), codes[order]
    per_variable = max(1, table.num_rows // max(1, n_vars))
    k = max(1, -(-BATCH_ROWS // per_variable))
    bounds = np.searchsorted(codes, np.arange(0, n_vars + k, k))
    schema = table.schema.with_metadata({_PER_BATCH: str(k).encode()})
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f, pa.ipc.new_file(f, schema, options=_OPTIONS) as writer:
        for a, b in zip(bounds[:-1], bounds[1:]):
            batches = table.slice(a, b - a).combine_chunks().to_batches()
            writer.write_batch(batches[0] if batches else pa.RecordBatch.from_arrays(
                [pa.array([], field.type) for field in schema], schema=schema))
    os.replace(tmp, path)


def finish_part(live_path):
    """Rewrite a live part as a finished one (same rows) and remove the live file."""
    batches, schema = _read_live(live_path)
    if batches:
        _write_finished(pa.Table.from_batches(batches, schema),
                        live_path[:-len(LIVE)] + FINISHED)
    os.remove(live_path)


def part_batches(path, columns=None, variable=None):
    """The record batches of one part file, with only `columns` decompressed (None:
    all). With `variable`, only the batch that can hold its rows, for a finished part.
    A torn last batch of a live part (the process was killed mid-write) is left out."""
    if path.endswith(LIVE):
        return _read_live(path, columns)[0]
    with pa.OSFile(path) as source:  # batches read into memory they own
        reader = pa.ipc.open_file(source)
        names = reader.schema.names
        if columns is not None:
            reader = pa.ipc.open_file(source, options=pa.ipc.IpcReadOptions(
                included_fields=[names.index(c) for c in columns if c in names]))
        indices = range(reader.num_record_batches)
        if variable is not None and _PER_BATCH in (reader.schema.metadata or {}):
            k = int(reader.schema.metadata[_PER_BATCH])
            dictionary = _dictionary(source)
            indices = [dictionary.index(variable) // k] if variable in dictionary else []
        return [reader.get_batch(i) for i in indices]


def iter_batches(directory, columns=None, variable=None):
    """The record batches of a store folder, part by part in step order (see
    `part_batches`)."""
    for path in part_paths(directory):
        yield from part_batches(path, columns, variable)


def _dictionary(source):
    """The `variable` dictionary of a finished part (only that column read)."""
    reader = pa.ipc.open_file(source)
    column = reader.schema.names.index("variable")
    reader = pa.ipc.open_file(source, options=pa.ipc.IpcReadOptions(included_fields=[column]))
    return reader.get_batch(0).column(0).dictionary.to_pylist()


def read_parts(directory, columns=None, variables=None):
    """The rows of a store folder as one pyarrow Table (None if it has no rows).

    Args:
        columns: names of the columns to decompress (None: all).
        variables: keep only rows of these variables (read batch by batch, and only
            the batches that can hold them: memory and time follow the result).
    """
    tables = []
    for batch in (iter_batches(directory, columns) if variables is None or len(variables) != 1
                  else iter_batches(directory, columns, variable=variables[0])):
        if variables is not None:
            batch = batch.filter(pc.is_in(batch["variable"],
                                          value_set=pa.array(list(variables))))
        if batch.num_rows:
            tables.append(pa.Table.from_batches([batch]))
    return pa.concat_tables(tables) if tables else None


def truncate_parts(directory, last_step):
    """Keep only rows with step <= last_step: later parts are deleted, the part that
    straddles `last_step` rewritten (one part at most: the size of an epoch)."""
    for path in glob.glob(os.path.join(directory, f"part-*{LIVE}")):
        if os.path.exists(path[:-len(LIVE)] + FINISHED):  # see part_paths
            os.remove(path)
    for path in part_paths(directory):
        if _first_step(path) > last_step:
            os.remove(path)
    paths = part_paths(directory)
    if not paths:
        return
    path = paths[-1]
    if path.endswith(LIVE):
        finish_part(path)
        path = path[:-len(LIVE)] + FINISHED
        if not os.path.exists(path):
            return
    with pa.OSFile(path) as source:
        table = pa.ipc.open_file(source).read_all()
    _write_finished(table.filter(pc.less_equal(table["step"], last_step)), path)


def dictionary(values, names):
    """A dictionary-encoded string column: `values` (ints) indexing `names`."""
    return pa.DictionaryArray.from_arrays(pa.array(np.asarray(values, np.int16)),
                                          pa.array(list(names), pa.string()))

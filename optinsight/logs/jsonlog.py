"""JSON and JSON Lines files of a run: crash-safe appends and atomic rewrites.

JSON Lines files (`steps.jsonl`, `probes.jsonl`) get one object
per line, flushed as written, so a killed process leaves every finished line intact;
a torn last line is ignored by `read_jsonl`. `insight.json` is rewritten through a
temporary file and a rename, so it is always a complete document; the parts of it
that no longer change are encoded once (`JsonFragment`), so that rewriting it costs
little more than writing the file. Non-finite floats are written as null (JSON has no
NaN) and counted.
"""

import json
import math
import os

import numpy as np


def _dumps(value):
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


class JsonFragment:
    """A value encoded as JSON text once, to be written into documents as is.

    Attributes:
        text: the JSON text (NaN/Inf written as null).
        nulls: how many NaN/Inf it held.
    """

    def __init__(self, value):
        counter = [0]
        self.text = _dumps(plain(value, counter))
        self.nulls = counter[0]


class JsonList:
    """A JSON list that grows by whole values, each encoded once when appended:
    `fragment()` is the list so far as a `JsonFragment`, at the cost of copying its
    text, whatever the number or size of its items."""

    def __init__(self):
        self._items, self._nulls = [], 0

    def append(self, value):
        item = JsonFragment(value)
        self._items.append(item.text)
        self._nulls += item.nulls

    def fragment(self):
        fragment = JsonFragment(None)
        fragment.text, fragment.nulls = "[" + ",".join(self._items) + "]", self._nulls
        return fragment


def plain(value, counter=None):
    """`value` as plain JSON types; NaN/Inf become None, counted in `counter[0]`
    (`JsonFragment`s are kept, their nulls counted)."""
    if isinstance(value, JsonFragment):
        if counter is not None:
            counter[0] += value.nulls
        return value
    if isinstance(value, dict):
        return {str(k): plain(v, counter) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, counter) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist(), counter)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if math.isfinite(value):
            return float(value)
        if counter is not None:
            counter[0] += 1
        return None
    return value


def _encode(value):
    """JSON text of plain JSON types and `JsonFragment`s."""
    if isinstance(value, JsonFragment):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{_dumps(k)}:{_encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list) and any(isinstance(v, (JsonFragment, dict, list))
                                       for v in value):
        return "[" + ",".join(_encode(v) for v in value) + "]"
    return _dumps(value)


def write_json_atomic(path, document):
    """Write `document` (plain JSON types and `JsonFragment`s) to `path` via a temp
    file and rename."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(_encode(document))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:  # e.g. a full disk: the previous version stays, whole
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_json(path):
    """Load a JSON document; ValueError naming the file if it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupted") from None


def iter_jsonl(path):
    """The objects of a JSON Lines file, one at a time; a torn (incomplete) last line
    is skipped. A malformed line anywhere else raises ValueError naming the file and
    line."""
    if not os.path.exists(path):
        return
    torn = None  # a malformed line: fine if nothing follows it
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if torn is not None:
                raise ValueError(f"{path}, line {torn}, is not valid JSON")
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                torn = number


def jsonl_after(path, step, block=1 << 16):
    """The records of a JSON Lines file whose "step" is greater than `step`, in file
    order, read backwards from the end until a record at or before `step`: time and
    memory follow the tail, not the file. A torn last line is skipped."""
    if not os.path.exists(path):
        return []
    tail = []
    with open(path, "rb") as f:
        position = f.seek(0, os.SEEK_END)
        rest, last = b"", True
        while True:
            start = max(0, position - block)
            f.seek(start)
            lines = (f.read(position - start) + rest).split(b"\n")
            position = start
            rest = lines.pop(0) if position > 0 else b""
            for line in reversed(lines):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if last:  # torn by a crash mid-write
                        last = False
                        continue
                    raise ValueError(f"{path}: a line is not valid JSON") from None
                last = False
                if record.get("step", 0) <= step:
                    return tail[::-1]
                tail.append(record)
            if position == 0:
                return tail[::-1]


def read_jsonl(path):
    """The objects of a JSON Lines file as a list (see `iter_jsonl`)."""
    return list(iter_jsonl(path))


def truncate_jsonl(path, last_step):
    """Keep only the complete records of `path` whose "step" is <= last_step."""
    if not os.path.exists(path):
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in kept:
            f.write(_dumps(record) + "\n")
    os.replace(tmp, path)


class JsonlWriter:
    """Appends one JSON object per line to a file opened on first write."""

    def __init__(self, path):
        self.path = path
        self._file = None
        self.null_count = 0

    def write(self, record):
        self.write_many([record])

    def write_many(self, records):
        """Append `records`, one line each, and flush."""
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        lines = []
        for record in records:
            try:  # the common case: already plain and finite
                lines.append(_dumps(record))
            except (TypeError, ValueError):
                counter = [0]
                lines.append(_dumps(plain(record, counter)))
                self.null_count += counter[0]
        self._file.write("".join(line + "\n" for line in lines))
        self._file.flush()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

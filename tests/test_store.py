"""The per-variable store (logs/store.py): live parts, finished variable-major parts,
torn tails, truncation for resume, and the lazy frames read from it, against a
brute-force pandas pivot of the rows written."""

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from optinsight.logs import store
from optinsight.logs.reader import StoreFrames

NAMES = [f"v{i}/kernel" for i in range(7)]


def rows(steps, epoch):
    """One row per (step, variable), step-major, with a count and a float column."""
    steps = np.asarray(steps)
    n = len(NAMES)
    value = np.repeat(steps, n) * 10.0 + np.tile(np.arange(n), len(steps))
    count = (np.repeat(steps, n) * np.tile(np.arange(1, n + 1), len(steps))) % 5
    return pa.table({
        "step": pa.array(np.repeat(steps, n), pa.int64()),
        "epoch": pa.array(np.full(n * len(steps), epoch), pa.int32()),
        "variable": store.dictionary(np.tile(np.arange(n), len(steps)), NAMES),
        "x": pa.array(value.astype(np.float32), mask=np.repeat(steps, n) == 1),
        "c": pa.array(count.astype(np.int64))})


def expected(steps):
    frame = pd.concat([rows([s], 0).to_pandas() for s in steps])
    frame["variable"] = frame["variable"].astype(str)
    return frame


def write_epochs(directory, epochs, steps_per_epoch, monkeypatch=None):
    writer = store.PartWriter(str(directory), flush_rows=3 * len(NAMES))
    for e in range(epochs):
        for s in range(e * steps_per_epoch + 1, (e + 1) * steps_per_epoch + 1):
            writer.write(rows([s], e), e)
        writer.close()
    return writer


def test_finished_parts_hold_every_row_variable_major(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "BATCH_ROWS", 10)  # several batches per finished part
    write_epochs(tmp_path, 3, 8)
    assert sorted(os.listdir(tmp_path)) == ["part-000000001.arrow", "part-000000009.arrow",
                                            "part-000000017.arrow"]
    table = store.read_parts(str(tmp_path)).to_pandas()
    table["variable"] = table["variable"].astype(str)
    got = table.sort_values(["step", "variable"]).reset_index(drop=True)
    want = expected(range(1, 25)).sort_values(["step", "variable"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got.drop(columns="epoch"), want.drop(columns="epoch"),
                                  check_dtype=False, check_categorical=False)
    # One batch of each finished part holds all of a variable's rows (and pyarrow alone
    # reads the file).
    for name in NAMES:
        for path in store.part_paths(str(tmp_path)):
            batches = store.part_batches(path, variable=name)
            assert len(batches) == 1
            part = pa.ipc.open_file(path).read_all().to_pandas()
            assert (batches[0].to_pandas()["variable"] == name).sum() == \
                (part["variable"] == name).sum() == 8


def test_store_frames_match_a_pivot(tmp_path):
    write_epochs(tmp_path, 2, 5)
    writer = store.PartWriter(str(tmp_path), flush_rows=3 * len(NAMES))  # a live part
    for s in range(11, 15):
        writer.write(rows([s], 2), 2)
    writer.flush()
    frames = StoreFrames(str(tmp_path), NAMES)
    want = expected(range(1, 15))
    pivot = want.pivot(index="step", columns="variable", values="x")[NAMES]
    got = frames.key("x")
    assert got["step"].tolist() == list(range(1, 15))  # with the live part's batches
    np.testing.assert_array_equal(got[NAMES].to_numpy(), pivot.to_numpy())
    layer = frames.layer(NAMES[3])
    assert layer["step"].tolist() == list(range(1, 15))
    np.testing.assert_array_equal(layer["c"], want[want.variable == NAMES[3]]["c"])
    assert np.isnan(layer["x"].iloc[0])  # null at step 1
    with pytest.raises(KeyError, match="no key"):
        frames.key("nope")


def test_a_torn_live_part_is_read_up_to_its_last_whole_batch(tmp_path):
    writer = store.PartWriter(str(tmp_path), flush_rows=2 * len(NAMES))
    for s in range(1, 7):
        writer.write(rows([s], 0), 0)  # three batches of two steps
    path = store.part_paths(str(tmp_path))[0]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    table = store.read_parts(str(tmp_path))
    assert sorted(set(table["step"].to_pylist())) == [1, 2, 3, 4]


@pytest.mark.parametrize("finished", [True, False])
def test_truncate_keeps_steps_up_to_the_checkpoint(tmp_path, finished):
    write_epochs(tmp_path, 2, 6)
    writer = store.PartWriter(str(tmp_path), flush_rows=len(NAMES))
    for s in range(13, 16):
        writer.write(rows([s], 2), 2)
    if finished:
        writer.close()
    store.truncate_parts(str(tmp_path), 8)
    assert sorted(os.listdir(tmp_path)) == ["part-000000001.arrow", "part-000000007.arrow"]
    steps = store.read_parts(str(tmp_path))["step"].to_pylist()
    assert sorted(set(steps)) == list(range(1, 9)) and len(steps) == 8 * len(NAMES)

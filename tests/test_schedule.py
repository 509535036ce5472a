"""One schedule type for every *_freq option and each probe's `every` (issue 29)."""

import pytest

from optinsight.options import InsightOptions
from optinsight.schedule import Every


def brute_force_due(steps, previous, now):
    return steps > 0 and any(s % steps == 0 for s in range(previous + 1, now + 1))


@pytest.mark.parametrize("steps", [0, 1, 3, 7])
def test_due_is_a_multiple_among_the_steps_just_trained(steps):
    every = Every(steps)
    for previous in range(30):
        for now in range(previous, previous + 9):  # several steps per call too
            assert every.due(previous, now) == brute_force_due(steps, previous, now)
    assert not every.at_epoch_end


def test_epoch_schedules_are_due_at_epoch_ends_only():
    every = Every("epoch")
    assert every.at_epoch_end and every.steps == 0
    assert not any(every.due(p, p + 1) for p in range(20))


@pytest.mark.parametrize("value, words, positive, error", [
    (-1, ("epoch",), False, "must be a non-negative integer or 'epoch', got -1"),
    (2.5, (), False, "must be a non-negative integer, got 2.5"),
    (True, (), False, "got True"),
    ("weekly", ("epoch",), False, "got 'weekly'"),
    (0, ("batch", "epoch"), True, "must be a positive integer or 'batch' or 'epoch'"),
])
def test_bad_schedules_are_named_in_one_line(value, words, positive, error):
    with pytest.raises(ValueError, match=error):
        Every.parse("histogram_freq", value, words, positive)


def test_every_schedule_option_is_one_type_and_the_meta_keeps_its_value():
    options = InsightOptions(histogram_freq=4, sign_map_freq="epoch", update_freq="batch",
                             variable_update_freq=0, checkpoint_freq=2)
    for name in ("histogram_freq", "sign_map_freq", "update_freq", "variable_update_freq",
                 "checkpoint_freq"):
        assert isinstance(getattr(options, name), Every), name
    assert options.schedules() == {"histogram_freq": 4, "sign_map_freq": "epoch",
                                   "update_freq": 1, "variable_update_freq": 0,
                                   "instrument_freq": 1, "instruments": []}
    assert [options.checkpoint_freq.due(e, e + 1) for e in range(4)] == \
        [False, True, False, True]
    with pytest.raises(ValueError, match="probe 'p' every must be"):
        InsightOptions(probes=[type("P", (), {"name": "p", "every": -2,
                                              "__call__": lambda *a: {}})()],
                       probe_data=([[0.0]], [[0.0]]))

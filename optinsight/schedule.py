"""When recurring work is due: one schedule type for every `*_freq` option and each
probe's `every`, validated in one place (no import of the package).

`Every(n)` is due at each multiple of n steps (or epochs, for checkpoint_freq), never
for 0; `Every("epoch")` at each epoch end.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Every:
    """A schedule. value: a non-negative int (units between runs; 0: never) or "epoch"
    (at each epoch end). Its `value` is what the logs' meta records."""

    value: int | str

    @classmethod
    def parse(cls, name, value, words=("epoch",), positive=False):
        """The schedule option `name` = value, or ValueError naming it: a non-negative
        int (positive ones only with `positive`) or one of `words`; "batch" (when in
        words) is every step."""
        if isinstance(value, cls):
            value = value.value
        if isinstance(value, str) and value in words:
            return cls(1 if value == "batch" else value)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                or value < int(positive):
            allowed = "a positive integer" if positive else "a non-negative integer"
            raise ValueError(f"{name} must be {allowed}{''.join(f' or {w!r}' for w in words)}"
                             f", got {value!r}")
        return cls(int(value))

    @property
    def steps(self):
        """Units between runs; 0 for "epoch" and for never."""
        return self.value if isinstance(self.value, int) else 0

    @property
    def at_epoch_end(self):
        return self.value == "epoch"

    def due(self, previous, now):
        """Whether a multiple of `steps` lies in (previous, now]: after training from
        step (or epoch) `previous` to `now`, several at once with steps_per_execution."""
        return bool(self.steps) and now // self.steps > previous // self.steps

"""Where each part of a run lives in its log dir (docs/logs.md): every path, computed
once, here and nowhere else."""

import os


class Layout:
    """The paths of the run in `root`.

    Attributes (all under root):
        steps_jsonl, probes_jsonl, instruments_jsonl, insight_json: the JSON and
        JSON Lines files;
        model, layers, histograms: the Arrow part stores (whole model, per variable,
        histograms); signs: sign maps (<label>.npz); probes: probe arrays
        (<probe>_<step>.npz); units_npz: per-unit zero-gradient runs; tensorboard and
        tensorboard_train: the event files; checkpoint: what resume continues from.
    """

    def __init__(self, root):
        self.root = os.fspath(root)
        join = lambda *parts: os.path.join(self.root, *parts)  # noqa: E731
        self.steps_jsonl = join("steps.jsonl")
        self.probes_jsonl = join("probes.jsonl")
        self.instruments_jsonl = join("instruments.jsonl")
        self.insight_json = join("insight.json")
        self.model = join("model")
        self.layers = join("layers")
        self.histograms = join("histograms")
        self.signs = join("signs")
        self.probes = join("probes")
        self.units_npz = join("units.npz")
        self.tensorboard = join("tensorboard")
        self.tensorboard_train = join("tensorboard", "train")
        self.checkpoint = join("checkpoint")

    def sign_map(self, label):
        """The sign map file of `label` (e.g. epoch_0003)."""
        return os.path.join(self.signs, f"{label}.npz")

    def probe_arrays(self, probe, step):
        """(the arrays file of probe `probe` at `step`, its path relative to root, as
        probes.jsonl records it)."""
        name = f"{probe}_{step:08d}.npz"
        return os.path.join(self.probes, name), f"probes/{name}"

    def holds_run(self):
        """Whether a run was recorded here (steps.jsonl exists)."""
        return os.path.exists(self.steps_jsonl)

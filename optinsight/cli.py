"""The `optinsight` command: `optinsight summary LOGDIR` prints a run's epochs.

A user error (missing or corrupted log dir) prints one line and exits 2.
"""

import argparse
import sys


def _summary(log_dir):
    import pandas as pd

    from optinsight.logs.reader import read_log

    run = read_log(log_dir)
    table = run.epochs.copy()
    if not run.steps.empty:
        per_epoch = run.steps.groupby("epoch")
        table = table.merge(per_epoch.agg(
            steps=("step", "count"), grad_norm=("grad_norm", "mean"),
            update_ratio=("update_ratio", "mean"),
            zero_grads_e5=("no_zero_e5_grad2", "mean"),
            nonfinite=("nonfinite_grads", "sum")).reset_index(), on="epoch", how="outer")
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(f"{log_dir}: {len(run.steps)} steps, {len(run.epochs)} epochs")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="optinsight", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary", help="per-epoch table of a run")
    summary.add_argument("log_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "summary":
            _summary(args.log_dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `optinsight` command.

    optinsight summary LOGDIR          per-epoch table in the terminal
    optinsight diagnose LOGDIR         findings, one per line (--format json: a list);
                                       exit 1 if any is an error
    optinsight report LOGDIR [-o OUT]  PNGs and one self-contained index.html

A user error (missing or corrupted log dir) prints one line and exits 2.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported


def _summary(args):
    import pandas as pd

    from optinsight.logs.reader import read_log
    from optinsight.metrics import run_families

    run = read_log(args.log_dir)
    table = run.epochs.copy()
    if not run.steps.empty:
        tag = run_families(run.summary.get("meta", {}))[0][-1]  # the widest zero band
        per_epoch = run.steps.groupby("epoch")
        columns = {"steps": ("step", "count"), "grad_norm": ("grad_norm", "mean"),
                   "update_ratio": ("update_ratio", "mean"),
                   f"zero_grads_{tag}": (f"no_zero_{tag}_grad2", "mean"),
                   "nonfinite": ("nonfinite_grads", "sum")}
        table = table.merge(per_epoch.agg(**{
            name: spec for name, spec in columns.items() if spec[0] in run.steps})
            .reset_index(), on="epoch", how="outer")
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(f"{args.log_dir}: {len(run.steps)} steps, {len(run.epochs)} epochs")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


def _diagnose(args):
    from optinsight.diagnose import diagnose

    findings = diagnose(args.log_dir)
    if args.format == "json":
        print(json.dumps([f.as_dict() for f in findings], indent=1, default=float))
    else:
        for finding in findings:
            print(finding)
        if not findings:
            print("no problems found")
    return 1 if any(f.severity == "error" for f in findings) else 0


def _report(args):
    from optinsight.diagnose import diagnose_run
    from optinsight.logs.reader import read_log
    from optinsight.report.html import write_report

    run = read_log(args.log_dir)
    out = args.output or os.path.join(args.log_dir, "report")
    path = write_report(run, diagnose_run(run), out)
    print(f"report: {path}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="optinsight", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("summary", "per-epoch table of a run"),
                            ("diagnose", "what is wrong with a run, in plain words"),
                            ("report", "figures and one HTML page of a run")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("log_dir")
        if name == "diagnose":
            command.add_argument("--format", choices=("text", "json"), default="text",
                                 help="text: one finding a line (default); json: a list "
                                      "of objects (code, severity, layer, step, since, "
                                      "caused_by, evidence, advice, numbers)")
        if name == "report":
            command.add_argument("-o", "--output", help="directory (default LOGDIR/report)")
    args = parser.parse_args(argv)
    try:
        return {"summary": _summary, "diagnose": _diagnose, "report": _report}[
            args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

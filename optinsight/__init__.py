"""optinsight: see inside optimization while a Keras model trains.

The public API is re-exported here and imported on first use, so that the
`optinsight` command's log readers start without loading TensorFlow.
"""

import importlib
import sys

from optinsight.compat import check_backend, check_versions

# Imported now: the function `diagnose` shares its name with its module, and binding
# it here keeps the function, not the module, as `optinsight.diagnose`.
from optinsight.diagnose import Finding, diagnose, diagnose_run

# An unsupported TensorFlow or Keras: one line naming them and the supported range.
check_versions()

__version__ = "0.1.0"


def _notebook_views():
    """Inside IPython (Jupyter), show a `Run` as HTML: its epochs, sparklines and
    findings (optinsight.report.notebook)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None:
        from optinsight.report.notebook import register

        register(shell, diagnose_run)


_notebook_views()

_EXPORTS = {
    "InsightModel": "optinsight.model",
    "InsightRecorder": "optinsight.recorder",
    "OptimizationInsightCallback": "optinsight.callback",
    "Run": "optinsight.logs.reader",
    "read_log": "optinsight.logs.reader",
}
__all__ = ["Finding", "InsightModel", "InsightRecorder", "OptimizationInsightCallback", "Run",
           "diagnose", "instruments", "probes", "read_log"]


def __getattr__(name):
    if name in ("probes", "instruments"):
        check_backend()
        return importlib.import_module(f"optinsight.{name}")
    if name in _EXPORTS:
        if _EXPORTS[name] != "optinsight.logs.reader":
            check_backend()  # one line, before Keras is imported with another backend
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'optinsight' has no attribute {name!r}")


def __dir__():
    return __all__

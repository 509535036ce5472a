"""optinsight: see inside optimization while a Keras model trains."""

from optinsight import probes
from optinsight.callback import OptimizationInsightCallback
from optinsight.logs.reader import Run, read_log
from optinsight.model import InsightModel

__all__ = ["InsightModel", "OptimizationInsightCallback", "Run", "probes", "read_log"]
__version__ = "0.1.0"

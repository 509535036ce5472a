"""Probes of the loss landscape and the network (DESIGN.md section 5).

`hessian` and `ntk` are used as modules (`probes.hessian.top_eigenvalues`); every
other function and every probe class is available here directly.
"""

from optinsight.probes import hessian
from optinsight.probes.hessian import HessianProbe

__all__ = ["hessian", "HessianProbe"]

"""Probes of the loss landscape and the network (DESIGN.md section 5).

`hessian` and `ntk` are used as modules (`probes.hessian.top_eigenvalues`); every
other function and every probe class is available here directly.
"""

from optinsight.probes import hessian, ntk
from optinsight.probes.hessian import HessianProbe
from optinsight.probes.ntk import NTKProbe

__all__ = ["hessian", "ntk", "HessianProbe", "NTKProbe"]

"""`python -m optinsight.native`: compile the fused statistics kernel if it is not
built yet, and print where it is; exit status 1 when it cannot be built or loaded."""

import sys

from optinsight import native

if native.load() is None:
    sys.exit(1)
print(native.library_path())

"""The fused CPU kernels of the per-step statistics, built on first use.

`step_statistics.cc` defines the TensorFlow op `InsightStepStatistics`,
`histograms.cc` the op `InsightHistograms`, `patch_gradients.cc` the ops
`InsightPatchGradients` and `InsightPatchSquareSums` (the instruments' per-example
convolution gradients and their square sums). `load()` compiles them
with the system C++ compiler against the installed TensorFlow (about ten seconds, once
per TensorFlow version and machine type) into one library in the user's cache
directory and returns the loaded op module, or None when it cannot be built or is
switched off with OPTINSIGHT_NATIVE=0; the trackers then use their TensorFlow/XLA
versions.
"""

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import tensorflow as tf

SOURCES = tuple(os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
                for name in ("step_statistics.cc", "histograms.cc", "patch_gradients.cc"))
CXX_FLAGS = ["-shared", "-fPIC", "-O3", "-march=native", "-fopenmp-simd",
             "-ffp-contract=off"]


def _cpu_signature():
    """Model and flags of this CPU (the library is built with -march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def library_path():
    """Where the compiled library for this TensorFlow, these sources and CPU lives."""
    key = hashlib.sha256()
    sources = [open(source, "rb").read() for source in SOURCES]
    for part in (*sources, tf.__version__.encode(), tf.__file__.encode(),
                 " ".join(CXX_FLAGS).encode(), _cpu_signature().encode()):
        key.update(part)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "optinsight", f"step_statistics-{key.hexdigest()[:16]}.so")


def build(path):
    """Compile the kernels into `path` (atomically); raises RuntimeError on failure."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (install g++)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    command = [compiler, *SOURCES, "-o", tmp, *CXX_FLAGS, *tf.sysconfig.get_compile_flags(),
               *tf.sysconfig.get_link_flags()]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load():
    """The op module with `insight_step_statistics`, `insight_histograms`,
    `insight_patch_gradients` and `insight_patch_square_sums`, or None (see module
    docstring)."""
    if os.environ.get("OPTINSIGHT_NATIVE", "1") == "0":
        return None
    return _library()


def choose(kernel):
    """The op module for `kernel` ("auto", "native" or "xla"), or None for the
    TensorFlow/XLA versions: "auto" is native when it loads and TensorFlow sees no GPU."""
    if kernel not in ("auto", "native", "xla"):
        raise ValueError(f"kernel must be 'auto', 'native' or 'xla', got {kernel!r}")
    if kernel == "xla" or (kernel == "auto" and tf.config.list_logical_devices("GPU")):
        return None
    module = load()
    if module is None and kernel == "native":
        raise RuntimeError("the native statistics kernel is not available "
                           "(see the message above, or OPTINSIGHT_NATIVE=0 is set)")
    return module


@functools.cache
def _library():
    path = library_path()
    try:
        if not os.path.exists(path):
            print("optinsight: compiling the fused statistics kernel (once)...",
                  file=sys.stderr, flush=True)
            build(path)
        return tf.load_op_library(path)
    except (RuntimeError, OSError, tf.errors.NotFoundError) as error:
        print(f"optinsight: fused statistics kernel unavailable, using XLA: "
              f"{str(error).splitlines()[0]}", file=sys.stderr)
        return None

"""Strict test setup: 8 simulated CPU devices, strict dtype promotion, no rank broadcasting.

The suite's time is mostly compilation of small programs. XLA's CPU back end compiles with
LLVM's lightest optimisation and its older loop emitters in place of the MLIR fusion emitters
(``--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false``): 13% less CPU time
for the suite than level 0 with the fusion emitters, which took a quarter off the default (the
programs and their results are the same up to floating-point rounding). Not level 0 with the
older emitters, which would save more: it miscompiled SCE's selection mask (``a | (b & c)``
false where ``b`` and ``c`` were true). The examples run with these flags as well, on one
device: a third less time than with the defaults (their numbers may differ from the README's
in the last digits; the test checks what the README claims of them).

The session keeps one persistent compilation cache that the xdist workers share (a tenth off:
many tests compile the same kernels for the same small trees). JAX writes an entry without a
lock (a lock per access cost more than the cache saved), so a worker may find an entry half
written: JAX then warns and compiles the program itself, and that warning (or its twin for
writing) alone is not an error here. The cache is removed at the end.
"""

import os
import shutil
import tempfile

COMPILING_XLA_FLAGS = (  # tests/test_examples.py runs the examples with these
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ["XLA_FLAGS"] = COMPILING_XLA_FLAGS + " --xla_force_host_platform_device_count=8"

os.environ["JAXMERGE_NO_COMPILATION_CACHE"] = "1"  # the command's cache stays out of the tests (one test turns it on)

import jax  # noqa: E402  (must come after XLA_FLAGS is set)
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure(config):
    """The session's compilation cache: made by the controller, handed to each worker."""
    if hasattr(config, "workerinput"):
        directory = config.workerinput["xla_cache"]
    else:
        directory = config.xla_cache = tempfile.mkdtemp(prefix="jaxmerge-tests-xla-")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    for action in ("reading", "writing"):
        config.addinivalue_line("filterwarnings", f"ignore:Error {action} persistent compilation cache entry:UserWarning")


def pytest_configure_node(node):
    node.workerinput["xla_cache"] = node.config.xla_cache


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):
        shutil.rmtree(config.xla_cache, ignore_errors=True)


@pytest.fixture
def standard_promotion():
    """Standard dtype promotion for one test: optax.adam (and prodigy) mix Python floats with
    int32 step counts, which strict promotion rejects; jaxmerge's own code runs strict."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests first: the workers then share out the many short tests that
    remain, instead of one of them starting a long test near the end (longest first)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)

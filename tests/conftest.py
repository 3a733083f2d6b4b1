"""Strict test setup: 8 simulated CPU devices, strict dtype promotion, no rank broadcasting.

XLA's CPU back end compiles without LLVM's optimisations (``--xla_backend_optimization_level=0``):
the suite's time is mostly compilation of small programs, and this takes a quarter off it; the
programs and their results are the same up to floating-point rounding."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()

os.environ["JAXMERGE_NO_COMPILATION_CACHE"] = "1"  # the command's cache stays out of the tests (one test turns it on)

import jax  # noqa: E402  (must come after XLA_FLAGS is set)
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


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

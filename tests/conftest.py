"""Test set-up: one BLAS thread, 8 virtual CPU devices and a session-wide XLA compilation
cache, before JAX initialises."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The end-to-end tests compile the same small programs many times over: in-process (a new jit
# per test) and in the CLI and multi-host subprocesses, which inherit this environment. One
# persistent compilation cache for the session serves them all. It starts empty (a fresh
# directory, removed at exit) unless the caller names one in JAX_COMPILATION_CACHE_DIR, so a
# run never depends on what an earlier run left behind.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="ogpsa-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")


import pytest  # noqa: E402

# Recorded around every executable jit has to obtain, whether the backend compiles it or it is
# read from the persistent cache above.
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def backend_compiles():
    """A list that gains one entry per executable that jit had to obtain (compiled by the
    backend or read from the persistent compilation cache) while the test runs: a behavioural
    check of "no recompilation" (jit caches are keyed by shapes, dtypes, shardings and static
    arguments, so a second call that needs an executable has changed one)."""
    events: list[float] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == _BACKEND_COMPILE:
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)

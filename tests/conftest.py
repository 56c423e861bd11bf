"""Test set-up, before JAX initialises: one BLAS thread, 8 virtual CPU devices, a session-wide
XLA compilation cache and a cheaper CPU code generator; the slow modules are run first."""

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
# Most of a test's time is XLA compiling many small programs. LLVM optimisation level 0 for the
# CPU code cuts that by about a quarter (measured on tests/test_train.py's Explicit-mesh runs:
# 42.7 -> 30.9 CPU s). The flag sets LLVM's optimisation of the generated code, not XLA's own
# passes: the memory and sharding tests, which read the compiled programs, pass unchanged.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")


import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Modules with slow tests first (stable within each group): with `pytest -n N --dist
    loadfile` (`make test`) the long end-to-end modules start at once and the many short unit
    modules fill in at the end, instead of one long module starting last."""
    path = lambda item: item.nodeid.split("::")[0]  # noqa: E731
    slow = {path(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: path(item) not in slow)


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

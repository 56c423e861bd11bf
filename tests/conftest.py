"""Test set-up: one BLAS thread and 8 virtual CPU devices, before JAX initialises."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")


import pytest  # noqa: E402

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def backend_compiles():
    """A list that gains one entry per XLA backend compilation while the test runs: a
    behavioural check of "no recompilation" (jit caches are keyed by shapes, dtypes,
    shardings and static arguments, so a second call that compiles has changed one)."""
    events: list[float] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == _BACKEND_COMPILE:
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)

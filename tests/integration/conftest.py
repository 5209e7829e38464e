"""Fixtures shared by the integration tests."""

import pytest


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray for one test module (2 CPUs, no dashboard, workers not echoed)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()

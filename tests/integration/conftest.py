"""One local Ray cluster (2 CPUs) shared by every integration test of the session."""

from __future__ import annotations

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_cluster():
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
    from forgetting_ray.ray_utils import init_ray

    ray = init_ray(num_cpus=2, include_dashboard=True)
    yield ray
    ray.shutdown()

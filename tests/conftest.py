import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    # Two test workers on a 2-core machine: one torch thread each avoids oversubscription.
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return
    torch.set_num_threads(int(os.environ.get("DMLKIT_TEST_THREADS", "1")))


# The module-scoped fixtures of the tests/test_reliability_*.py files (a tiny JPEG folder
# dataset and a finished run in it); imported here so that every one of those files gets them.
from tests.reliability_fixtures import finished, tree  # noqa: E402, F401

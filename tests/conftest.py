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

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# test callbacks and fixtures are named as config targets (core.config refuses targets outside the project)
os.environ["DB2_ALLOW_TARGETS"] = "tests"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield

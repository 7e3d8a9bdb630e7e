"""Shared test configuration: bounded hypothesis budgets so the suite stays fast on 2 cores."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("FLOWTEXT_HYPOTHESIS_PROFILE", "default"))
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _reset_deterministic_algorithms():
    """Trainer(deterministic=True) switches torch's global flag on and never off: isolate tests."""
    yield
    torch.use_deterministic_algorithms(False)

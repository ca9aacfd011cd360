import os
import random

import pytest
import torch
from hypothesis import HealthCheck, settings

# Triton's interpreter runs the kernels on CPU tensors where there is no GPU; triton.jit reads this at import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global random state: a landing never depends on luck."""
    torch.manual_seed(0)
    random.seed(0)

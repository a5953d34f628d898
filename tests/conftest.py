"""Shared test configuration: a bounded, derandomized hypothesis profile."""

import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this
# once, when it is first imported (importing patchaug imports it through torch._dynamo), so it
# is set here, before any test module imports patchaug.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=60,
    derandomize=True,
    database=None,  # the same examples on every machine, whatever ran before
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Two cores on CI: keep torch from oversubscribing them.
torch.set_num_threads(min(2, torch.get_num_threads()))

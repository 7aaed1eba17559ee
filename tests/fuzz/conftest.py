"""Hypothesis settings of the fuzz suites: a fixed, bounded budget per test in CI
(`derandomize`: every run tries the same inputs, so a red run reproduces), and a larger
one with `HYPOTHESIS_PROFILE=long` for a session of fuzzing by hand."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=5_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

"""Fixtures of tests/launch (the helpers live in tests/launch/e2e.py)."""
from tests.launch.e2e import tiny_dataset  # noqa: F401  (session fixture)

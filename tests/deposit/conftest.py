"""Fixtures of the deposit tests: ``env`` drives the steps directly."""

from fixtures.steps_env import env

__all__ = ["env"]

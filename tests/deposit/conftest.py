"""Fixtures of the deposit tests: ``env`` drives the steps directly; ``folder_env``
does the same for folders deposited in place."""

from fixtures.inplace_env import folder_env
from fixtures.steps_env import env

__all__ = ["env", "folder_env"]

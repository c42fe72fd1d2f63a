"""nbankd: deposits files from watched inboxes into neurobank archives, durably and exactly once."""

# the one place the version is written; pyproject.toml reads it from here
__version__ = "0.1.0.dev0"

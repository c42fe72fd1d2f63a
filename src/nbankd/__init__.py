"""nbankd: deposits files from watched inboxes into neurobank archives, durably and exactly once."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nbankd")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"

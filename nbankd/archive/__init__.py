"""Neurobank archives on disk: layout and policy (.layout), creating and opening
(.opening), durable placement (.durable)."""

from nbankd.archive.layout import AccessPolicy, Anomaly, Archive, ArchivePolicy
from nbankd.archive.opening import create_archive, open_archive

__all__ = ["AccessPolicy", "Anomaly", "Archive", "ArchivePolicy", "create_archive", "open_archive"]

"""Registry clients: django-neurobank over HTTP, and the embedded SQLite registry."""

from nbankd.registry.base import (
    ArchiveRecord,
    DataType,
    LocationRecord,
    Registry,
    ResourceRecord,
    full_url,
)

__all__ = ["ArchiveRecord", "DataType", "LocationRecord", "Registry", "ResourceRecord", "full_url"]

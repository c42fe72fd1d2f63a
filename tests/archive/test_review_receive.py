"""Review of register_copy (transfer/receive.py): a copy the registry may already
locate is never removed on a refusal the registry cannot then be asked about."""

from __future__ import annotations

import hashlib

import pytest

from fixtures.cli_backends import Backend
from fixtures.django_server import DjangoServer
from fixtures.fault_proxy import FaultProxy
from nbankd import errors
from nbankd.archive.layout import Archive
from nbankd.registry.http import HttpRegistry
from nbankd.transfer import receive

#: a refusal as the server words one: a 400 with field errors
REFUSED = {"archive": ["This archive may not locate this resource."]}


def _copied(backend: Backend) -> tuple[bytes, str, Archive, str, receive.Copied]:
    """A resource of archive "src" copied into a new archive "dest", not yet located
    there: (its bytes, its id, dest, dest's name, the copy)."""
    _, src_name = backend.archive("src")
    data = backend.blob("a")
    id = backend.resource(data, src_name)
    dest, dest_name = backend.archive("dest")
    source = dest.path.parent / "source.dat"
    source.write_bytes(data)
    copied = receive.copy_resource(dest, source, id, hashlib.sha1(data).hexdigest())
    assert copied.created and copied.path is not None
    return data, id, dest, dest_name, copied


def test_a_refused_location_it_cannot_check_keeps_the_copy(
    django_backend: Backend, django_registry: DjangoServer, fault_proxy: FaultProxy
) -> None:
    """A location POST refused while the registry cannot then say whether it lists
    this archive (its locations refused too) keeps the stored copy: it may be the
    one a concurrent run located, and the registry would then point at nothing."""
    data, id, dest, dest_name, copied = _copied(django_backend)
    assert copied.path is not None
    django_backend.registry.add_location(id, dest_name)  # the concurrent run's location
    where = f"/resources/{id}/locations/"
    fault_proxy.inject("error500", path_contains=where, status=400, body=REFUSED)
    with (
        HttpRegistry(fault_proxy.url, django_registry.auth) as proxied,
        pytest.raises(errors.RegistryRejected) as caught,
    ):
        receive.register_copy(proxied, dest, copied, id, dest_name)
    assert fault_proxy.count("error500") == 2  # the POST, then the check
    assert "kept" in caught.value.hint
    assert copied.path.read_bytes() == data
    assert dest_name in django_backend.registry.get_resource(id).locations  # type: ignore[union-attr]


def test_a_sites_own_400_on_the_location_keeps_the_copy(
    django_backend: Backend, django_registry: DjangoServer, fault_proxy: FaultProxy
) -> None:
    """A location POST answered by a proxy's or site's own 400 page (no field errors) is
    no refusal: the copy stays, said stored but not registered, never removed."""
    data, id, dest, dest_name, copied = _copied(django_backend)
    assert copied.path is not None
    fault_proxy.inject("error500", methods={"POST"}, path_contains="/locations/", status=400)
    with (
        HttpRegistry(fault_proxy.url, django_registry.auth) as proxied,
        pytest.raises(errors.RegistryError) as caught,
    ):
        receive.register_copy(proxied, dest, copied, id, dest_name)
    assert not isinstance(caught.value, errors.RegistryRejected)
    assert "stored but not registered" in str(caught.value)
    assert copied.path.read_bytes() == data

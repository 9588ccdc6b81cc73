"""DERMFLOW_ALLOWED_HOSTS is parsed strictly, and the guard blocks IPv6 forms that embed or
reach internal addresses (6to4, site-local)."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from dermflow.settings import SettingsError

from dermflow.ingestion.guard import BlockedURL, HostGuard
from dermflow.settings import load_settings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("entry, says", [
    ("*", "'*' is not a host name"),
    ("a b", "'a b' is not a host name"),
    ("127.0.0.l", "'127.0.0.l' looks like a mistyped IP address"),
    ("10.0.0.5/8", "'10.0.0.5/8' has host bits set"),
    ("10.0.0.0/33", "'10.0.0.0/33' is not a valid CIDR"),
    ("https://example.org", "is not a valid CIDR (nor a host name"),
])
def test_invalid_entries_are_rejected_naming_the_entry(entry, says):
    with pytest.raises(SettingsError, match="DERMFLOW_ALLOWED_HOSTS") as caught:
        load_settings(allowed_hosts=f"example.org, {entry}")
    assert says in str(caught.value)


@pytest.mark.parametrize("entry", ["0.0.0.0/0", "::/0", "0.0.0.0/1"])
def test_a_network_that_turns_the_guard_off_needs_the_override(entry):
    with pytest.raises(SettingsError, match="DERMFLOW_ALLOW_ANY_HOST"):
        load_settings(allowed_hosts=entry)
    assert load_settings(allowed_hosts=entry, allow_any_host=True).allowed_host_list == [entry]


def test_valid_entries_are_kept():
    value = "127.0.0.1, 10.0.0.0/8, fc00::/7, ::1, mirror.local, images-1.example.org., my_service"
    settings = load_settings(allowed_hosts=value)
    assert settings.allowed_host_list == [part.strip() for part in value.split(",")]
    guard = HostGuard(settings.allowed_host_list)
    assert guard.allowed_names == {"mirror.local", "images-1.example.org", "my_service"}
    assert ipaddress.ip_network("10.0.0.0/8") in guard.allowed_networks


def test_the_guard_refuses_a_bad_entry_instead_of_taking_it_as_a_name():
    with pytest.raises(ValueError, match="'10.0.0.5/8' has host bits set"):
        HostGuard(["10.0.0.5/8"])


@pytest.mark.parametrize("address", ["2002:7f00:1::1", "2002:a00:1::1", "fec0::1", "::ffff:127.0.0.1"])
def test_ipv6_forms_of_internal_addresses_are_blocked(address):
    with pytest.raises(BlockedURL, match="blocked_address"):
        asyncio.run(HostGuard().check(f"http://[{address}]/a"))

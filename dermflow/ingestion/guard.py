"""The fetcher's guard against untrusted URLs: schemes, SSRF, and credentials in logs.

A dataset CSV is untrusted input. Its URLs (and every redirect hop) may only use http/https,
may not reach private, loopback, link-local or otherwise internal addresses unless the host
is explicitly allowed (`Settings.allowed_host_list`: host names, IPs or CIDRs), and any
credentials they carry (userinfo, signed-URL query tokens) are redacted before a URL is
written to a log or a manifest.

`dermflow.ingestion.pinning.PinnedNetworkBackend` makes the HTTP client connect only to
addresses the guard has just checked (it resolves names itself), so DNS rebinding between the
check and the connection cannot reach an internal address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from dermflow.errors import RejectedError
from dermflow.settings import parse_allowed_host

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

ALLOWED_SCHEMES = ("http", "https")
REDACTED = "REDACTED"

# Query parameters that carry credentials in signed or tokenised URLs (compared lower-cased).
SECRET_QUERY_KEYS = frozenset(
    {
        "token", "access_token", "id_token", "refresh_token", "auth", "authorization",
        "sig", "signature", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
        "x-goog-signature", "x-goog-credential", "se", "sp", "sv", "skoid", "sktid",
        "key", "api_key", "apikey", "secret", "password", "passwd", "pwd", "session",
        "awsaccesskeyid", "policy", "key-pair-id", "credential",
    }
)


class BlockedURL(RejectedError):
    """A URL the guard refuses (permanent); `reason` is the manifest reason (`bad_scheme`,
    `blocked_address`)."""


def redact_url(url: str) -> str:
    """The URL without userinfo and with credential-like query values replaced by REDACTED."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(name.lower() in SECRET_QUERY_KEYS for name, _ in pairs):
            query = urlencode(
                [(name, REDACTED if name.lower() in SECRET_QUERY_KEYS else value) for name, value in pairs],
                quote_via=quote,
                safe="/:",
            )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def redact_text(text: str) -> str:
    """Every URL inside free text redacted (for exception messages and log lines)."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)


def redact_values(value):
    """`value` (JSON-like: dicts, lists, strings) with every URL in every string redacted, for
    run configurations and parameters written to reports, metrics and artifacts."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: redact_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(item) for item in value)
    return value


class RedactingFilter(logging.Filter):
    """Rewrites log records so URLs in them carry no credentials (installed on httpx's loggers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is left for logging to report
            return True
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


_FILTER = RedactingFilter()


def install_log_redaction(logger_names: Iterable[str] = ("httpx", "httpcore", "dermflow")) -> None:
    """Attach the redacting filter to the loggers that may print request URLs (idempotent)."""
    for name in logger_names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


# IPv6 ranges that are not private by Python's tables but reach, or once reached, internal
# networks: 6to4 (2002::/16 embeds an IPv4 address, e.g. 2002:7f00:1:: is 127.0.0.1) and the
# deprecated site-local fec0::/10.
_BLOCKED_V6 = (ipaddress.ip_network("2002::/16"), ipaddress.ip_network("fec0::/10"))


def _is_internal(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif any(address in network for network in _BLOCKED_V6):
            return True
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or (isinstance(address, ipaddress.IPv4Address) and address in ipaddress.ip_network("100.64.0.0/10"))
    )


async def system_resolver(host: str, port: int) -> list[str]:
    """All addresses the system resolver gives for `host` (what the HTTP client will connect to)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


class HostGuard:
    """Decides whether a URL may be fetched; caches each host's verdict for the guard's life.

    `allowed` holds host names (exact, case-insensitive), IP addresses, or CIDRs that are
    exempt from the internal-address rule. `check` gives each URL (and redirect hop) an early
    verdict, cached per host for the guard's life; `connectable_addresses` re-resolves and
    re-checks at every new connection (see `pinning.PinnedNetworkBackend`), so a host that starts
    resolving to an internal address after its verdict (DNS rebinding) is still refused.
    """

    def __init__(self, allowed: Iterable[str] = (), resolver: Resolver | None = None) -> None:
        self.allowed_names: set[str] = set()
        self.allowed_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for item in allowed:
            if not item.strip():
                continue
            parsed = parse_allowed_host(item)  # the settings' parser: a bad entry is an error, not a name
            if isinstance(parsed, str):
                self.allowed_names.add(parsed)
            else:
                self.allowed_networks.append(parsed)
        self.resolver = resolver or system_resolver
        self._verdicts: dict[tuple[str, int], BlockedURL | None] = {}

    def _address_allowed(self, address: IPAddress) -> bool:
        if not _is_internal(address):
            return True
        return any(address in network for network in self.allowed_networks if network.version == address.version)

    async def check(self, url: str) -> None:
        """Raise `BlockedURL` unless `url` is http(s) and its host resolves only to allowed addresses."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as error:
            raise BlockedURL("bad_scheme", f"malformed URL {redact_url(url)!r}") from error
        scheme = parts.scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise BlockedURL("bad_scheme", f"scheme {scheme or '(none)'!r} in {redact_url(url)!r} (only http/https)")
        host = (parts.hostname or "").lower().rstrip(".")
        if not host:
            raise BlockedURL("bad_scheme", f"no host in {redact_url(url)!r}")
        port = port or (443 if scheme == "https" else 80)
        cache_key = (host, port)
        if cache_key in self._verdicts:
            verdict = self._verdicts[cache_key]
        else:
            verdict, settled = await self._verdict(host, port)
            if settled:
                self._verdicts[cache_key] = verdict
        if verdict is not None:
            raise verdict

    async def connectable_addresses(self, host: str, port: int) -> list[str]:
        """The addresses a connection to `host` may use, resolved now (for `PinnedNetworkBackend`).

        Raises `BlockedURL` when any of them is internal and not allowed, `OSError` when the
        name does not resolve.
        """
        host = host.lower().rstrip(".")
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            if host not in self.allowed_names and not self._address_allowed(literal):
                raise BlockedURL("blocked_address", f"{host} is an internal address")
            return [host]
        resolved = await self.resolver(host, port)
        if not resolved:
            raise OSError(f"{host} resolves to no address")
        if host not in self.allowed_names:
            for text in resolved:
                address = ipaddress.ip_address(text.split("%", 1)[0])
                if not self._address_allowed(address):
                    raise BlockedURL("blocked_address", f"{host} resolves to internal address {address}")
        return resolved

    async def _verdict(self, host: str, port: int) -> tuple[BlockedURL | None, bool]:
        """(the refusal or None, whether that verdict may be cached)."""
        if host in self.allowed_names:
            return None, True
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            try:
                addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in await self.resolver(host, port)]
            except OSError:
                # Unresolvable now: let the client fail with a connect error (transient, retried),
                # and do not cache, so a later resolution is checked again.
                return None, False
        for address in addresses:
            if not self._address_allowed(address):
                return BlockedURL("blocked_address", f"{host} resolves to internal address {address}"), True
        return None, True

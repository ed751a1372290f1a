"""What keeps web pages out of corolla's local HTTP servers (`corolla api`, `corolla monitor`), even on
loopback and without an API key: the Host check (no DNS rebinding) and the JSON-only bodies (no cross-site
form posts). Pure yes/no questions on header values; the servers answer the refusals.

DNS rebinding points a name the attacker owns (evil.example) at 127.0.0.1, so the victim's browser sends
`Host: evil.example:8000` and lets the attacker's page read the answers. Every name must therefore be one
the operator chose: localhost, the listening host, or an allowed host. An IP address is always accepted: a
page can only send it from an origin that is that address, which no attacker controls. A page on another
origin can POST without a preflight only as text/plain, urlencoded or multipart (or a body with no type at
all); requiring `application/json` makes the browser ask first, and the gateway answers no CORS.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection

ANY_HOST = "*"  # in allowed hosts: any name (the operator put a proxy or an API key in front)
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain"})


def host_name(header: bytes | str | None) -> str | None:
    """The name of a Host header value, lower case, without port, brackets or a final dot; None when it
    is absent or malformed."""
    if header is None:
        return None
    value = header.decode("latin-1") if isinstance(header, bytes) else header
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    else:
        name, colon, port = value.partition(":")
        if colon and not port.isdigit():
            return None
    name = name.removesuffix(".")
    if not name or any(c.isspace() or c in "/@?#\\" for c in name):
        return None
    return name


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(header: bytes | str | None, *, listen_host: str, allowed: Collection[str]) -> bool:
    """Whether a request with this Host header may be answered: an IP address, localhost, the host the
    server listens on, or a name in `allowed` (`*` allows any)."""
    name = host_name(header)
    if name is None:
        return False
    if ANY_HOST in allowed or _is_ip(name) or name in _LOCAL_NAMES:
        return True
    return name == host_name(listen_host) or name in {host_name(each) for each in allowed}


def is_json(content_type: bytes | str | None) -> bool:
    """Whether a Content-Type header names JSON (`application/json`, parameters such as charset allowed)."""
    if content_type is None:
        return False
    value = content_type.decode("latin-1") if isinstance(content_type, bytes) else content_type
    return value.split(";", 1)[0].strip().lower() == "application/json"


def loggable(text: str, *, limit: int = 256) -> str:
    """Text a client chose (a request path) as part of one log line: control characters, backslashes and
    non-ASCII escaped (`%0A` decoded to a newline cannot forge a second line), cut after `limit`."""
    escaped = text.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."

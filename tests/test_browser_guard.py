"""What keeps web pages out (`client/browser_guard.py`), table-driven: which Host headers are answered (no
DNS rebinding), which bodies count as JSON (no cross-site form posts), and client text in a log line."""

from __future__ import annotations

import pytest

from client.browser_guard import host_allowed, host_name, is_json, loggable


@pytest.mark.parametrize(
    ("header", "name"),
    [
        (b"127.0.0.1:8000", "127.0.0.1"),
        (b"[::1]:8000", "::1"),
        (b"[::1]", "::1"),
        (b"LocalHost.:8000", "localhost"),
        (b"api.internal", "api.internal"),
        (b"", None),
        (b"[::1", None),
        (b"[::1]x", None),
        (b"host:port", None),
        (b"a b", None),
        (b"evil.example/x", None),
        (b"user@evil.example", None),
        (None, None),
    ],
)
def test_host_names(header: bytes | None, name: str | None) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize(
    ("header", "listen_host", "allowed", "answered"),
    [
        (b"127.0.0.1:8000", "127.0.0.1", [], True),
        (b"localhost:8000", "127.0.0.1", [], True),
        (b"[::1]:8000", "127.0.0.1", [], True),
        (b"10.0.0.5:8000", "0.0.0.0", [], True),  # an address: no name an attacker could rebind
        (b"evil.example:8000", "127.0.0.1", [], False),  # DNS rebinding
        (b"localhost.evil.example", "127.0.0.1", [], False),
        (b"gpu-box.lan:8000", "gpu-box.lan", [], True),  # the host it listens on
        (b"corolla-api:8000", "0.0.0.0", ["corolla-api"], True),
        (b"Corolla-API.", "0.0.0.0", ["corolla-api"], True),
        (b"other:8000", "0.0.0.0", ["corolla-api"], False),
        (b"anything.example", "0.0.0.0", ["*"], True),
        (b"", "127.0.0.1", ["*"], False),  # malformed is never answered
        (None, "127.0.0.1", [], False),
    ],
)
def test_hosts_answered(header: bytes | None, listen_host: str, allowed: list[str], answered: bool) -> None:
    assert host_allowed(header, listen_host=listen_host, allowed=allowed) is answered


@pytest.mark.parametrize(
    ("content_type", "json_body"),
    [
        (b"application/json", True),
        (b"Application/JSON; charset=utf-8", True),
        (b"text/plain", False),
        (b"text/plain;charset=UTF-8", False),
        (b"application/x-www-form-urlencoded", False),
        (b"multipart/form-data; boundary=x", False),
        (b"application/json-patch+json", False),
        (None, False),
    ],
)
def test_json_bodies(content_type: bytes | None, json_body: bool) -> None:
    assert is_json(content_type) is json_body


def test_client_text_stays_on_one_line() -> None:
    assert (
        loggable("/v1/x\n2030-01-01 INFO forged\r\x1b[2J\\n")
        == "/v1/x\\n2030-01-01 INFO forged\\r\\x1b[2J\\\\n"
    )
    assert loggable("/ünïcode") == "/\\xfcn\\xefcode"
    assert loggable("/" + "a" * 1000, limit=10) == "/aaaaaaaaa..."

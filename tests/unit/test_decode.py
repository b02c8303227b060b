"""Decoding arguments for `mtrace trace`."""

from __future__ import annotations

import os
import socket
import struct

from mtrace.tracer.decode import flags_text, format_result, format_sockaddr, open_flags, quote


def test_quote_escapes_and_cuts() -> None:
    assert quote(b'a"b\\c\n\x00') == '"a\\"b\\\\c\\n\\x00"'
    assert quote(b"x" * 300, 4) == '"xxxx"...'


def test_open_flags() -> None:
    assert open_flags(os.O_RDONLY) == "O_RDONLY"
    assert open_flags(os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC) == (
        "O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC")
    assert open_flags(os.O_RDWR | 0x40000000) == "O_RDWR|0x40000000"


def test_flags_text_zero_and_unknown_bits() -> None:
    table = [(1, "A"), (2, "B")]
    assert flags_text(0, table, "NONE") == "NONE"
    assert flags_text(3 | 8, table) == "A|B|0x8"


def test_sockaddrs() -> None:
    v4 = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 8080) + socket.inet_aton("10.1.2.3")
    assert format_sockaddr(v4 + bytes(8)) == "{AF_INET 10.1.2.3:8080}"
    v6 = (struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 53) + bytes(4)
          + socket.inet_pton(socket.AF_INET6, "::1") + bytes(4))
    assert format_sockaddr(v6) == "{AF_INET6 [::1]:53}"
    unix = struct.pack("=H", socket.AF_UNIX) + b"/run/app.sock\0"
    assert format_sockaddr(unix) == '{AF_UNIX "/run/app.sock"}'
    abstract = struct.pack("=H", socket.AF_UNIX) + b"\0hidden"
    assert format_sockaddr(abstract) == "{AF_UNIX @hidden}"
    assert format_sockaddr(b"\x01") == "{}"


def test_results() -> None:
    assert format_result(None) == "?"
    assert format_result(3) == "3"
    assert format_result(-2) == "-1 ENOENT (No such file or directory)"

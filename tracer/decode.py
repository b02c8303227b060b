"""Decoding syscall arguments and results into readable text, strace-style.

Each call has a signature: a list of (argument name, kind). A kind names a
decoder that turns the raw register value (and, for pointers, the tracee's
memory) into a short string; decoding never fails, it shows what it could not
read as the raw pointer.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Callable

from .call import AT_FDCWD, SyscallCall, signed32

STRING_LIMIT = 256

SIGNATURES: dict[str, tuple[tuple[str, str], ...]] = {
    "open": (("path", "path"), ("flags", "open_flags"), ("mode", "mode")),
    "openat": (("dirfd", "dirfd"), ("path", "path"), ("flags", "open_flags"), ("mode", "mode")),
    "openat2": (("dirfd", "dirfd"), ("path", "path"), ("how", "pointer"), ("size", "uint")),
    "creat": (("path", "path"), ("mode", "mode")),
    "stat": (("path", "path"), ("statbuf", "pointer")),
    "lstat": (("path", "path"), ("statbuf", "pointer")),
    "newfstatat": (("dirfd", "dirfd"), ("path", "path"), ("statbuf", "pointer"),
                   ("flags", "at_flags")),
    "statx": (("dirfd", "dirfd"), ("path", "path"), ("flags", "at_flags"), ("mask", "hex"),
              ("statxbuf", "pointer")),
    "statfs": (("path", "path"), ("buf", "pointer")),
    "fstatfs": (("fd", "fd"), ("buf", "pointer")),
    "fchmod": (("fd", "fd"), ("mode", "mode")),
    "fchown": (("fd", "fd"), ("owner", "int"), ("group", "int")),
    "inotify_add_watch": (("fd", "fd"), ("path", "path"), ("mask", "hex")),
    "access": (("path", "path"), ("mode", "access_mode")),
    "faccessat": (("dirfd", "dirfd"), ("path", "path"), ("mode", "access_mode")),
    "faccessat2": (("dirfd", "dirfd"), ("path", "path"), ("mode", "access_mode"),
                   ("flags", "at_flags")),
    "readlink": (("path", "path"), ("buf", "pointer"), ("size", "uint")),
    "readlinkat": (("dirfd", "dirfd"), ("path", "path"), ("buf", "pointer"), ("size", "uint")),
    "chdir": (("path", "path"),),
    "getxattr": (("path", "path"), ("name", "path"), ("value", "pointer"), ("size", "uint")),
    "lgetxattr": (("path", "path"), ("name", "path"), ("value", "pointer"), ("size", "uint")),
    "listxattr": (("path", "path"), ("list", "pointer"), ("size", "uint")),
    "llistxattr": (("path", "path"), ("list", "pointer"), ("size", "uint")),
    "truncate": (("path", "path"), ("length", "long")),
    "mkdir": (("path", "path"), ("mode", "mode")),
    "mkdirat": (("dirfd", "dirfd"), ("path", "path"), ("mode", "mode")),
    "unlink": (("path", "path"),),
    "unlinkat": (("dirfd", "dirfd"), ("path", "path"), ("flags", "at_flags")),
    "rmdir": (("path", "path"),),
    "rename": (("oldpath", "path"), ("newpath", "path")),
    "renameat": (("olddirfd", "dirfd"), ("oldpath", "path"), ("newdirfd", "dirfd"),
                 ("newpath", "path")),
    "renameat2": (("olddirfd", "dirfd"), ("oldpath", "path"), ("newdirfd", "dirfd"),
                  ("newpath", "path"), ("flags", "hex")),
    "socket": (("domain", "domain"), ("type", "socket_type"), ("protocol", "int")),
    "connect": (("fd", "fd"), ("addr", "sockaddr"), ("addrlen", "uint")),
    "bind": (("fd", "fd"), ("addr", "sockaddr"), ("addrlen", "uint")),
    "listen": (("fd", "fd"), ("backlog", "int")),
    "accept": (("fd", "fd"), ("addr", "pointer"), ("addrlen", "pointer")),
    "accept4": (("fd", "fd"), ("addr", "pointer"), ("addrlen", "pointer"),
                ("flags", "socket_flags")),
    "sendto": (("fd", "fd"), ("buf", "buffer"), ("len", "uint"), ("flags", "hex"),
               ("dest_addr", "sockaddr_or_null"), ("addrlen", "uint")),
    "sendmsg": (("fd", "fd"), ("msg", "pointer"), ("flags", "hex")),
    "recvfrom": (("fd", "fd"), ("buf", "pointer"), ("len", "uint"), ("flags", "hex"),
                 ("src_addr", "pointer"), ("addrlen", "pointer")),
    "recvmsg": (("fd", "fd"), ("msg", "pointer"), ("flags", "hex")),
    "getsockname": (("fd", "fd"), ("addr", "pointer"), ("addrlen", "pointer")),
    "getpeername": (("fd", "fd"), ("addr", "pointer"), ("addrlen", "pointer")),
    "execve": (("path", "path"), ("argv", "argv"), ("envp", "pointer")),
    "execveat": (("dirfd", "dirfd"), ("path", "path"), ("argv", "argv"), ("envp", "pointer"),
                 ("flags", "at_flags")),
}

# The argument of sockaddr kinds whose length is the next argument.
_OPEN_FLAGS = [
    (os.O_WRONLY, "O_WRONLY"), (os.O_RDWR, "O_RDWR"), (os.O_CREAT, "O_CREAT"),
    (os.O_EXCL, "O_EXCL"), (os.O_NOCTTY, "O_NOCTTY"), (os.O_TRUNC, "O_TRUNC"),
    (os.O_APPEND, "O_APPEND"), (os.O_NONBLOCK, "O_NONBLOCK"), (os.O_DSYNC, "O_DSYNC"),
    (0o20000, "O_ASYNC"), (0o40000, "O_DIRECT"), (0o100000, "O_LARGEFILE"),
    (os.O_NOFOLLOW, "O_NOFOLLOW"), (os.O_NOATIME, "O_NOATIME"),
    (os.O_CLOEXEC, "O_CLOEXEC"), (0o4010000, "O_SYNC"), (os.O_PATH, "O_PATH"),
    (0o20200000, "O_TMPFILE"), (os.O_DIRECTORY, "O_DIRECTORY"),
]
_AT_FLAGS = [(0x100, "AT_SYMLINK_NOFOLLOW"), (0x200, "AT_EACCESS|AT_REMOVEDIR"),
             (0x400, "AT_SYMLINK_FOLLOW"), (0x800, "AT_NO_AUTOMOUNT"),
             (0x1000, "AT_EMPTY_PATH"), (0x2000, "AT_STATX_FORCE_SYNC"),
             (0x4000, "AT_STATX_DONT_SYNC")]
_DOMAINS = {socket.AF_UNIX: "AF_UNIX", socket.AF_INET: "AF_INET", socket.AF_INET6: "AF_INET6",
            socket.AF_NETLINK: "AF_NETLINK", socket.AF_PACKET: "AF_PACKET", 0: "AF_UNSPEC"}
_SOCKET_TYPES: dict[int, str] = {socket.SOCK_STREAM: "SOCK_STREAM", socket.SOCK_DGRAM: "SOCK_DGRAM",
                 socket.SOCK_RAW: "SOCK_RAW", socket.SOCK_SEQPACKET: "SOCK_SEQPACKET"}
_SOCK_NONBLOCK = 0o4000
_SOCK_CLOEXEC = 0o2000000


def quote(data: bytes, limit: int = STRING_LIMIT) -> str:
    """A C-style quoted string; non-printable bytes escaped, long ones cut with ``...``."""
    shown = data[:limit]
    out = []
    for byte in shown:
        char = chr(byte)
        if char == '"' or char == "\\":
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif 32 <= byte < 127:
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return '"' + "".join(out) + '"' + ("..." if len(data) > limit else "")


def flags_text(value: int, table: list[tuple[int, str]], zero: str = "0") -> str:
    names = []
    rest = value
    for bit, name in table:
        if bit and value & bit == bit and rest & bit:
            names.append(name)
            rest &= ~bit
    if rest:
        names.append(hex(rest))
    return "|".join(names) or zero


def open_flags(value: int) -> str:
    access = {0: "O_RDONLY", 1: "O_WRONLY", 2: "O_RDWR"}.get(value & 3, "O_ACCMODE")
    rest = flags_text(value & ~3, [item for item in _OPEN_FLAGS if item[0] not in (1, 2)], "")
    return access + ("|" + rest if rest else "")


def format_sockaddr(data: bytes) -> str:
    if len(data) < 2:
        return "{}"
    (family,) = struct.unpack_from("=H", data)
    if family == socket.AF_INET and len(data) >= 8:
        port = struct.unpack_from("!H", data, 2)[0]
        host = socket.inet_ntop(socket.AF_INET, data[4:8])
        return f"{{AF_INET {host}:{port}}}"
    if family == socket.AF_INET6 and len(data) >= 24:
        port = struct.unpack_from("!H", data, 2)[0]
        host = str(ipaddress.IPv6Address(data[8:24]))
        return f"{{AF_INET6 [{host}]:{port}}}"
    if family == socket.AF_UNIX:
        path = data[2:]
        if path[:1] == b"\0":
            return "{AF_UNIX @" + quote(path[1:].rstrip(b"\0"))[1:-1] + "}"
        return "{AF_UNIX " + quote(path.split(b"\0", 1)[0]) + "}"
    return f"{{{_DOMAINS.get(family, f'family={family}')}}}"


def _dirfd(call: SyscallCall, index: int) -> str:
    value = call.int_arg(index)
    return "AT_FDCWD" if value == AT_FDCWD else str(value)


def _path(call: SyscallCall, index: int) -> str:
    if call.args[index] == 0:
        return "NULL"
    try:
        return quote(call.read_string(index))
    except OSError:
        return hex(call.args[index])


def _sockaddr(call: SyscallCall, index: int) -> str:
    pointer, length = call.args[index], call.uint_arg(index + 1)
    if pointer == 0:
        return "NULL"
    try:
        return format_sockaddr(call.read(pointer, min(length, 128)))
    except OSError:
        return hex(pointer)


def _buffer(call: SyscallCall, index: int) -> str:
    pointer, length = call.args[index], call.uint_arg(index + 1)
    try:
        return quote(call.read(pointer, min(length, 32)), 32) + ("..." if length > 32 else "")
    except OSError:
        return hex(pointer)


def _argv(call: SyscallCall, index: int) -> str:
    pointer = call.args[index]
    items = []
    try:
        for position in range(32):
            (item,) = struct.unpack("=Q", call.read(pointer + 8 * position, 8))
            if item == 0:
                break
            items.append(quote(call.memory.read_cstring(call.tid, item), 64))
        else:
            items.append("...")
    except OSError:
        return hex(pointer)
    return "[" + ", ".join(items) + "]"


def _socket_type(call: SyscallCall, index: int) -> str:
    value = call.int_arg(index)
    text = _SOCKET_TYPES.get(value & 0xF, str(value & 0xF))
    if value & _SOCK_NONBLOCK:
        text += "|SOCK_NONBLOCK"
    if value & _SOCK_CLOEXEC:
        text += "|SOCK_CLOEXEC"
    return text


def _socket_flags(call: SyscallCall, index: int) -> str:
    return flags_text(call.int_arg(index), [(_SOCK_NONBLOCK, "SOCK_NONBLOCK"),
                                            (_SOCK_CLOEXEC, "SOCK_CLOEXEC")])


def _access_mode(call: SyscallCall, index: int) -> str:
    return flags_text(call.int_arg(index), [(4, "R_OK"), (2, "W_OK"), (1, "X_OK")], "F_OK")


_DECODERS: dict[str, Callable[[SyscallCall, int], str]] = {
    "path": _path,
    "dirfd": _dirfd,
    "fd": lambda call, index: str(call.int_arg(index)),
    "int": lambda call, index: str(call.int_arg(index)),
    "uint": lambda call, index: str(call.uint_arg(index)),
    "long": lambda call, index: str(call.long_arg(index)),
    "hex": lambda call, index: hex(call.args[index]),
    "pointer": lambda call, index: hex(call.args[index]) if call.args[index] else "NULL",
    "mode": lambda call, index: f"0{call.uint_arg(index):o}",
    "open_flags": lambda call, index: open_flags(call.int_arg(index)),
    "at_flags": lambda call, index: flags_text(call.int_arg(index), _AT_FLAGS),
    "access_mode": _access_mode,
    "domain": lambda call, index: _DOMAINS.get(call.int_arg(index), str(call.int_arg(index))),
    "socket_type": _socket_type,
    "socket_flags": _socket_flags,
    "sockaddr": _sockaddr,
    "sockaddr_or_null": _sockaddr,
    "buffer": _buffer,
    "argv": _argv,
}


def decode_arguments(call: SyscallCall) -> list[tuple[str, str]]:
    """(name, text) for each argument worth showing."""
    signature = SIGNATURES.get(call.name)
    if signature is None:
        return [(f"arg{index}", hex(value)) for index, value in enumerate(call.args[:3])]
    decoded = []
    for index, (name, kind) in enumerate(signature):
        if kind == "mode" and call.name in ("open", "openat"):
            flags = call.int_arg(index - 1)
            if not (flags & os.O_CREAT or flags & 0o20200000 == 0o20200000):
                continue
        decoded.append((name, _DECODERS[kind](call, index)))
    return decoded


def errno_name(number: int) -> str:
    return errno.errorcode.get(number, f"E{number}")


def format_result(result: int | None) -> str:
    if result is None:
        return "?"
    if result < 0:
        number = -result
        return f"-1 {errno_name(number)} ({os.strerror(number)})"
    return str(result)


def result_value(result: int) -> int:
    return signed32(result) if -4096 < signed32(result) < 0 else result

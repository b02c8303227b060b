"""The wire protocol between the supervisor (client) and ``mtrace agent``.

Every message is a ``msgspec.Struct`` with an explicit tag, encoded as msgpack
arrays (``array_like``: ``[tag, field, field, ...]``), one union per direction
(:data:`ToAgent`, :data:`FromAgent`). A frame is a 4-byte big-endian length
followed by one message; a frame longer than the limit is a protocol violation.

Conversation::

    agent  -> client   AgentHello   version range, capabilities, nonce
    client -> agent    ClientHello  version, capabilities, nonce, proof
    agent  -> client   Welcome      negotiated version, proof   (or Goodbye)
    ...then, in any order and interleaved:
    client -> agent    Request(id, operation)     -> Response(id, result | Error)
    either way         StreamData / StreamCredit / StreamShutdown ...   (no reply)
    agent  -> client   Datagram, StreamEof, StreamReset, Goodbye        (events)

Authentication is an HMAC-SHA256 challenge/response over both nonces with the
shared secret, so the secret never crosses the wire and each side proves it
knows it (:func:`client_proof`, :func:`agent_proof`).

The channel (protocol 2): ``AgentHello.channels`` lists what the agent accepts
on this connection, ``ClientHello.channel`` picks one. With
:data:`CHANNEL_CHACHA20_POLY1305`, every frame after ``Welcome`` (both ways) is
sealed with keys derived from the handshake (``mtrace.agent.channel``): a
tampered, replayed or injected frame ends the connection. With
:data:`CHANNEL_PLAIN` frames stay as they are; an agent offers it only where the
byte stream is already private (its stdio pipes, or ``--allow-plaintext``). A
protocol-1 client sends no channel, which reads as plain.

Errors are values: a failed operation answers ``Response(id, Error(errno,
message))`` with the real errno of the failure in the target's context.

Flow control: every TCP stream has a window per direction. The receiver
announces its initial window when the stream opens (``TcpConnect.window``: what
the agent may send to the client; ``TcpConnected.window``: what the client may
send to the agent); a sender never has more unacknowledged ``StreamData`` bytes
in flight than it has credit, and the receiver returns credit
(``StreamCredit``) only once the bytes have been consumed (read by the
application, or written to the target's socket). Sending beyond the credit is a
protocol violation. A receiver may return more credit than was consumed (its
window grows) or less (it shrinks; the agent does this to keep the sum of a
connection's windows bounded), so a sender counts credit, never a fixed
window. Datagrams have no flow control; like UDP, they may be dropped when a
side is overwhelmed.

Incoming streams (protocol 3): ``IncomingConnection.window`` is what the client
may send to the agent, taken from the same pool as an outgoing stream's; the
agent may send :data:`INCOMING_INITIAL_CREDIT` at once (the first request
needs no round trip), and the client grants the rest of its receive window
with its first ``StreamCredit`` (mtrace: once 16 KiB have been read). With a protocol-2 peer both
windows are :data:`DEFAULT_WINDOW` from the start, and no such credit is sent. A
mirror stream whose window is spent (the client does not read it) is ended
with ``StreamReset(ENOBUFS)``: a copy never holds up the target's traffic nor
piles up in the agent.

Compatibility rules (read before changing anything here):

1. New fields go at the END of a struct and always have a default: an older
   peer's shorter array then decodes with the default, and an older peer
   decoding a newer, longer array ignores the trailing fields it does not know
   (``forbid_unknown_fields`` stays off). Never remove or reorder a field.
2. A tag never changes meaning and is never reused, even after its message is
   retired. Field types never change; add a new field instead.
3. New message types are announced as a capability in the hellos; a peer only
   sends a message the other side announced.
4. Bump :data:`PROTOCOL_VERSION` when adding fields or message types; raise
   :data:`MIN_PROTOCOL_VERSION` only when dropping support for old peers. The
   agent accepts any client version in ``[MIN_PROTOCOL_VERSION,
   PROTOCOL_VERSION]`` and both sides speak the lower of the two.
5. The golden-bytes tests (``tests/unit/test_protocol_golden.py``) pin the
   encoding of every message; a failing golden means the wire changed. Adding
   a field at the end makes its message one element longer (msgspec writes
   defaults too): extend that golden by exactly the encoded default and add a
   golden with the new field set. Any other edit to a golden is a break.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from typing import Final, Literal

import msgspec

from .errors import ProtocolError

PROTOCOL_VERSION: Final = 3
MIN_PROTOCOL_VERSION: Final = 1

#: Largest frame either side accepts after the handshake (length prefix excluded).
MAX_FRAME_SIZE: Final = 8 * 1024 * 1024
#: Largest frame accepted before the peer is authenticated.
MAX_HANDSHAKE_FRAME_SIZE: Final = 4096
#: Largest payload in one StreamData, Read reply or Write request.
MAX_CHUNK_SIZE: Final = 1024 * 1024
#: ReadFile answers EFBIG for files larger than this; use Open/Read instead.
MAX_WHOLE_FILE_SIZE: Final = 4 * 1024 * 1024
#: Default per-direction stream window.
DEFAULT_WINDOW: Final = 1024 * 1024
#: The first protocol in which incoming streams take their windows as
#: outgoing ones do (``IncomingConnection.window``, the client's first credit).
INCOMING_WINDOWS_VERSION: Final = 3
#: What the agent may send on an incoming stream before the client's first
#: credit (protocol 3): the client's receive window is this plus what it grants.
INCOMING_INITIAL_CREDIT: Final = 64 * 1024
#: Once a frame has started, both sides wait this many seconds at most for the
#: rest of it (their default; an idle peer may wait forever between frames).
FRAME_TIMEOUT: Final = 30.0

NONCE_SIZE: Final = 32
LENGTH_PREFIX: Final = 4

# Capabilities announced in the hellos.
CAP_FILES: Final = "files"
CAP_FILES_WRITE: Final = "files-write"
CAP_ENV: Final = "env"
CAP_TCP: Final = "tcp"
CAP_UDP: Final = "udp"
CAP_DNS: Final = "dns"
#: UploadBegin/UploadCommit (protocol 2): whole-file atomic replacement.
CAP_FILES_UPLOAD: Final = "files-upload"
#: UnixConnect (protocol 2): a stream to a Unix socket in the target's mount view.
CAP_UNIX_STREAM: Final = "unix-stream"

# Channels (AgentHello.channels, ClientHello.channel).
CHANNEL_PLAIN: Final = "plain"
CHANNEL_CHACHA20_POLY1305: Final = "chacha20-poly1305"
#: IncomingSubscribe and friends (protocol 2): mirror and steal the target's ports.
CAP_INCOMING: Final = "incoming"
#: ChangeMode: chmod of a target path (with --write).
CAP_FILES_CHMOD: Final = "files-chmod"
#: StatFs: statfs(2) of a target path (the filesystem it is on).
CAP_FILES_STATFS: Final = "files-statfs"
#: ChangeOwner: chown of a target path (with --write).
CAP_FILES_CHOWN: Final = "files-chown"
#: SetTimes: utimensat of a target path (with --write).
CAP_FILES_TIMES: Final = "files-times"
#: Link, Symlink, MakeNode: new names in the target (with --write).
CAP_FILES_LINKS: Final = "files-links"
#: SetXattr, RemoveXattr: extended attributes of a target path (with --write).
CAP_FILES_XATTR: Final = "files-xattr"

#: GetXattr, ListXattr: read a target path's extended attributes.
CAP_FILES_XATTR_READ: Final = "files-xattr-read"

#: Linux's limits (linux/limits.h), checked by the agent with the kernel's errno.
PATH_MAX: Final = 4096
XATTR_NAME_MAX: Final = 255
XATTR_SIZE_MAX: Final = 65536
#: setxattr(2) flags.
XATTR_CREATE: Final = 1
XATTR_REPLACE: Final = 2


class _Message(msgspec.Struct, array_like=True, tag_field="tag", forbid_unknown_fields=False):
    """Base of every message: encoded as ``[tag, fields...]``.

    (``tag_field`` only names the tag for map encodings, which are not used; it
    is set so that a field may be called ``type``.)
    """


# --- handshake -----------------------------------------------------------------


class AgentHello(_Message, tag="agent-hello"):
    """The agent's first frame: what it speaks and the challenge to answer."""

    version: int
    min_version: int
    capabilities: list[str]
    nonce: bytes
    target_pid: int | None = None
    #: What this connection may carry, by preference (protocol 2); an older agent: plain.
    channels: list[str] = msgspec.field(default_factory=lambda: [CHANNEL_PLAIN])
    # The target's hostname (its UTS namespace's), for feature.hostname. (v2)
    hostname: str | None = None


class ClientHello(_Message, tag="client-hello"):
    """The client's first frame: its version and the answer to the challenge."""

    version: int
    capabilities: list[str]
    nonce: bytes
    proof: bytes
    #: One of the agent's ``channels`` (protocol 2); an older client: plain.
    channel: str = CHANNEL_PLAIN


class Welcome(_Message, tag="welcome"):
    """The handshake succeeded; ``proof`` shows the agent knows the secret too."""

    version: int
    proof: bytes


class Goodbye(_Message, tag="goodbye"):
    """The agent is closing this connection (``code``: one of ``GOODBYE_*``)."""

    code: str
    message: str


GOODBYE_VERSION: Final = "version"
GOODBYE_AUTHENTICATION: Final = "authentication"
GOODBYE_PROTOCOL: Final = "protocol"
GOODBYE_SHUTDOWN: Final = "shutdown"
#: The target process exited: its files and namespaces are gone (protocol 2).
GOODBYE_TARGET_EXITED: Final = "target-exited"
GOODBYE_CHANNEL: Final = "channel"  # the client chose a channel this agent does not offer


# --- operations (the body of a Request) ------------------------------------------
# Paths are bytes (Linux paths need not be UTF-8) and resolve under the target's
# root; a relative path is relative to that root.


class Ping(_Message, tag="ping"):
    data: bytes = b""


class Stat(_Message, tag="stat"):
    path: bytes
    follow_symlinks: bool = True


class Access(_Message, tag="access"):
    path: bytes
    mode: int  # os.F_OK or a mask of os.R_OK / W_OK / X_OK


class ReadFile(_Message, tag="read-file"):
    """A whole file (at most ``limit`` bytes, else EFBIG) and its stat, one round trip."""

    path: bytes
    limit: int = MAX_WHOLE_FILE_SIZE


class Open(_Message, tag="open"):
    path: bytes
    flags: int = 0  # os.O_* (access mode, O_CREAT, O_EXCL, O_TRUNC, O_APPEND, ...)
    mode: int = 0o666  # what a created file gets: the caller applied its umask


class Read(_Message, tag="read"):
    handle: int
    size: int
    offset: int | None = None  # None: from the current position


class Close(_Message, tag="close"):
    handle: int


class ReadDir(_Message, tag="readdir"):
    path: bytes


class ReadLink(_Message, tag="readlink"):
    path: bytes


class GetEnviron(_Message, tag="environ"):
    pass


class Resolve(_Message, tag="resolve"):
    """Name resolution as the target does it (its hosts file, then its DNS)."""

    name: str
    family: int = 0  # socket.AF_INET, AF_INET6 or AF_UNSPEC (both)


class TcpConnect(_Message, tag="tcp-connect"):
    """Open a TCP stream from the target's network namespace.

    ``stream`` is chosen by the client (unique per connection, never reused);
    ``window`` is how many bytes the agent may send before the client grants more.
    """

    stream: int
    host: str
    port: int
    timeout: float = 30.0
    window: int = DEFAULT_WINDOW


class UnixConnect(_Message, tag="unix-connect"):
    """Open a stream to the target's Unix socket ``path`` (absolute, as the
    target names it, resolved under its root; ``\\0name`` for an abstract
    socket of its network namespace). Answered with ``TcpConnected`` (hosts are
    the path, ports 0); the stream then works as a TCP one. (v2, ``unix-stream``)
    """

    stream: int
    path: bytes
    timeout: float = 30.0
    window: int = DEFAULT_WINDOW


class UdpOpen(_Message, tag="udp-open"):
    """Open a UDP socket in the target's network namespace (``socket`` chosen by the client)."""

    socket: int
    family: int  # socket.AF_INET or AF_INET6
    bind_host: str | None = None
    bind_port: int = 0


class UdpSend(_Message, tag="udp-send"):
    socket: int
    host: str
    port: int
    data: bytes


class UdpClose(_Message, tag="udp-close"):
    socket: int


class Write(_Message, tag="write"):
    handle: int
    data: bytes
    offset: int | None = None


class Truncate(_Message, tag="truncate"):
    path: bytes
    length: int


class MakeDir(_Message, tag="mkdir"):
    path: bytes
    mode: int = 0o777  # what the directory gets: the caller applied its umask


class Unlink(_Message, tag="unlink"):
    path: bytes
    directory: bool = False  # rmdir instead of unlink


class Rename(_Message, tag="rename"):
    source: bytes
    destination: bytes


class UploadBegin(_Message, tag="upload-begin"):
    """Start replacing the regular file ``path`` whole (protocol 2).

    The agent makes an unnamed temporary file in the same directory and answers
    ``Opened`` with its handle; ``Write`` fills it; ``UploadCommit`` makes it
    the file atomically. ``Close`` (or a lost connection) before the commit
    discards it: the target never sees a half-written file.
    """

    path: bytes


class UploadCommit(_Message, tag="upload-commit"):
    """fsync the upload, give it the file's current mode and owner, rename it
    over the file, close the handle; answers the new ``FileStat``."""

    handle: int


class ChangeMode(_Message, tag="chmod"):
    """chmod(2) of ``path`` (symlinks followed, under the target's root);
    capability ``files-chmod``."""

    path: bytes
    mode: int


class StatFs(_Message, tag="statfs"):
    """statfs(2) of ``path`` (symlinks followed, under the target's root): the
    filesystem it is on, as :class:`FsStat`; capability ``files-statfs``."""

    path: bytes


class ChangeOwner(_Message, tag="chown"):
    """chown(2) of ``path`` (``follow``: symlinks followed, else lchown), under
    the target's root; ``-1`` leaves that id as it is; capability ``files-chown``."""

    path: bytes
    uid: int
    gid: int
    follow: bool


#: A time for :class:`SetTimes`: nanoseconds since the epoch, ``"now"`` (the
#: target's clock) or ``None`` (leave it as it is: utimensat's UTIME_OMIT).
TimeSpec = int | Literal["now"] | None


class SetTimes(_Message, tag="set-times"):
    """utimensat(2) of ``path`` (``follow``: symlinks followed), under the
    target's root; capability ``files-times``."""

    path: bytes
    atime: TimeSpec
    mtime: TimeSpec
    follow: bool


class Link(_Message, tag="link"):
    """link(2): ``destination`` becomes another name of ``source`` (``follow``:
    a symlink ``source`` is followed, linkat's AT_SYMLINK_FOLLOW), both under
    the target's root; capability ``files-links``."""

    source: bytes
    destination: bytes
    follow: bool = False


class Symlink(_Message, tag="symlink"):
    """symlink(2): a symlink named ``path`` (under the target's root) whose
    contents are ``target``, stored as they are (never resolved); capability
    ``files-links``."""

    target: bytes
    path: bytes


class MakeNode(_Message, tag="mknod"):
    """mknod(2) of ``path`` under the target's root: ``mode`` is the file type
    (S_IFIFO, S_IFREG, S_IFCHR, ...) and the permission bits the node gets
    (the caller's umask already applied), ``device`` the st_rdev of a device
    node; capability ``files-links``."""

    path: bytes
    mode: int
    device: int = 0


class SetXattr(_Message, tag="set-xattr"):
    """setxattr(2) (``follow``; else lsetxattr) of ``path`` under the target's
    root; ``flags``: XATTR_CREATE, XATTR_REPLACE; capability ``files-xattr``."""

    path: bytes
    name: bytes
    value: bytes
    flags: int
    follow: bool


class RemoveXattr(_Message, tag="remove-xattr"):
    """removexattr(2) (``follow``; else lremovexattr) of ``path`` under the
    target's root; capability ``files-xattr``."""

    path: bytes
    name: bytes
    follow: bool


class GetXattr(_Message, tag="get-xattr"):
    """getxattr(2) (``follow``; else lgetxattr) of ``path`` under the target's
    root: answered with :class:`XattrValue`; capability ``files-xattr-read``."""

    path: bytes
    name: bytes
    follow: bool


class ListXattr(_Message, tag="list-xattr"):
    """listxattr(2) (``follow``; else llistxattr) of ``path`` under the target's
    root: answered with :class:`XattrNames`; capability ``files-xattr-read``."""

    path: bytes
    follow: bool


class HttpRequestFilter(_Message, tag="http-filter"):
    """Which HTTP requests a filtered steal takes: Python regular expressions
    (``re.search``) on each ``Name: value`` header line, the request target and
    the method; ``all_of``/``any_of`` nest; ``ports``: only filter there."""

    header: str | None = None
    path: str | None = None
    method: str | None = None
    all_of: list[HttpRequestFilter] | None = None
    any_of: list[HttpRequestFilter] | None = None
    ports: list[int] | None = None


class IncomingSubscribe(_Message, tag="incoming-subscribe"):
    """Version 2: deliver connections to the target's ``port`` to the client
    (``IncomingConnection`` events): ``mode`` is "steal" (the client answers
    instead of the target) or "mirror" (a copy of the bytes the target
    receives; the client's answers are dropped). ``http_filter`` (steal only):
    only matching HTTP requests go to the client."""

    port: int
    mode: str
    http_filter: HttpRequestFilter | None = None


class IncomingUnsubscribe(_Message, tag="incoming-unsubscribe"):
    """Version 2: stop taking the port; the target's process gets it back at once."""

    port: int


Operation = (
    Ping
    | Stat
    | Access
    | ReadFile
    | Open
    | Read
    | Close
    | ReadDir
    | ReadLink
    | GetEnviron
    | Resolve
    | TcpConnect
    | UdpOpen
    | UdpSend
    | UdpClose
    | Write
    | Truncate
    | MakeDir
    | Unlink
    | Rename
    | UploadBegin
    | UploadCommit
    | UnixConnect
    | IncomingSubscribe
    | IncomingUnsubscribe
    | ChangeMode
    | StatFs
    | ChangeOwner
    | SetTimes
    | Link
    | Symlink
    | MakeNode
    | SetXattr
    | RemoveXattr
    | GetXattr
    | ListXattr
)

#: Operations that change the target's files: refused with EROFS unless the
#: agent runs with --write.
WRITE_OPERATIONS: Final = (Write, Truncate, MakeDir, Unlink, Rename, UploadBegin, UploadCommit,
                           ChangeMode, ChangeOwner, SetTimes, Link, Symlink, MakeNode, SetXattr,
                           RemoveXattr)


# --- results (the body of a Response) ---------------------------------------------


class Error(_Message, tag="error"):
    """A failed operation: ``errno`` is the real error in the target's context."""

    errno: int
    message: str


class Done(_Message, tag="done"):
    """Success with nothing to return."""


class Pong(_Message, tag="pong"):
    data: bytes = b""


class FileStat(_Message, tag="file-stat"):
    mode: int
    ino: int
    dev: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    blksize: int
    blocks: int
    rdev: int


class FileContents(_Message, tag="file-contents"):
    stat: FileStat
    data: bytes


class Opened(_Message, tag="opened"):
    handle: int
    stat: FileStat


class Data(_Message, tag="data"):
    data: bytes
    eof: bool  # fewer bytes than asked for: nothing more to read now


class DirEntry(_Message, tag="dirent"):
    name: bytes
    type: int  # a DT_* value, as getdents64 reports it
    ino: int


class DirEntries(_Message, tag="dirents"):
    entries: list[DirEntry]


class LinkTarget(_Message, tag="link-target"):
    target: bytes


class Environ(_Message, tag="environ-vars"):
    """The target's environment, in order, as raw ``(name, value)`` pairs."""

    variables: list[tuple[bytes, bytes]]


class Addresses(_Message, tag="addresses"):
    addresses: list[str]  # IP literals, IPv4 first when both were asked for
    canonical_name: str


class TcpConnected(_Message, tag="tcp-connected"):
    """The stream is open; ``window`` is what the client may send before more credit."""

    stream: int
    local_host: str
    local_port: int
    peer_host: str
    peer_port: int
    window: int


class UdpOpened(_Message, tag="udp-opened"):
    socket: int
    local_host: str
    local_port: int


class Sent(_Message, tag="sent"):
    size: int


class IncomingSubscribed(_Message, tag="incoming-subscribed"):
    """``target_listening``: something in the target listens on the port (a
    mirror of a port nobody listens on sees nothing)."""

    port: int
    target_listening: bool


class FsStat(_Message, tag="fs-stat"):
    """``struct statfs`` fields (statfs(2)); ``fsid`` is ``f_fsid`` as two
    32-bit words, ``flags`` the ``ST_*`` mount flags."""

    type: int
    bsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    fsid: tuple[int, int]
    namelen: int
    frsize: int
    flags: int


class XattrValue(_Message, tag="xattr-value"):
    value: bytes


class XattrNames(_Message, tag="xattr-names"):
    """Attribute names in the order the filesystem lists them."""

    names: list[bytes]


Result = (
    Error
    | Done
    | Pong
    | FileStat
    | FileContents
    | Opened
    | Data
    | DirEntries
    | LinkTarget
    | Environ
    | Addresses
    | TcpConnected
    | UdpOpened
    | Sent
    | IncomingSubscribed
    | FsStat
    | XattrValue
    | XattrNames
)


# --- envelopes and stream events ----------------------------------------------------


class Request(_Message, tag="req"):
    id: int
    operation: Operation


class Response(_Message, tag="res"):
    id: int
    result: Result


class StreamData(_Message, tag="stream-data"):
    """Bytes on a TCP stream, either way; counts against the receiver's window."""

    stream: int
    data: bytes


class StreamCredit(_Message, tag="stream-credit"):
    """The receiver consumed ``size`` more bytes: the sender may send that many more."""

    stream: int
    size: int


class StreamShutdown(_Message, tag="stream-shutdown"):
    """Client -> agent: no more data from the client (shutdown(SHUT_WR) on the target socket)."""

    stream: int


class StreamClose(_Message, tag="stream-close"):
    """Client -> agent: forget the stream and close its socket."""

    stream: int


class StreamEof(_Message, tag="stream-eof"):
    """Agent -> client: the remote peer will send nothing more."""

    stream: int


class StreamReset(_Message, tag="stream-reset"):
    """Agent -> client: the stream failed (errno, e.g. ECONNRESET) and is gone."""

    stream: int
    errno: int
    message: str


class Datagram(_Message, tag="datagram"):
    """Agent -> client: a datagram received on a UDP socket, with its source."""

    socket: int
    host: str
    port: int
    data: bytes


class IncomingConnection(_Message, tag="incoming-connection"):
    """Agent -> client (version 2): a connection to a subscribed port, now a
    stream (``stream`` chosen by the agent, from :data:`AGENT_STREAM_BASE` up).
    ``peer_*`` is the real remote peer, ``local_*`` the address it reached in
    the target. A mirror stream carries a copy of what the peer sent; what the
    client writes to it is dropped.

    Windows (version 3): ``window`` is what the client may send before more
    credit; the agent may send :data:`INCOMING_INITIAL_CREDIT`, and more as
    the client grants it (its first ``StreamCredit`` adds the rest of its
    receive window). Version 2: both are :data:`DEFAULT_WINDOW` from the start."""

    stream: int
    port: int
    peer_host: str
    peer_port: int
    local_host: str
    local_port: int
    mirror: bool = False
    window: int = DEFAULT_WINDOW


#: Stream ids the agent picks for incoming connections start here (the client's
#: own ids count up from 1, so the two never meet).
AGENT_STREAM_BASE: Final = 1 << 48

ToAgent = ClientHello | Request | StreamData | StreamCredit | StreamShutdown | StreamClose
FromAgent = (
    AgentHello
    | Welcome
    | Goodbye
    | Response
    | StreamData
    | StreamCredit
    | StreamEof
    | StreamReset
    | Datagram
    | IncomingConnection
)


# --- authentication -----------------------------------------------------------------


def client_proof(secret: bytes, agent_nonce: bytes, client_nonce: bytes) -> bytes:
    """What the client sends to prove it knows the secret."""
    return hmac.new(secret, b"mtrace-client\0" + agent_nonce + client_nonce, hashlib.sha256).digest()


def agent_proof(secret: bytes, agent_nonce: bytes, client_nonce: bytes) -> bytes:
    """What the agent sends back to prove it knows the secret too."""
    return hmac.new(secret, b"mtrace-agent\0" + client_nonce + agent_nonce, hashlib.sha256).digest()


def proofs_match(expected: bytes, received: bytes) -> bool:
    return hmac.compare_digest(expected, received)


# --- framing --------------------------------------------------------------------------


class FrameEncoder:
    """Encodes messages as length-prefixed frames (one encoder, reused)."""

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self.max_frame_size = max_frame_size

    def encode(self, message: msgspec.Struct) -> bytearray:
        # A fresh buffer per frame: transports may keep a reference to what they
        # were given until it is sent.
        frame = bytearray(LENGTH_PREFIX)
        self._encoder.encode_into(message, frame, LENGTH_PREFIX)
        size = len(frame) - LENGTH_PREFIX
        if size > self.max_frame_size:
            raise ProtocolError(f"refusing to send a {size}-byte frame (maximum {self.max_frame_size})")
        frame[:LENGTH_PREFIX] = size.to_bytes(LENGTH_PREFIX, "big")
        return frame


def frame_length(prefix: bytes, max_frame_size: int) -> int:
    """The body length announced by a 4-byte prefix, checked against the limit."""
    size = int.from_bytes(prefix, "big")
    if size > max_frame_size:
        raise ProtocolError(f"frame of {size} bytes exceeds the maximum of {max_frame_size}")
    return size


# msgspec raises UnicodeDecodeError (a ValueError), not DecodeError, for a str
# that is not UTF-8, and RecursionError for arrays nested too deeply (a peer's
# garbage, never a bug of ours).
_DECODE_ERRORS = (msgspec.DecodeError, ValueError, RecursionError)


# Each decoder is built once, at its first use rather than at import: building
# one resolves every message type it can meet (2-4 ms), and each side of a
# connection needs only one of them (the client never decodes ToAgent).
@functools.cache
def _to_agent_decoder() -> msgspec.msgpack.Decoder[ToAgent]:
    return msgspec.msgpack.Decoder(ToAgent)


@functools.cache
def _from_agent_decoder() -> msgspec.msgpack.Decoder[FromAgent]:
    return msgspec.msgpack.Decoder(FromAgent)


def build_decoders() -> None:
    """Build both decoders now: the resident mtrace does, once for every run it forks."""
    _to_agent_decoder()
    _from_agent_decoder()


def decode_to_agent(body: bytes | memoryview) -> ToAgent:
    try:
        return _to_agent_decoder().decode(body)
    except _DECODE_ERRORS as error:
        raise ProtocolError(f"malformed frame: {error}") from None


def decode_from_agent(body: bytes | memoryview) -> FromAgent:
    try:
        return _from_agent_decoder().decode(body)
    except _DECODE_ERRORS as error:
        raise ProtocolError(f"malformed frame: {error}") from None


def salvage_request(body: bytes | memoryview) -> tuple[int, object] | None:
    """``(request id, operation tag)`` of a frame that failed to decode, if it is a Request.

    Lets the agent answer an unknown operation (from a newer client) or a
    malformed one with an error for that request, instead of dropping the
    whole connection.
    """
    try:
        raw = msgspec.msgpack.decode(body)
    except _DECODE_ERRORS:
        return None
    if not (isinstance(raw, list) and len(raw) >= 2 and raw[0] == "req"):
        return None
    request_id = raw[1]
    if not isinstance(request_id, int) or isinstance(request_id, bool) or request_id < 0:
        return None
    operation = raw[2] if len(raw) > 2 else None
    tag = operation[0] if isinstance(operation, list) and operation else None
    return request_id, tag

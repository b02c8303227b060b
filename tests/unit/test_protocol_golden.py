# ruff: noqa: E501  (golden frames are long hex strings)
"""Golden bytes: the exact frame of every message type.

If one of these fails, the wire format changed. Read the compatibility rules at
the top of ``mtrace.agent.protocol``: an existing golden may only grow by the
encoded default of a field added at the end; a new field value or a new
message gets a NEW golden entry.
"""

from __future__ import annotations

from typing import get_args

import pytest

import mtrace.agent.protocol as p

STAT = p.FileStat(
    mode=0o100644,
    ino=1234,
    dev=2049,
    nlink=1,
    uid=0,
    gid=0,
    size=5,
    atime_ns=1_700_000_000_000_000_001,
    mtime_ns=1_700_000_000_000_000_002,
    ctime_ns=1_700_000_000_000_000_003,
    blksize=4096,
    blocks=8,
    rdev=0,
)

SAMPLES = {
    "agent-hello": p.AgentHello(
        version=1, min_version=1, capabilities=["files", "tcp"], nonce=b"\x01" * 4, target_pid=42
    ),
    "agent-hello-channels": p.AgentHello(
        version=2,
        min_version=1,
        capabilities=["files"],
        nonce=b"\x01" * 4,
        target_pid=None,
        channels=["chacha20-poly1305", "plain"],
    ),
    "agent-hello-hostname": p.AgentHello(
        version=2, min_version=1, capabilities=[], nonce=b"\x01" * 4, target_pid=7,
        hostname="web-1",
    ),
    "client-hello": p.ClientHello(version=1, capabilities=[], nonce=b"\x02" * 4, proof=b"\x03" * 4),
    "client-hello-channel": p.ClientHello(
        version=2, capabilities=[], nonce=b"\x02" * 4, proof=b"\x03" * 4, channel="chacha20-poly1305"
    ),
    "welcome": p.Welcome(version=1, proof=b"\x04" * 4),
    "goodbye": p.Goodbye(code="authentication", message="wrong secret"),
    "goodbye-channel": p.Goodbye(code="channel", message="plain is not offered"),
    "ping": p.Request(id=1, operation=p.Ping(data=b"hi")),
    "stat": p.Request(id=2, operation=p.Stat(path=b"/etc/hosts", follow_symlinks=False)),
    "access": p.Request(id=3, operation=p.Access(path=b"/bin/sh", mode=5)),
    "read-file": p.Request(id=4, operation=p.ReadFile(path=b"/etc/resolv.conf", limit=4096)),
    "open": p.Request(id=5, operation=p.Open(path=b"/tmp/x", flags=0o101, mode=0o644)),
    "read": p.Request(id=6, operation=p.Read(handle=7, size=65536, offset=None)),
    "close": p.Request(id=7, operation=p.Close(handle=7)),
    "readdir": p.Request(id=8, operation=p.ReadDir(path=b"/")),
    "readlink": p.Request(id=9, operation=p.ReadLink(path=b"/proc/self/exe")),
    "environ": p.Request(id=10, operation=p.GetEnviron()),
    "resolve": p.Request(id=11, operation=p.Resolve(name="example.test", family=2)),
    "tcp-connect": p.Request(
        id=12,
        operation=p.TcpConnect(stream=3, host="127.0.0.1", port=80, timeout=2.5, window=65536),
    ),
    "udp-open": p.Request(id=13, operation=p.UdpOpen(socket=4, family=10, bind_host=None, bind_port=0)),
    "udp-send": p.Request(id=14, operation=p.UdpSend(socket=4, host="::1", port=53, data=b"q")),
    "udp-close": p.Request(id=15, operation=p.UdpClose(socket=4)),
    "write": p.Request(id=16, operation=p.Write(handle=7, data=b"abc", offset=10)),
    "truncate": p.Request(id=17, operation=p.Truncate(path=b"/tmp/x", length=0)),
    "mkdir": p.Request(id=18, operation=p.MakeDir(path=b"/tmp/d", mode=0o755)),
    "unlink": p.Request(id=19, operation=p.Unlink(path=b"/tmp/d", directory=True)),
    "rename": p.Request(id=20, operation=p.Rename(source=b"/tmp/a", destination=b"/tmp/b")),
    "upload-begin": p.Request(id=21, operation=p.UploadBegin(path=b"/tmp/x")),
    "upload-commit": p.Request(id=22, operation=p.UploadCommit(handle=7)),
    "unix-connect": p.Request(
        id=23, operation=p.UnixConnect(stream=5, path=b"/run/app.sock", timeout=2.5, window=65536),
    ),
    "error": p.Response(id=1, result=p.Error(errno=2, message="No such file or directory")),
    "done": p.Response(id=2, result=p.Done()),
    "pong": p.Response(id=3, result=p.Pong(data=b"hi")),
    "file-stat": p.Response(id=4, result=STAT),
    "file-contents": p.Response(id=5, result=p.FileContents(stat=STAT, data=b"x")),
    "opened": p.Response(id=6, result=p.Opened(handle=7, stat=STAT)),
    "data": p.Response(id=7, result=p.Data(data=b"abc", eof=True)),
    "dirents": p.Response(id=8, result=p.DirEntries(entries=[p.DirEntry(name=b"etc", type=4, ino=12)])),
    "link-target": p.Response(id=9, result=p.LinkTarget(target=b"../lib")),
    "environ-vars": p.Response(id=10, result=p.Environ(variables=[(b"FOO", b"bar")])),
    "addresses": p.Response(
        id=11, result=p.Addresses(addresses=["10.0.0.1", "fd00::1"], canonical_name="a.test")
    ),
    "tcp-connected": p.Response(
        id=12,
        result=p.TcpConnected(
            stream=3,
            local_host="127.0.0.1",
            local_port=40000,
            peer_host="127.0.0.1",
            peer_port=80,
            window=65536,
        ),
    ),
    "udp-opened": p.Response(id=13, result=p.UdpOpened(socket=4, local_host="::", local_port=5353)),
    "sent": p.Response(id=14, result=p.Sent(size=3)),
    "stream-data": p.StreamData(stream=3, data=b"payload"),
    "stream-credit": p.StreamCredit(stream=3, size=7),
    "stream-shutdown": p.StreamShutdown(stream=3),
    "stream-close": p.StreamClose(stream=3),
    "stream-eof": p.StreamEof(stream=3),
    "stream-reset": p.StreamReset(stream=3, errno=104, message="Connection reset by peer"),
    "datagram": p.Datagram(socket=4, host="10.0.0.53", port=53, data=b"r"),
    # version 2: incoming traffic
    "incoming-subscribe": p.Request(id=21, operation=p.IncomingSubscribe(port=80, mode="steal")),
    "incoming-subscribe-filtered": p.Request(id=22, operation=p.IncomingSubscribe(
        port=80, mode="steal", http_filter=p.HttpRequestFilter(
            header="^x: 1$", any_of=[p.HttpRequestFilter(path="^/a"), p.HttpRequestFilter(method="GET")],
            ports=[80]))),
    "incoming-unsubscribe": p.Request(id=23, operation=p.IncomingUnsubscribe(port=80)),
    "incoming-subscribed": p.Response(id=21, result=p.IncomingSubscribed(port=80, target_listening=True)),
    "incoming-connection": p.IncomingConnection(
        stream=1 << 48, port=80, peer_host="10.0.0.2", peer_port=40000, local_host="10.0.0.1",
        local_port=80, mirror=True),
    # protocol 3: the window the agent grants the client on an incoming stream
    "incoming-connection-window": p.IncomingConnection(
        stream=1 << 48, port=80, peer_host="10.0.0.2", peer_port=40000, local_host="10.0.0.1",
        local_port=80, window=65536),
    "chmod": p.Request(id=24, operation=p.ChangeMode(path=b"/tmp/x", mode=0o755)),
    "statfs": p.Request(id=25, operation=p.StatFs(path=b"/tmp/x")),
    "chown": p.Request(id=26, operation=p.ChangeOwner(path=b"/tmp/x", uid=1000, gid=-1,
                                                      follow=False)),
    "set-times": p.Request(id=27, operation=p.SetTimes(
        path=b"/tmp/x", atime="now", mtime=1_700_000_000_000_000_002, follow=True)),
    "set-times-omit": p.Request(id=28, operation=p.SetTimes(
        path=b"/tmp/x", atime=None, mtime="now", follow=False)),
    "link": p.Request(id=29, operation=p.Link(source=b"/tmp/x", destination=b"/tmp/y",
                                              follow=True)),
    "symlink": p.Request(id=30, operation=p.Symlink(target=b"../x", path=b"/tmp/y")),
    "mknod": p.Request(id=31, operation=p.MakeNode(path=b"/tmp/p", mode=0o10644, device=0)),
    "set-xattr": p.Request(id=32, operation=p.SetXattr(
        path=b"/tmp/x", name=b"user.k", value=b"v", flags=p.XATTR_CREATE, follow=False)),
    "remove-xattr": p.Request(id=33, operation=p.RemoveXattr(path=b"/tmp/x", name=b"user.k",
                                                             follow=True)),
    "get-xattr": p.Request(id=34, operation=p.GetXattr(path=b"/tmp/x", name=b"user.k",
                                                       follow=False)),
    "list-xattr": p.Request(id=35, operation=p.ListXattr(path=b"/tmp/x", follow=True)),
    "xattr-value": p.Response(id=34, result=p.XattrValue(value=b"v")),
    "xattr-names": p.Response(id=35, result=p.XattrNames(names=[b"user.k",
                                                                b"security.selinux"])),
    "fs-stat": p.Response(id=25, result=p.FsStat(
        type=0x01021994, bsize=4096, blocks=1000, bfree=900, bavail=800, files=500, ffree=400,
        fsid=(1, 2), namelen=255, frsize=4096, flags=0x20)),
}

GOLDEN = {
    # protocol 2: grown by the default channels (["plain"]) and hostname (None) at the end
    "agent-hello": "0000002998ab6167656e742d68656c6c6f010192a566696c6573a3746370c404010101012a91a5706c61696ec0",
    "agent-hello-channels": "0000003798ab6167656e742d68656c6c6f020191a566696c6573c40401010101c092b163686163686132302d706f6c7931333035a5706c61696ec0",
    # protocol 2: grown by the default channel ("plain") at the end
    "client-hello": "0000002296ac636c69656e742d68656c6c6f0190c40402020202c40403030303a5706c61696e",
    "client-hello-channel": "0000002e96ac636c69656e742d68656c6c6f0290c40402020202c40403030303b163686163686132302d706f6c7931333035",
    "agent-hello-hostname": "0000002498ab6167656e742d68656c6c6f020190c404010101010791a5706c61696ea57765622d31",
    "welcome": "0000001093a777656c636f6d6501c40404040404",
    "goodbye": "0000002593a7676f6f64627965ae61757468656e7469636174696f6eac77726f6e6720736563726574",
    "goodbye-channel": "0000002693a7676f6f64627965a76368616e6e656cb4706c61696e206973206e6f74206f666665726564",
    "ping": "0000001093a37265710192a470696e67c4026869",
    "stat": "0000001993a37265710293a473746174c40a2f6574632f686f737473c2",
    "access": "0000001893a37265710393a6616363657373c4072f62696e2f736805",
    "read-file": "0000002693a37265710493a9726561642d66696c65c4102f6574632f7265736f6c762e636f6e66cd1000",
    "open": "0000001893a37265710594a46f70656ec4062f746d702f7841cd01a4",
    "read": "0000001393a37265710694a47265616407ce00010000c0",
    "close": "0000000e93a37265710792a5636c6f736507",
    "readdir": "0000001293a37265710892a772656164646972c4012f",
    "readlink": "0000002093a37265710992a8726561646c696e6bc40e2f70726f632f73656c662f657865",
    "environ": "0000000f93a37265710a91a7656e7669726f6e",
    "resolve": "0000001d93a37265710b93a77265736f6c7665ac6578616d706c652e7465737402",
    "tcp-connect": "0000002d93a37265710c96ab7463702d636f6e6e65637403a93132372e302e302e3150cb4004000000000000ce00010000",
    "udp-open": "0000001493a37265710d95a87564702d6f70656e040ac000",
    "udp-send": "0000001993a37265710e95a87564702d73656e6404a33a3a3135c40171",
    "udp-close": "0000001293a37265710f92a97564702d636c6f736504",
    "write": "0000001493a37265711094a5777269746507c4036162630a",
    "truncate": "0000001993a37265711193a87472756e63617465c4062f746d702f7800",
    "mkdir": "0000001893a37265711293a56d6b646972c4062f746d702f64cd01ed",
    "unlink": "0000001793a37265711393a6756e6c696e6bc4062f746d702f64c3",
    "rename": "0000001e93a37265711493a672656e616d65c4062f746d702f61c4062f746d702f62",
    "upload-begin": "0000001c93a37265711592ac75706c6f61642d626567696ec4062f746d702f78",
    "upload-commit": "0000001693a37265711692ad75706c6f61642d636f6d6d697407",
    "unix-connect": "0000003293a37265711795ac756e69782d636f6e6e65637405c40d2f72756e2f6170702e736f636bcb4004000000000000ce00010000",
    "error": "0000002893a37265730193a56572726f7202b94e6f20737563682066696c65206f72206469726563746f7279",
    "done": "0000000c93a37265730291a4646f6e65",
    "pong": "0000001093a37265730392a4706f6e67c4026869",
    "file-stat": "0000003e93a3726573049ea966696c652d73746174cd81a4cd04d2cd080101000005cf17979cfe362a0001cf17979cfe362a0002cf17979cfe362a0003cd10000800",
    "file-contents": "0000005093a37265730593ad66696c652d636f6e74656e74739ea966696c652d73746174cd81a4cd04d2cd080101000005cf17979cfe362a0001cf17979cfe362a0002cf17979cfe362a0003cd10000800c40178",
    "opened": "0000004793a37265730693a66f70656e6564079ea966696c652d73746174cd81a4cd04d2cd080101000005cf17979cfe362a0001cf17979cfe362a0002cf17979cfe362a0003cd10000800",
    "data": "0000001293a37265730793a464617461c403616263c3",
    "dirents": "0000001f93a37265730892a7646972656e74739194a6646972656e74c403657463040c",
    "link-target": "0000001b93a37265730992ab6c696e6b2d746172676574c4062e2e2f6c6962",
    "environ-vars": "0000002093a37265730a92ac656e7669726f6e2d766172739192c403464f4fc403626172",
    "addresses": "0000002a93a37265730b93a961646472657373657392a831302e302e302e31a7666430303a3a31a6612e74657374",
    "tcp-connected": "0000003393a37265730c97ad7463702d636f6e6e656374656403a93132372e302e302e31cd9c40a93132372e302e302e3150ce00010000",
    "udp-opened": "0000001993a37265730d94aa7564702d6f70656e656404a23a3acd14e9",
    "sent": "0000000d93a37265730e92a473656e7403",
    "stream-data": "0000001793ab73747265616d2d6461746103c4077061796c6f6164",
    "stream-credit": "0000001193ad73747265616d2d6372656469740307",
    "stream-shutdown": "0000001292af73747265616d2d73687574646f776e03",
    "stream-close": "0000000f92ac73747265616d2d636c6f736503",
    "stream-eof": "0000000d92aa73747265616d2d656f6603",
    "stream-reset": "0000002994ac73747265616d2d72657365740368b8436f6e6e656374696f6e2072657365742062792070656572",
    "datagram": "0000001995a8646174616772616d04a931302e302e302e353335c40172",
    "incoming-subscribe": "0000002293a37265711594b2696e636f6d696e672d73756273637269626550a5737465616cc0",
    "incoming-subscribe-filtered": "0000006793a37265711694b2696e636f6d696e672d73756273637269626550a5737465616c97ab687474702d66696c746572a65e783a203124c0c0c09297ab687474702d66696c746572c0a35e2f61c0c0c0c097ab687474702d66696c746572c0c0a3474554c0c0c09150",
    "incoming-unsubscribe": "0000001d93a37265711792b4696e636f6d696e672d756e73756273637269626550",
    "incoming-subscribed": "0000001d93a37265731593b3696e636f6d696e672d7375627363726962656450c3",
    # protocol 3: grown by the default window (DEFAULT_WINDOW) at the end
    "incoming-connection": "0000003b99b3696e636f6d696e672d636f6e6e656374696f6ecf000100000000000050a831302e302e302e32cd9c40a831302e302e302e3150c3ce00100000",
    "incoming-connection-window": "0000003b99b3696e636f6d696e672d636f6e6e656374696f6ecf000100000000000050a831302e302e302e32cd9c40a831302e302e302e3150c2ce00010000",
    "chmod": "0000001893a37265711893a563686d6f64c4062f746d702f78cd01ed",
    "statfs": "0000001693a37265711992a6737461746673c4062f746d702f78",
    "chown": "0000001a93a37265711a95a563686f776ec4062f746d702f78cd03e8ffc2",
    "set-times": "0000002793a37265711b95a97365742d74696d6573c4062f746d702f78a36e6f77cf17979cfe362a0002c3",
    "set-times-omit": "0000001f93a37265711c95a97365742d74696d6573c4062f746d702f78c0a36e6f77c2",
    "link": "0000001d93a37265711d94a46c696e6bc4062f746d702f78c4062f746d702f79c3",
    "symlink": "0000001d93a37265711e93a773796d6c696e6bc4042e2e2f78c4062f746d702f79",
    "mknod": "0000001993a37265711f94a56d6b6e6f64c4062f746d702f70cd11a400",
    "set-xattr": "0000002693a37265712096a97365742d7861747472c4062f746d702f78c406757365722e6bc4017601c2",
    "remove-xattr": "0000002593a37265712194ac72656d6f76652d7861747472c4062f746d702f78c406757365722e6bc3",
    "get-xattr": "0000002293a37265712294a96765742d7861747472c4062f746d702f78c406757365722e6bc2",
    "list-xattr": "0000001b93a37265712393aa6c6973742d7861747472c4062f746d702f78c3",
    "xattr-value": "0000001693a37265732292ab78617474722d76616c7565c40176",
    "xattr-names": "0000002e93a37265732392ab78617474722d6e616d657392c406757365722e6bc41073656375726974792e73656c696e7578",
    "fs-stat": "0000002f93a3726573199ca766732d73746174ce01021994cd1000cd03e8cd0384cd0320cd01f4cd0190920102ccffcd100020",
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_frame_bytes_are_unchanged(name: str) -> None:
    assert bytes(p.FrameEncoder().encode(SAMPLES[name])).hex() == GOLDEN[name]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_golden_frames_decode_to_the_same_message(name: str) -> None:
    body = bytes.fromhex(GOLDEN[name])[4:]
    message = SAMPLES[name]
    decode = p.decode_to_agent if isinstance(message, get_args(p.ToAgent)) else p.decode_from_agent
    assert decode(body) == message


def _tags(union: object) -> set[str]:
    return {kind.__struct_config__.tag for kind in get_args(union)}


def test_every_message_type_has_a_golden() -> None:
    covered: set[str] = set()
    for message in SAMPLES.values():
        covered.add(type(message).__struct_config__.tag)
        inner = getattr(message, "operation", None) or getattr(message, "result", None)
        if inner is not None:
            covered.add(type(inner).__struct_config__.tag)
    every = _tags(p.ToAgent) | _tags(p.FromAgent) | _tags(p.Operation) | _tags(p.Result)
    assert every - covered == set(), "add a golden for each new message type"


def test_tags_are_unique() -> None:
    kinds = _all_message_types(p._Message)
    tags = [kind.__struct_config__.tag for kind in kinds]
    assert len(tags) == len(set(tags))


def _all_message_types(base: type) -> list[type]:
    found: list[type] = []
    for sub in base.__subclasses__():
        found.append(sub)
        found.extend(_all_message_types(sub))
    return found


def test_a_protocol_2_incoming_connection_reads_as_the_default_window() -> None:
    # Regression guard for the compatibility rule: the version-2 frame (no window).
    body = bytes.fromhex(
        "98b3696e636f6d696e672d636f6e6e656374696f6ecf000100000000000050a831302e302e302e32cd9c40"
        "a831302e302e302e3150c3")
    message = p.decode_from_agent(body)
    assert isinstance(message, p.IncomingConnection) and message.window == p.DEFAULT_WINDOW

"""Who owns the client end of a loopback TCP connection: SO_PEERCRED's role for TCP, asked of
Linux sock_diag, so verbs kept for Exim can be checked on inet:127.0.0.1:PORT as well."""

from __future__ import annotations

import logging
import socket
import struct
from typing import Any, Protocol

log = logging.getLogger(__name__)

# linux/netlink.h. Python's socket module does not name NETLINK_SOCK_DIAG (== NETLINK_INET_DIAG).
NETLINK_SOCK_DIAG = 4
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
# struct nlmsghdr { __u32 nlmsg_len; __u16 nlmsg_type; __u16 nlmsg_flags; __u32 nlmsg_seq;
#                   __u32 nlmsg_pid; }                                   host byte order, 16 bytes
_NLMSGHDR = struct.Struct("=IHHII")
# struct nlmsgerr { int error; struct nlmsghdr msg; }: only `error` (a negative errno) matters.

# linux/sock_diag.h
SOCK_DIAG_BY_FAMILY = 20

# linux/inet_diag.h. Ports and addresses are big-endian (kept as bytes here), the rest host order.
# struct inet_diag_sockid { __be16 idiag_sport; __be16 idiag_dport; __be32 idiag_src[4];
#     __be32 idiag_dst[4]; __u32 idiag_if; __u32 idiag_cookie[2]; }                    48 bytes
# struct inet_diag_req_v2 { __u8 sdiag_family; __u8 sdiag_protocol; __u8 idiag_ext; __u8 pad;
#     __u32 idiag_states; struct inet_diag_sockid id; }                                56 bytes
_REQ_V2 = struct.Struct("=BBBxI2s2s16s16sIII")
# struct inet_diag_msg { __u8 idiag_family; __u8 idiag_state; __u8 idiag_timer;
#     __u8 idiag_retrans; struct inet_diag_sockid id; __u32 idiag_expires; __u32 idiag_rqueue;
#     __u32 idiag_wqueue; __u32 idiag_uid; __u32 idiag_inode; }                        72 bytes
# Only the tail is read: idiag_uid and idiag_inode, at offsets 64 and 68.
_MSG_UID_INODE = struct.Struct("=II")
_MSG_UID_OFFSET = 64
_MSG_SIZE = 72
INET_DIAG_NOCOOKIE = 0xFFFFFFFF  # both cookie words: match by address (a set cookie must match)
_ALL_STATES = 0xFFFFFFFF

# The kernel answers an exact (non-dump) request inside send(), so recv() finds the reply
# already queued; the timeout only bounds a kernel that misbehaves. One call is one netlink
# socket, one send and one recv: 30-50 us measured on the development machine (Linux 6.18,
# Python 3.11.7, as root and as nobody), most of it the netlink socket's open and close.
# That is cheap and bounded enough to run inline on the event loop, without a thread.
TIMEOUT = 0.5
_RECV_SIZE = 8192  # one inet_diag_msg plus a few attributes is about 120 bytes


class SocketLike(Protocol):
    """What is read of the accepted socket: socket.socket, asyncio's TransportSocket and
    uvloop's PseudoSocket (transport.get_extra_info("socket")) all have it."""

    @property
    def family(self) -> int: ...
    @property
    def type(self) -> int: ...
    def getpeername(self) -> Any: ...
    def getsockname(self) -> Any: ...


_V4_MAPPED = bytes(10) + b"\xff\xff"
_V6_LOOPBACK = bytes(15) + b"\x01"


def _packed(host: str) -> bytes:
    """4 bytes for IPv4 (IPv4-mapped IPv6 included), 16 for IPv6; inet_pton, as ipaddress
    costs ~10 us a call here. Raises OSError for anything else."""
    if ":" not in host:
        return socket.inet_pton(socket.AF_INET, host)
    packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; their sockets are IPv4 ones.
    return packed[12:] if packed.startswith(_V4_MAPPED) else packed


def build_request(peer: tuple[str, int], local: tuple[str, int], seq: int = 1) -> bytes | None:
    """The netlink request for the client's own socket, given our getpeername()/getsockname()
    (host, port). None when the peer is not loopback: then no socket of this host is its end."""
    try:
        peer_ip, local_ip = _packed(peer[0]), _packed(local[0])
    except OSError:
        return None
    if len(peer_ip) != len(local_ip):
        return None
    loopback = peer_ip[0] == 127 if len(peer_ip) == 4 else peer_ip == _V6_LOOPBACK
    if not loopback:
        return None
    family = socket.AF_INET if len(peer_ip) == 4 else socket.AF_INET6
    # The client's socket seen from its side: its source is our peer, its destination is us.
    body = _REQ_V2.pack(
        family, socket.IPPROTO_TCP, 0, _ALL_STATES,
        peer[1].to_bytes(2, "big"), local[1].to_bytes(2, "big"),
        peer_ip.ljust(16, b"\0"), local_ip.ljust(16, b"\0"),
        0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE,
    )
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST,
                            seq, 0)
    return header + body


def parse_reply(data: bytes, seq: int = 1) -> int | None:
    """idiag_uid from the kernel's answer to build_request(seq=seq); None when it names no
    socket (NLMSG_ERROR such as ENOENT, NLMSG_DONE, nothing) or no live one owns it."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            return None
        body = offset + _NLMSGHDR.size
        if msg_seq == seq:
            if kind in (NLMSG_ERROR, NLMSG_DONE):
                return None
            if kind == SOCK_DIAG_BY_FAMILY and length - _NLMSGHDR.size >= _MSG_SIZE:
                uid, inode = _MSG_UID_INODE.unpack_from(data, body + _MSG_UID_OFFSET)
                # inode 0: no struct socket behind it (TIME_WAIT or closed, orphaned socket).
                # TIME_WAIT entries report uid 0, which must not read as root.
                return None if inode == 0 else int(uid)
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return None


def tcp_peer_uid(sock: SocketLike) -> int | None:
    """The uid owning the client socket of an accepted loopback TCP connection (its creator,
    as SO_PEERCRED gives); None if the peer is not loopback, the kernel knows no such live
    socket, or on any OSError. Never raises for those; blocks at most TIMEOUT seconds."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return None
    try:
        request = build_request(sock.getpeername()[:2], sock.getsockname()[:2])
    except OSError:  # ENOTCONN: the client is already gone
        return None
    if request is None:
        return None
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(TIMEOUT)
            nl.send(request)
            return parse_reply(nl.recv(_RECV_SIZE))
    except OSError as exc:
        # Under systemd this is most often RestrictAddressFamilies= without AF_NETLINK.
        log.warning("cannot ask sock_diag who owns a TCP peer: %s", exc)
        return None

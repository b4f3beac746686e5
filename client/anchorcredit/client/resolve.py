"""The concrete addresses behind one gRPC target, as gRPC's own resolver would find them.

"dns:///name:port" and plain "name:port" go through the system resolver (getaddrinfo);
"dns://server[:port]/name:port" asks that DNS server directly (UDP, A then AAAA; a
truncated answer is asked again over TCP), as gRPC's c-ares resolver does for a target
with an authority; "ipv4:a:p1,b:p2" /
"ipv6:[a]:p1,[b]:p2" list the addresses; "unix:" targets are one address.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import struct

DNS_TIMEOUT_S = 2.0
DNS_TRIES = 2
_A, _AAAA = 1, 28
_TC = 0x0200  # header flag: the answer was truncated


def split_hostport(hostport: str, default_port: str = "443") -> tuple[str, str]:
    """ "host:port", "[v6]:port" or "host" (gRPC's default port 443)."""
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        return host, rest.removeprefix(":") or default_port
    if hostport.count(":") > 1:  # a bare IPv6 literal
        return hostport, default_port
    host, _, port = hostport.partition(":")
    return host, port or default_port


def dns_name(target: str) -> str | None:
    """The host name a dns target resolves ("name" of "dns:///name:port"); None for IP
    literals and the ipv4:/ipv6:/unix: forms."""
    t = target.strip()
    if t.startswith(("ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")):
        return None
    if t.startswith("dns:"):
        t = t[4:].removeprefix("//").partition("/")[2] if t[4:].startswith("//") else t[4:]
    host = split_hostport(t)[0]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def expand_target(target: str) -> list[str]:
    """The concrete addresses ("ip:port", "[v6]:port") behind one target.

    A name with IPv4 addresses uses only those (a dual-stack pod has one of each: pushing to
    both would load it twice), else its IPv6 ones. OSError when a name does not resolve.
    """
    t = target.strip()
    if t.startswith(("ipv4:", "ipv6:")):
        rest = t.split(":", 1)[1].removeprefix("//")
        return [a.strip() for a in rest.split(",") if a.strip()]
    if t.startswith(("unix:", "unix-abstract:", "vsock:")):
        return [t]
    authority, rest = "", t
    if t.startswith("dns:"):
        rest = t[4:]
        if rest.startswith("//"):
            authority, _, rest = rest[2:].partition("/")
    host, port = split_hostport(rest)
    # "localhost" never goes to a DNS server (RFC 6761; c-ares answers it locally too)
    local = host.lower().rstrip(".")
    if authority and local != "localhost" and not local.endswith(".localhost"):
        v4, v6 = _ask_server(authority, host)
    else:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        v4 = list(dict.fromkeys(i[4][0] for i in infos if i[0] == socket.AF_INET))
        v6 = list(dict.fromkeys(i[4][0] for i in infos if i[0] == socket.AF_INET6))
    if v4:
        return [f"{ip}:{port}" for ip in v4]
    return [f"[{ip}]:{port}" for ip in v6]


def _ask_server(authority: str, name: str) -> tuple[list[str], list[str]]:
    """(IPv4, IPv6) addresses of `name` from the DNS server at `authority` (port 53 unless
    given). An IP literal name is returned as it is."""
    try:
        ip = ipaddress.ip_address(name)
        return ([str(ip)], []) if ip.version == 4 else ([], [str(ip)])
    except ValueError:
        pass
    server, port = split_hostport(authority, "53")
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    v4 = _query(family, (server, int(port)), name, _A)
    v6 = [] if v4 else _query(family, (server, int(port)), name, _AAAA)
    if not v4 and not v6:
        raise OSError(f"{name} has no A or AAAA record at DNS server {authority}")
    return v4, v6


def _query(family: int, server: tuple[str, int], name: str, qtype: int) -> list[str]:
    qid = random.getrandbits(16)
    qname = b"".join(bytes([len(p)]) + p.encode("idna") for p in name.rstrip(".").split("."))
    packet = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + b"\0"
    packet += struct.pack(">HH", qtype, 1)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(DNS_TIMEOUT_S)
        for _ in range(DNS_TRIES):
            sock.sendto(packet, server)
            try:
                while True:
                    data, _ = sock.recvfrom(4096)
                    if len(data) >= 12 and struct.unpack(">H", data[:2])[0] == qid:
                        break
            except TimeoutError:
                continue
            if struct.unpack(">H", data[2:4])[0] & _TC:
                # cut to what fits a datagram (~29 A records): the rest only comes over TCP
                data = _query_tcp(family, server, name, packet)
            return _answers(data, qtype, name)
    raise OSError(f"DNS server {server[0]}:{server[1]} did not answer for {name}")


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError("DNS server closed the TCP connection mid-answer")
        data += chunk
    return data


def _query_tcp(family: int, server: tuple[str, int], name: str, packet: bytes) -> bytes:
    """The same query over TCP (RFC 1035 4.2.2: each message after its 2-byte length)."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(DNS_TIMEOUT_S)
            sock.connect(server)
            sock.sendall(struct.pack(">H", len(packet)) + packet)
            (size,) = struct.unpack(">H", _recv_exactly(sock, 2))
            data = _recv_exactly(sock, size)
    except OSError as exc:
        raise OSError(
            f"DNS server {server[0]}:{server[1]} truncated the answer for {name} over UDP "
            f"and TCP failed: {exc}"
        ) from exc
    if len(data) < 12 or data[:2] != packet[:2]:
        raise OSError(f"DNS server {server[0]}:{server[1]} answered another query over TCP")
    return data


def _skip_name(data: bytes, i: int) -> int:
    while True:
        n = data[i]
        if n == 0:
            return i + 1
        if n & 0xC0 == 0xC0:  # a compression pointer ends the name
            return i + 2
        i += 1 + n


def _answers(data: bytes, qtype: int, name: str) -> list[str]:
    """The addresses of type `qtype` in a DNS response (CNAME chains: every record of that
    type in the answer section)."""
    flags, qdcount, ancount = struct.unpack(">HHH", data[2:8])
    rcode = flags & 0xF
    if rcode == 3:
        raise OSError(f"{name}: no such name (NXDOMAIN)")
    if rcode != 0:
        raise OSError(f"{name}: DNS error code {rcode}")
    i = 12
    for _ in range(qdcount):
        i = _skip_name(data, i) + 4
    family, size = (socket.AF_INET, 4) if qtype == _A else (socket.AF_INET6, 16)
    out: list[str] = []
    for _ in range(ancount):
        i = _skip_name(data, i)
        rtype, _cls, _ttl, rdlength = struct.unpack(">HHIH", data[i : i + 10])
        i += 10
        if rtype == qtype and rdlength == size:
            out.append(socket.inet_ntop(family, data[i : i + size]))
        i += rdlength
    return list(dict.fromkeys(out))

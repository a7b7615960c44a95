"""An independent WebTransport client of edgestream, on aioquic (another QUIC and HTTP/3
implementation than the server's quinn), written from PROTOCOL.md alone.

Usage: client.py URL CERT_SHA256_B64 N [--ping TEXT] [--heartbeat]
Connects (trusting exactly the certificate with that hash, as a browser's
serverCertificateHashes does), reads frames from the org streams and datagrams, and prints one
JSON line per frame: {"t":"subscribed",...}, {"t":"event",...}, {"t":"heartbeat",...},
{"t":"pong",...}. After N events it sends PING TEXT on the control stream and waits for the
PONG (--ping), and waits for a heartbeat naming every org's last seq (--heartbeat); then
prints {"t":"done"}. If the server ends the session it prints {"t":"closed",...}. Exits 0
unless the client itself failed.
"""

import asyncio
import base64
import hashlib
import json
import ssl
import sys
from urllib.parse import urlparse

from aioquic.asyncio.client import connect
from cryptography.hazmat.primitives import serialization
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection, H3Stream
from aioquic.h3.events import (
    DatagramReceived,
    DataReceived,
    HeadersReceived,
    WebTransportStreamDataReceived,
)
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StreamReset


def varint(buf, i):
    """A QUIC varint at buf[i:]: (value, next index), or None if buf is too short."""
    if i >= len(buf):
        return None
    n = 1 << (buf[i] >> 6)
    if i + n > len(buf):
        return None
    v = buf[i] & 0x3F
    for b in buf[i + 1 : i + n]:
        v = (v << 8) | b
    return v, i + n


def encode_varint(v):
    if v < 1 << 6:
        return bytes([v])
    if v < 1 << 14:
        return (v | 0x4000).to_bytes(2, "big")
    if v < 1 << 30:
        return (v | 0x80000000).to_bytes(4, "big")
    return (v | 0xC000000000000000).to_bytes(8, "big")


def string(body, i):
    n, i = varint(body, i)
    return body[i : i + n].decode(), i + n


def frames(buf):
    """Whole frames at the start of buf: ([(type, body)], bytes consumed)."""
    out, i = [], 0
    while True:
        t = varint(buf, i)
        if t is None:
            break
        n = varint(buf, t[1])
        if n is None or n[1] + n[0] > len(buf):
            break
        out.append((t[0], bytes(buf[n[1] : n[1] + n[0]])))
        i = n[1] + n[0]
    return out, i


def describe(kind, body):
    """A frame as a JSON-able dict (PROTOCOL.md section 2)."""
    if kind == 0x01:
        org, i = string(body, 0)
        epoch, i = string(body, i)
        head, i = varint(body, i)
        resume, i = varint(body, i)
        return {"t": "subscribed", "org": org, "epoch": epoch, "head": head, "resume": resume}
    if kind == 0x02:
        org, i = string(body, 0)
        seq, i = varint(body, i)
        ts, i = varint(body, i)
        flags, i = varint(body, i)
        return {"t": "event", "org": org, "seq": seq, "flags": flags,
                "payload": json.loads(body[i:]) if flags & 1 == 0 else None}
    if kind == 0x04:
        ts, i = varint(body, 0)
        count, i = varint(body, i)
        heads = {}
        for _ in range(count):
            org, i = string(body, i)
            heads[org], i = varint(body, i)
        return {"t": "heartbeat", "heads": heads}
    if kind == 0x06:
        return {"t": "pong", "body": body.decode(errors="replace")}
    return {"t": "other", "type": kind}


# Settings added to the client's own SETTINGS (--max-data: a client of drafts 13/14 with
# session-level flow control, as Safari 26.4).
EXTRA_SETTINGS = {}
WT_MAX_SESSIONS = 0x14E9CD29
WT_INITIAL_MAX_DATA = 0x2B61
WT_INITIAL_MAX_STREAMS_UNI = 0x2B64
WT_INITIAL_MAX_STREAMS_BIDI = 0x2B65
WT_MAX_DATA = 0x190B4D3D


class Http3(H3Connection):
    def _get_local_settings(self):
        settings = super()._get_local_settings()
        settings.update(EXTRA_SETTINGS)
        return settings


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = Http3(self._quic, enable_webtransport=True)
        # Payload bytes received on the server's streams (headers excluded).
        self.stream_bytes = 0
        self.session_id = None
        self.connected = asyncio.get_event_loop().create_future()
        self.items = asyncio.Queue()
        self.buffers = {}

    def open(self, url):
        u = urlparse(url)
        self.session_id = self._quic.get_next_available_stream_id()
        self.h3.send_headers(
            stream_id=self.session_id,
            headers=[
                (b":method", b"CONNECT"),
                (b":scheme", b"https"),
                (b":authority", u.netloc.encode()),
                (b":path", (u.path + "?" + u.query).encode()),
                (b":protocol", b"webtransport"),
            ],
        )
        self.transmit()

    def send_control(self, kind, body):
        """On the client's first bidirectional stream (the control stream)."""
        if not hasattr(self, "control"):
            self.control = self.h3.create_webtransport_stream(self.session_id, is_unidirectional=False)
            # aioquic marks only peer-opened bidirectional streams as WebTransport ones and
            # would parse the server's answers here as HTTP/3 frames: mark ours too.
            stream = self.h3._stream.setdefault(self.control, H3Stream(self.control))
            stream.frame_type = FrameType.WEBTRANSPORT_STREAM
            stream.session_id = self.session_id
        self._quic.send_stream_data(self.control, encode_varint(kind) + encode_varint(len(body)) + body)
        self.transmit()

    def quic_event_received(self, event):
        if isinstance(event, ConnectionTerminated):
            self.items.put_nowait({"t": "closed", "code": event.error_code, "reason": event.reason_phrase})
        for e in self.h3.handle_event(event):
            self.h3_event(e)

    def h3_event(self, e):
        if isinstance(e, HeadersReceived) and e.stream_id == self.session_id:
            status = dict(e.headers).get(b":status", b"").decode()
            if not self.connected.done():
                self.connected.set_result(status)
        elif isinstance(e, WebTransportStreamDataReceived):
            self.stream_bytes += len(e.data)
            buf = self.buffers.setdefault(e.stream_id, bytearray())
            buf.extend(e.data)
            found, used = frames(buf)
            del buf[:used]
            for kind, body in found:
                self.items.put_nowait(describe(kind, body))
        elif isinstance(e, DatagramReceived):
            found, _ = frames(e.data)
            for kind, body in found:
                self.items.put_nowait(describe(kind, body))
        elif isinstance(e, DataReceived) and e.stream_id == self.session_id:
            # Capsules (RFC 9297) on the CONNECT stream.
            buf = self.buffers.setdefault(e.stream_id, bytearray())
            buf.extend(e.data)
            while True:
                head = varint(buf, 0)
                size = head and varint(buf, head[1])
                if not size:
                    break
                typ, (n, i) = head[0], size
                if len(buf) < i + n:
                    break
                self.items.put_nowait({"t": "capsule", "type": typ, "len": n})
                del buf[: i + n]
            if e.stream_ended:
                self.items.put_nowait({"t": "closed", "code": None, "reason": "CONNECT stream ended"})

    def send_capsule(self, typ, payload):
        """A capsule on the CONNECT stream, in an HTTP/3 DATA frame."""
        self.h3.send_data(self.session_id, encode_varint(typ) + encode_varint(len(payload)) + payload, False)
        self.transmit()


async def main(url, cert_hash, want, ping, heartbeat, max_data):
    expected = base64.b64decode(cert_hash)
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, max_datagram_frame_size=65536)
    config.verify_mode = ssl.CERT_NONE  # the hash is checked below, as a browser would
    u = urlparse(url)
    async with connect(u.hostname, u.port, configuration=config, create_protocol=Client) as client:
        peer = client._quic.tls._peer_certificate
        der = peer.public_bytes(serialization.Encoding.DER)
        if hashlib.sha256(der).digest() != expected:
            print(json.dumps({"t": "error", "error": "certificate hash mismatch"}), flush=True)
            return 1
        client.open(url)
        status = await asyncio.wait_for(client.connected, 10)
        print(json.dumps({"t": "connected", "status": status}), flush=True)
        settings = client.h3.received_settings or {}
        print(json.dumps({"t": "settings", "settings": {str(k): v for k, v in settings.items()}}), flush=True)
        events, last = 0, {}
        pinged, beat = ping is None, not heartbeat
        refilled = max_data is None
        while events < want or not pinged or not beat:
            try:
                item = await asyncio.wait_for(client.items.get(), 1.5 if not refilled else 20)
            except asyncio.TimeoutError:
                if refilled:
                    raise
                # Nothing for 1.5 s within our session-level window: raise it, as a client
                # whose window refills would.
                print(json.dumps({"t": "stalled", "bytes": client.stream_bytes, "events": events}), flush=True)
                client.send_capsule(WT_MAX_DATA, encode_varint(1 << 30))
                refilled = True
                continue
            print(json.dumps(item), flush=True)
            if item["t"] == "closed":
                return 0
            if item["t"] == "event":
                events += 1
                last[item["org"]] = item["seq"]
                if events == want and ping is not None:
                    client.send_control(0x13, ping.encode())
            if item["t"] == "pong":
                pinged = True
            if item["t"] == "heartbeat" and events >= want:
                beat = beat or all(item["heads"].get(o, -1) >= s for o, s in last.items())
        print(json.dumps({"t": "done"}), flush=True)
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    url, cert_hash, n = args[0], args[1], int(args[2])
    ping = args[args.index("--ping") + 1] if "--ping" in args else None
    max_data = int(args[args.index("--max-data") + 1]) if "--max-data" in args else None
    if max_data is not None:
        EXTRA_SETTINGS.update({
            WT_MAX_SESSIONS: 1,
            WT_INITIAL_MAX_DATA: max_data,
            WT_INITIAL_MAX_STREAMS_UNI: 4,
            WT_INITIAL_MAX_STREAMS_BIDI: 4,
        })
    sys.exit(asyncio.run(main(url, cert_hash, n, ping, "--heartbeat" in args, max_data)))

"""A hand-rolled Kafka producer, for tests only: it exists to make record batches that no normal
client would make (a compressed payload that cannot be decompressed, a codec id no client knows),
so the tests can see what a consumer does when it reaches one. Real clients validate what they
send, so such a batch can only be built byte by byte. Pure Python, no dependencies.

Tansu decompresses every produced batch to validate it, and refuses garbage and unknown codecs
(87, INVALID_RECORD). What gets through is an LZ4 frame with bytes after its end mark, which
librdkafka refuses (_BAD_MSG, "Decompression (codec 0x3) ... failed"). Only the memory storage
engine serves it back as sent; the SQL engines store records and re-compress them on fetch:

    broker = kafray.EmbeddedBroker("memory")
    produce_raw_batch(broker.bootstrap, "frames", 0, [b"a", b"b"], codec=LZ4, corrupt="trailing")

Wire formats: https://kafka.apache.org/documentation/#recordbatch and the Produce API (v3, the
first version that carries magic-2 batches; later versions add nothing needed here).
"""
from __future__ import annotations

import gzip
import socket
import struct
import time

NONE, GZIP, SNAPPY, LZ4, ZSTD = range(5)  # attributes bits 0-2; 5..7 are unassigned

# CRC-32C (Castagnoli, reflected 0x82F63B78): magic-2 batches use it, not zlib's CRC-32.
_CRC32C = []
for _n in range(256):
    for _ in range(8):
        _n = (_n >> 1) ^ 0x82F63B78 if _n & 1 else _n >> 1
    _CRC32C.append(_n)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)  # zigzag, so -1 (a null key) is one byte
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _record(offset_delta: int, value: bytes) -> bytes:
    # attributes 0, timestamp delta 0, null key, value, no headers
    body = b"\0" + _varint(0) + _varint(offset_delta) + _varint(-1) + _varint(len(value)) + value + _varint(0)
    return _varint(len(body)) + body


def lz4_frame(data: bytes) -> bytes:
    """An LZ4 frame holding `data` in stored (uncompressed) blocks: valid for any LZ4 reader,
    and it needs no LZ4 compressor."""
    # Frame header: version 1, independent blocks, no checksums, 64 KiB blocks; 0x82 is the
    # xxh32-derived header checksum of exactly these two descriptor bytes (0x60 0x40).
    out = bytearray(b"\x04\x22\x4d\x18\x60\x40\x82")
    for i in range(0, len(data), 65536):
        block = data[i:i + 65536]
        out += struct.pack("<I", len(block) | 0x80000000) + block  # high bit: stored block
    return bytes(out + b"\0\0\0\0")  # end mark


def _garbage(n: int) -> bytes:
    # Not the magic of any codec's stream, so every decompressor refuses it from the first byte.
    return (b"\xde\xad\xbe\xef" * (n // 4 + 4))[: max(n, 16)]


def record_batch(values: list[bytes], codec: int = NONE, corrupt: bool | str = False) -> bytes:
    """One magic-2 RecordBatch (base offset 0: the broker assigns the real one) holding `values`.

    `codec` NONE, GZIP and LZ4 are encoded for real; any other id (SNAPPY, ZSTD, 5..7) is put
    on the uncompressed records, which is only useful with `corrupt`. `corrupt`:
      False       a correct batch.
      True        the payload is garbage no decompressor accepts ("garbage").
      "trailing"  a correct compressed stream followed by garbage. A broker that validates
                  batches by decompressing them (Tansu) accepts it, as its decoders stop at
                  the stream's end. librdkafka refuses it for LZ4 (it insists on using every
                  byte) but not for GZIP (zlib stops at the end too: it is consumed fine).
    The batch CRC is always right, so only decompression can fail."""
    records = b"".join(_record(i, v) for i, v in enumerate(values))
    if corrupt is True or corrupt == "garbage":
        payload = _garbage(len(records))
    else:
        payload = {GZIP: lambda r: gzip.compress(r, mtime=0), LZ4: lz4_frame}.get(codec, bytes)(records)
        if corrupt == "trailing":
            payload += _garbage(16)
        elif corrupt:
            raise ValueError(f"unknown corruption {corrupt!r}")
    now = int(time.time() * 1000)
    # Everything from attributes on is what the CRC covers.
    tail = struct.pack(">hiqqqhii", codec & 0x07, len(values) - 1, now, now, -1, -1, -1, len(values)) + payload
    after_length = struct.pack(">ibI", -1, 2, crc32c(tail)) + tail  # leader epoch, magic, crc
    return struct.pack(">qi", 0, len(after_length)) + after_length


def _str(s: str | None) -> bytes:
    if s is None:
        return struct.pack(">h", -1)
    b = s.encode()
    return struct.pack(">h", len(b)) + b


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection (it may have rejected the request)")
        buf += chunk
    return bytes(buf)


def send_batch(bootstrap: str, topic: str, partition: int, batch: bytes, timeout: float = 10.0) -> int:
    """Produces an already-encoded batch (acks=-1) and returns the base offset the broker gave it.
    The bootstrap broker must lead the partition: fine for a single-broker test cluster."""
    host, port = bootstrap.split(",")[0].rsplit(":", 1)
    correlation = 1
    header = struct.pack(">hhi", 0, 3, correlation) + _str("kafray-rawkafka")  # Produce v3
    body = (_str(None) + struct.pack(">hi", -1, int(timeout * 1000))  # no transaction, acks=-1
            + struct.pack(">i", 1) + _str(topic)
            + struct.pack(">i", 1) + struct.pack(">ii", partition, len(batch)) + batch)
    request = header + body
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(request)) + request)
        size, = struct.unpack(">i", _recv_exact(sock, 4))
        resp = _recv_exact(sock, size)
    got_corr, n_topics = struct.unpack_from(">ii", resp, 0)
    assert got_corr == correlation and n_topics == 1, (got_corr, n_topics)
    name_len, = struct.unpack_from(">h", resp, 8)
    pos = 10 + name_len
    n_parts, index, error, base_offset = struct.unpack_from(">iihq", resp, pos)
    if error:
        raise RuntimeError(f"broker rejected the batch for {topic}[{index}]: Kafka error code {error}")
    return base_offset


def produce_raw_batch(bootstrap: str, topic: str, partition: int, values: list[bytes], *,
                      codec: int = GZIP, corrupt: bool | str = False) -> int:
    """Produces one batch of `values` to topic[partition] and returns its base offset; see
    record_batch for `codec` and `corrupt`. Raises RuntimeError with the Kafka error code when
    the broker refuses the batch (Tansu: 87 INVALID_RECORD for garbage or an unknown codec)."""
    return send_batch(bootstrap, topic, partition, record_batch(values, codec, corrupt))

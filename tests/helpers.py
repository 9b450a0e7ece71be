"""Plain helper functions shared by several test modules (fixtures are in conftest.py)."""

import struct
import zlib

from vlmlab.model.sequence import IGNORE_INDEX


def png_header_only(path, width, height):
    """A PNG whose header claims width x height: what a decompression bomb looks like before decoding."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def supervised_text(tokenizer, enc):
    """The text of the tokens an encoded conversation trains on (label not ignored)."""
    return tokenizer.decode([t for t, lab in zip(enc.ids, enc.labels) if lab != IGNORE_INDEX])

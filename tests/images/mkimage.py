#!/usr/bin/env python3
"""Build a raw test image from a layout spec (the same logical disk can then
be turned into other formats with qemu-img convert).

    mkimage.py OUT "64k:A 64k:- 32k:0 4k:@ff"

Each item is SIZE:KIND, laid out in order:
    A..Z  data: the byte pattern 'A'.. repeated, with the offset of every 512-byte
          block written in its first 8 bytes (so misplaced blocks show)
    -     a hole (never written)
    0     written zeros (allocated)
    @XX   the byte XX (hex) repeated
SIZE takes k/M/G suffixes.  The file's length is the sum of the sizes.
"""
import struct
import sys

UNITS = {'': 1, 'k': 1 << 10, 'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}


def parse_size(s):
    num = s.rstrip('kKMG')
    return int(num) * UNITS[s[len(num):]]


def block_pattern(kind, off, n):
    out = bytearray()
    while len(out) < n:
        blk = bytearray(kind.encode() * 512)
        blk[:8] = struct.pack('<Q', off + len(out))
        out += blk
    return bytes(out[:n])


def build(path, spec):
    off = 0
    with open(path, 'wb') as f:
        for item in spec.split():
            size_s, kind = item.split(':', 1)
            n = parse_size(size_s)
            if kind == '-':
                pass
            elif kind == '0':
                f.seek(off)
                f.write(b'\0' * n)
            elif kind.startswith('@'):
                f.seek(off)
                f.write(bytes([int(kind[1:], 16)]) * n)
            elif len(kind) == 1 and kind.isupper():
                f.seek(off)
                f.write(block_pattern(kind, off, n))
            else:
                raise SystemExit('mkimage: bad item %r' % item)
            off += n
        f.truncate(off)


if __name__ == '__main__':
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    build(sys.argv[1], sys.argv[2])

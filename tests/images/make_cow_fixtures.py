#!/usr/bin/env python3
"""Build the UML cow fixtures byte by byte from the published layouts
(Linux arch/um/drivers/cow_user.c; QEMU <= 2.1 block/cow.c), the hostile cow
and qcow v1 fixtures, and the fuzz seeds.

    make_cow_fixtures.py [OUTDIR]      (default: the folder of this script)

Every layout fixture holds the same 32 KiB disk: sectors 0, 1, 9, 30..37 and
63 written (each filled with its sector number + 0x40, first 8 bytes the
sector's byte offset, little-endian), everything else unwritten (reads as
zeros: the fixtures name no backing file, so they open anywhere).  The
expected disk is written as cow-expected.raw, so a reader can be checked
with `cmp` after converting a fixture to raw.
"""
import os
import struct
import sys

MAGIC = 0x4F4F4F4D
SIZE = 32 * 1024
WRITTEN = [0, 1, 9] + list(range(30, 38)) + [63]
# v1/v2 size their bitmap one byte short for 35 sectors (Linux's rounding
# bug); the bits of sectors 32..34 still live in the byte after it
ROUNDBUG_SIZE = 35 * 512
ROUNDBUG_WRITTEN = [0, 33, 34]


def sector_data(s):
    blk = bytearray([0x40 + (s & 0x3F)] * 512)
    blk[:8] = struct.pack('<Q', s * 512)
    return bytes(blk)


def expected_disk(size=SIZE, written=WRITTEN):
    out = bytearray(size)
    for s in written:
        out[s * 512:(s + 1) * 512] = sector_data(s)
    return bytes(out)


def bitmap(size, written):
    bm = bytearray((size // 512 + 7) // 8)  # every bit, also past a short v1/v2 length
    for s in written:
        bm[s // 8] |= 1 << (s % 8)
    return bytes(bm)


def round_up(x, a):
    return (x + a - 1) // a * a


def assemble(header, bitmap_off, data_off, size=SIZE, written=WRITTEN, full=True):
    """header bytes, then the bitmap at bitmap_off, the data at data_off."""
    bm = bitmap(size, written)
    out = bytearray(header)
    out += bytes(max(0, bitmap_off - len(out)))
    out[bitmap_off:bitmap_off + len(bm)] = bm
    end = data_off + (size if full else max(s + 1 for s in written) * 512)
    out += bytes(max(0, end - len(out)))
    for s in written:
        out[data_off + s * 512:data_off + (s + 1) * 512] = sector_data(s)
    return bytes(out)


def name_field(name, n):
    b = name.encode()
    assert len(b) < n
    return b + bytes(n - len(b))


# ---- each layout -----------------------------------------------------------

def v1(little_endian=True, name='', size=SIZE, sectorsize=512, mtime=0):
    e = '<' if little_endian else '>'
    hdr = struct.pack(e + 'ii', MAGIC, 1) + name_field(name, 256) + \
        struct.pack(e + 'IQi', mtime, size, sectorsize)
    assert len(hdr) == 280
    # Linux's v1/v2 bitmap length (with its rounding bug) and data offset
    blen = (size + sectorsize - 1) // (8 * sectorsize)
    return hdr, 280, round_up(280 + blen, sectorsize)


def v2_linux(name='', size=SIZE, sectorsize=512, mtime=0):
    hdr = struct.pack('>II', MAGIC, 2) + name_field(name, 4096) + \
        struct.pack('>IQi', mtime, size, sectorsize)
    assert len(hdr) == 4120
    blen = (size + sectorsize - 1) // (8 * sectorsize)
    return hdr, 4120, round_up(4120 + blen, sectorsize)


def v2_qemu(bits64=True, name='', size=SIZE, mtime=0):
    hdr = struct.pack('>II', MAGIC, 2) + name_field(name, 1024) + struct.pack('>i', mtime)
    if bits64:
        hdr += bytes(4)            # u64 alignment on x86-64
    hdr += struct.pack('>QI', size, 512)
    if bits64:
        hdr += bytes(4)            # struct padded to 8
    assert len(hdr) == (1056 if bits64 else 1048)
    blen = (size // 512 + 7) // 8
    return hdr, len(hdr), round_up(len(hdr) + blen, 512)


def v3(name='', size=SIZE, alignment=4096, mtime=0, cow_format=0, sectorsize=512):
    hdr = struct.pack('>IIIQIII', MAGIC, 3, mtime, size, sectorsize, alignment, cow_format) + \
        name_field(name, 4096)
    assert len(hdr) == 4128
    boff = round_up(4128, alignment)
    blen = ((size + 511) // 512 + 7) // 8
    return hdr, boff, round_up(boff + blen, alignment)


def v3_broken(name='', size=SIZE, alignment=4096, mtime=0):
    hdr = struct.pack('>IIIIQIII', MAGIC, 3, mtime, 0, size, 512, alignment, 0) + \
        name_field(name, 4096) + bytes(4)
    assert len(hdr) == 4136
    boff = round_up(4136, alignment)
    blen = ((size + 511) // 512 + 7) // 8
    return hdr, boff, round_up(boff + blen, alignment)


LAYOUTS = {
    'cow-v1-le.cow': lambda: v1(True),
    'cow-v1-be.cow': lambda: v1(False),
    'cow-v2-linux.cow': lambda: v2_linux(),
    'cow-v2-qemu64.cow': lambda: v2_qemu(True),
    'cow-v2-qemu32.cow': lambda: v2_qemu(False),
    'cow-v3.cow': lambda: v3(),
    'cow-v3-align512.cow': lambda: v3(alignment=512),
    'cow-v3-broken.cow': lambda: v3_broken(),
}


# ---- hostile files: each breaks one rule -------------------------------------

def hostile_cow():
    out = {}
    h, b, d = v3(alignment=0 or 4096)
    h = bytearray(h)
    struct.pack_into('>I', h, 24, 0)
    out['cow-v3-align0.cow'] = bytes(h) + bytes(8192)
    h, b, d = v3(cow_format=1)
    out['cow-v3-format1.cow'] = assemble(h, b, d)
    h, b, d = v3(sectorsize=1000)
    out['cow-v3-sectorsize.cow'] = bytes(h) + bytes(8192)
    h, b, d = v3(size=1 << 62)
    out['cow-v3-huge.cow'] = bytes(h) + bytes(4096)
    h, b, d = v3(size=100)
    out['cow-v3-tiny.cow'] = bytes(h) + bytes(4096)
    h, b, d = v3(name='/x')
    h = bytearray(h)
    h[32:32 + 4096] = b'/' * 4096          # path without its NUL
    out['cow-v3-noterm.cow'] = bytes(h) + bytes(4096)
    out['cow-version9.cow'] = struct.pack('>II', MAGIC, 9) + bytes(4200)
    out['cow-short.cow'] = struct.pack('>II', MAGIC, 3)
    # version 2 that fits no layout
    out['cow-v2-neither.cow'] = struct.pack('>II', MAGIC, 2) + bytes(4200)
    # version 2 valid as Linux's layout and as QEMU's (64-bit) at once
    h = bytearray(v2_linux()[0])
    struct.pack_into('>IIQI', h, 1032, 0, 0, SIZE, 512)   # QEMU fields in the path area
    out['cow-v2-ambiguous.cow'] = bytes(h) + bytes(8192)
    # Linux's short v1/v2 bitmap length ending exactly on a sector: the last
    # sector's bit would share a byte with the data
    out['cow-v2-bitmap-overlap.cow'] = v2_linux(size=3905 * 512)[0] + bytes(1024)
    # a v3 file cut right after its header (UML sizes it over the data area)
    out['cow-v3-truncated.cow'] = v3()[0]
    # (a version 3 header cannot fit both of its layouts: the standard one
    # needs 0 at offset 28, where the broken one keeps a non-zero alignment)
    return out


def qcow_header(size=1 << 20, cluster_bits=12, l2_bits=9, crypt=0, version=1,
                backing_off=0, backing_len=0, l1_off=48):
    return struct.pack('>IIQIIQBBHIQ', 0x514649FB, version, backing_off, backing_len, 0,
                       size, cluster_bits, l2_bits, 0, crypt, l1_off)


def hostile_qcow():
    pad = bytes(512)
    return {
        'qcow-cluster-bits-8.qcow': qcow_header(cluster_bits=8) + pad,
        'qcow-cluster-bits-17.qcow': qcow_header(cluster_bits=17) + pad,
        'qcow-l2-bits-5.qcow': qcow_header(l2_bits=5) + pad,
        'qcow-l2-bits-14.qcow': qcow_header(l2_bits=14) + pad,
        'qcow-size-1.qcow': qcow_header(size=1) + pad,
        'qcow-size-overflow.qcow': qcow_header(size=(1 << 64) - 512) + pad,
        'qcow-l1-too-large.qcow': qcow_header(size=1 << 62, cluster_bits=9, l2_bits=6) + pad,
        'qcow-backing-too-long.qcow': qcow_header(backing_off=48, backing_len=1024) + pad,
        'qcow-crypt-2.qcow': qcow_header(crypt=2) + pad,
        'qcow-encrypted.qcow': qcow_header(crypt=1) + pad,
        'qcow-version-2.qcow': qcow_header(version=2) + pad,
        # an L2 entry pointing at an unaligned cluster: open works, reading fails
        'qcow-unaligned-cluster.qcow': qcow_header(l1_off=48) +
            struct.pack('>Q', 512) + bytes(456) + struct.pack('>Q', 4097) + bytes(4096 - 8),
        # an L2 entry pointing past the end of the file
        'qcow-cluster-past-eof.qcow': qcow_header(l1_off=48) +
            struct.pack('>Q', 512) + bytes(456) + struct.pack('>Q', 1 << 40) + bytes(4096 - 8),
        # an L1 entry pointing at an impossible L2 table offset
        'qcow-l2-offset-huge.qcow': qcow_header(l1_off=48) +
            struct.pack('>Q', 0xFFFFFFFFFFFFF000) + bytes(456),
        # a compressed entry whose data lies past the end of the file
        'qcow-compressed-past-eof.qcow': qcow_header(l1_off=48) +
            struct.pack('>Q', 512) + bytes(456) +
            struct.pack('>Q', (1 << 63) | (100 << 51) | (1 << 30)) + bytes(4088),
        # a compressed entry whose data does not inflate
        'qcow-bad-compressed.qcow': qcow_header(l1_off=48) +
            struct.pack('>Q', 512) + bytes(456) +
            struct.pack('>Q', (1 << 63) | (100 << 51) | 4608) + bytes(4088) + b'\xff' * 512,
    }


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    outdir = sys.argv[1] if len(sys.argv) > 1 else here
    hostile = os.path.join(outdir, 'hostile')
    os.makedirs(hostile, exist_ok=True)
    for name, make in LAYOUTS.items():
        hdr, boff, doff = make()
        with open(os.path.join(outdir, name), 'wb') as f:
            f.write(assemble(hdr, boff, doff))
    with open(os.path.join(outdir, 'cow-expected.raw'), 'wb') as f:
        f.write(expected_disk())
    hdr, boff, doff = v2_linux(size=ROUNDBUG_SIZE)
    with open(os.path.join(outdir, 'cow-v2-linux-roundbug.cow'), 'wb') as f:
        f.write(assemble(hdr, boff, doff, ROUNDBUG_SIZE, ROUNDBUG_WRITTEN))
    with open(os.path.join(outdir, 'cow-v2-linux-roundbug.raw'), 'wb') as f:
        f.write(expected_disk(ROUNDBUG_SIZE, ROUNDBUG_WRITTEN))
    for name, data in list(hostile_cow().items()) + list(hostile_qcow().items()):
        with open(os.path.join(hostile, name), 'wb') as f:
            f.write(data)


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""Build the vmdk fixtures under tests/images/ (and hostile/) from the format
description (VMware "Virtual Disk Format" 1.1/5.0 and the reference digest),
not from any tool's output, so they test vimg against the spec:

    tests/images/make_vmdk_fixtures.py [OUTDIR]

Good fixtures (vmdk-*): VMware's own streamOptimized layout (grain markers,
grain tables and directory after the data, footer and end-of-stream marker at
the end, header GD offset = GD_AT_END), an ESX "COWD" sparse extent behind a
vmfsSparse descriptor, a seSparse extent, descriptors with CRLF line ends and
RDONLY/NOACCESS/ZERO extents, a vmfs descriptor, a zero-size monolithicSparse.
Hostile fixtures (hostile/vmdk-*): each breaks one bound a reader must
enforce.  Data grains hold the mkimage.py pattern: a letter repeated with the
guest offset of each 512-byte block in its first 8 bytes.
"""
import os
import struct
import sys
import zlib

SECTOR = 512
GD_AT_END = 0xffffffffffffffff


def pattern(letter, off, n):
    out = bytearray()
    while len(out) < n:
        blk = bytearray(letter.encode() * 512)
        blk[:8] = struct.pack('<Q', off + len(out))
        out += blk
    return bytes(out[:n])


def header(capacity, grain=128, gtes=512, desc_off=1, desc_size=20, rgd=0, gd=0,
           overhead=128, version=1, flags=0x3, compress=0, magic=b'KDMV'):
    h = bytearray(512)
    h[0:4] = magic
    struct.pack_into('<IIQQQQIQQQ', h, 4, version, flags, capacity, grain, desc_off,
                     desc_size, gtes, rgd, gd, overhead)
    h[72] = 0
    h[73:77] = b'\n \r\n'
    struct.pack_into('<H', h, 77, compress)
    return bytes(h)


def descriptor(create_type, extents, cid=0x12345678, parent=0xffffffff, hint=None, nl='\n'):
    lines = ['# Disk DescriptorFile', 'version=1', 'CID=%x' % cid, 'parentCID=%x' % parent,
             'createType="%s"' % create_type]
    if hint is not None:
        lines.append('parentFileNameHint="%s"' % hint)
    lines += ['', '# Extent description'] + extents + ['', '# The Disk Data Base', '#DDB', '',
              'ddb.virtualHWVersion = "4"', 'ddb.adapterType = "ide"']
    return (nl.join(lines) + nl).encode()


def pad(b, n=SECTOR):
    return b + bytes(-len(b) % n)


def marker(val, mtype):
    return struct.pack('<QII', val, 0, mtype) + bytes(496)


def vmware_stream(capacity_bytes, grains, name, grain=65536, gtes=512, bad=None):
    """grains: {guest offset: bytes}; written in guest order, each GT after its
    grains, as VMware's exporter does."""
    cap = capacity_bytes // SECTOR
    gsec = grain // SECTOR
    l1 = -(-cap // (gsec * gtes))
    desc = pad(descriptor('streamOptimized', ['RW %d SPARSE "%s"' % (cap, name)]))
    desc = desc + bytes(20 * SECTOR - len(desc))
    hdr = header(cap, grain=gsec, gtes=gtes, gd=GD_AT_END, overhead=128, version=3,
                 flags=0x30001, compress=1)
    out = bytearray(hdr + desc)
    out += bytes(128 * SECTOR - len(out))
    gd = [0] * l1
    gts = {}
    for off in sorted(grains):
        data = grains[off]
        comp = zlib.compress(data)
        size = len(comp) if bad != 'marker-size' else 3 * grain
        rec = struct.pack('<QI', off // SECTOR, size) + comp
        gi, ti = divmod(off // grain, gtes)
        gts.setdefault(gi, [0] * gtes)[ti] = len(out) // SECTOR
        out += pad(rec)
    for gi in sorted(gts):
        gt_secs = -(-gtes * 4 // SECTOR)
        out += marker(gt_secs, 1)
        gd[gi] = len(out) // SECTOR
        out += pad(struct.pack('<%dI' % gtes, *gts[gi]))
    gd_secs = -(-l1 * 4 // SECTOR)
    out += marker(gd_secs, 2)
    gd_sector = len(out) // SECTOR
    out += pad(struct.pack('<%dI' % l1, *gd))
    out += marker(1, 3)
    foot = header(cap, grain=gsec, gtes=gtes, gd=gd_sector, overhead=128, version=3,
                  flags=0x30001, compress=1)
    if bad == 'footer':
        foot = b'XXXX' + foot[4:]
    out += foot
    out += bytes(SECTOR)   # end-of-stream marker
    return bytes(out)


def sparse(capacity_bytes, grains, name, grain_sectors=128, gtes=512, flags=0x3, version=1,
           gd_missing=(), embed=True, **over):
    """A hosted sparse extent with the GD/GTs up front; grains {offset: bytes}.
    GD entries listed in gd_missing are left 0 (a GT VMware never wrote)."""
    cap = capacity_bytes // SECTOR
    grain = grain_sectors * SECTOR
    l1 = max(1, -(-cap // (grain_sectors * gtes)))
    gt_secs = -(-gtes * 4 // SECTOR)
    gd_secs = -(-l1 * 4 // SECTOR)
    gd_off = 21
    gt_base = gd_off + gd_secs
    overhead = gt_base + gt_secs * l1
    overhead = -(-overhead // grain_sectors) * grain_sectors
    gd = [0 if i in gd_missing else gt_base + i * gt_secs for i in range(l1)]
    gts = [[0] * gtes for _ in range(l1)]
    body = bytearray()
    for off in sorted(grains):
        gi, ti = divmod(off // grain, gtes)
        gts[gi][ti] = overhead + len(body) // SECTOR
        body += grains[off] + bytes(grain - len(grains[off]))
    args = dict(grain=grain_sectors, gtes=gtes, gd=gd_off, rgd=0, overhead=overhead,
                flags=flags & ~0x2, version=version)
    args.update(over)
    out = bytearray(header(cap, **args))
    if embed:
        out += pad(descriptor('monolithicSparse', ['RW %d SPARSE "%s"' % (cap, name)]))
    out += bytes(gd_off * SECTOR - len(out))
    out += pad(struct.pack('<%dI' % l1, *gd))
    for gi in range(l1):
        out += pad(struct.pack('<%dI' % gtes, *gts[gi]))
    out += bytes(overhead * SECTOR - len(out))
    out += body
    return bytes(out)


def cowd(capacity_bytes, grains, grain_sectors=16, gd_entries=None):
    cap = capacity_bytes // SECTOR
    grain = grain_sectors * SECTOR
    gtes = 4096
    l1 = gd_entries if gd_entries is not None else max(1, -(-cap // max(1, grain_sectors * gtes)))
    gd_off = 4
    gt_base = gd_off + -(-l1 * 4 // SECTOR)
    gt_secs = gtes * 4 // SECTOR
    first = gt_base + l1 * gt_secs
    h = bytearray(2048)
    h[0:4] = b'COWD'
    struct.pack_into('<IIIIIIII', h, 4, 1, 3, cap, grain_sectors, gd_off, l1, first, 0)
    gts = [[0] * gtes for _ in range(l1)]
    body = bytearray()
    for off in sorted(grains):
        gi, ti = divmod(off // grain, gtes)
        gts[gi][ti] = first + len(body) // SECTOR
        body += grains[off] + bytes(grain - len(grains[off]))
    out = bytearray(h)
    out += pad(struct.pack('<%dI' % l1, *[gt_base + i * gt_secs for i in range(l1)]))
    for gi in range(l1):
        out += struct.pack('<%dI' % gtes, *gts[gi])
    out += body
    return bytes(out)


def sesparse(capacity_bytes, grains):
    """seSparse: grain 4 KiB (8 sectors), GT of 4096 u64 entries (64 sectors)."""
    cap = capacity_bytes // SECTOR
    grain = 8 * SECTOR
    l1 = max(1, -(-cap // (8 * 4096)))
    vol_off, gd_off = 1, 2
    gd_secs = -(-l1 * 8 // SECTOR)
    gt_off = gd_off + gd_secs
    grains_off = gt_off + 64 * l1
    h = bytearray(512)
    struct.pack_into('<QQQQQQ', h, 0, 0xcafebabe, 0x0000000200000001, cap, 8, 64, 0)
    # volatile header, journal header, journal, grain dir, grain tables,
    # free bitmap, backmap, grains: offset/size pairs from byte 80
    pairs = [(vol_off, 1), (0, 0), (0, 0), (gd_off, gd_secs), (gt_off, 64 * l1), (0, 0), (0, 0),
             (grains_off, len(grains) * 8)]
    for i, (o, s) in enumerate(pairs):
        struct.pack_into('<QQ', h, 80 + 16 * i, o, s)
    vol = bytearray(512)
    struct.pack_into('<QQQQ', vol, 0, 0xcafecafe, 0, 0, 0)
    gd = [0x1000000000000000 | i for i in range(l1)]
    gts = [[0] * 4096 for _ in range(l1)]
    body = bytearray()
    for n, off in enumerate(sorted(grains)):
        gi, ti = divmod(off // grain, 4096)
        idx = n
        gts[gi][ti] = 0x3000000000000000 | ((idx & 0xfff) << 48) | (idx >> 12)
        body += grains[off] + bytes(grain - len(grains[off]))
    out = bytearray(h) + vol
    out += pad(struct.pack('<%dQ' % l1, *gd))
    for gi in range(l1):
        out += struct.pack('<4096Q', *gts[gi])
    out += body
    return bytes(out)


def write(path, data):
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    hostile = os.path.join(out, 'hostile')
    G = 65536

    # VMware stream layout: 1 MiB, grains at 0, 64K, 512K; the last grain short
    write(os.path.join(out, 'vmdk-vmware-stream.vmdk'),
          vmware_stream(1 << 20, {0: pattern('A', 0, G), G: pattern('B', G, G),
                                  8 * G: pattern('C', 8 * G, G)}, 'vmdk-vmware-stream.vmdk'))
    # two grain tables, the second range has a GT, the middle one none
    write(os.path.join(out, 'vmdk-vmware-stream-3gt.vmdk'),
          vmware_stream(96 << 20, {0: pattern('D', 0, G),
                                   (64 << 20) + G: pattern('E', (64 << 20) + G, G)},
                        'vmdk-vmware-stream-3gt.vmdk'))
    # hosted sparse whose second GT is missing (GD entry 0), as VMware makes
    write(os.path.join(out, 'vmdk-gd-hole.vmdk'),
          sparse(4 << 20, {0: pattern('F', 0, 4096)}, 'vmdk-gd-hole.vmdk', grain_sectors=8,
                 gd_missing=(1,)))
    # vmfsSparse descriptor + COWD extent (grain 8 KiB)
    write(os.path.join(out, 'vmdk-cowd.vmdk'),
          descriptor('vmfsSparse', ['RW 2048 VMFSSPARSE "vmdk-cowd-delta.vmdk"']))
    write(os.path.join(out, 'vmdk-cowd-delta.vmdk'),
          cowd(1 << 20, {0: pattern('G', 0, 8192), 64 * 1024: pattern('H', 65536, 8192)}))
    # seSparse descriptor + extent
    write(os.path.join(out, 'vmdk-sesparse.vmdk'),
          descriptor('seSparse', ['RW 2048 SESPARSE "vmdk-sesparse-delta.vmdk"']))
    write(os.path.join(out, 'vmdk-sesparse-delta.vmdk'),
          sesparse(1 << 20, {0: pattern('I', 0, 4096), 12288: pattern('J', 12288, 4096)}))
    # CRLF descriptor: a FLAT extent, then RDONLY, NOACCESS and ZERO lines
    # (qemu skips all three), then another FLAT with an offset
    write(os.path.join(out, 'vmdk-crlf.vmdk'),
          descriptor('monolithicFlat', ['RW 16 FLAT "vmdk-crlf-flat.raw" 0',
                                        'RDONLY 16 FLAT "vmdk-crlf-flat.raw" 0',
                                        'NOACCESS 16 FLAT "vmdk-crlf-flat.raw" 0',
                                        'RW 16 ZERO',
                                        'RW 8 FLAT "vmdk-crlf-flat.raw" 16'], nl='\r\n'))
    write(os.path.join(out, 'vmdk-crlf-flat.raw'), pattern('K', 0, 24 * SECTOR))
    # vmfs: a VMFS extent line has no offset field
    write(os.path.join(out, 'vmdk-vmfs.vmdk'),
          descriptor('vmfs', ['RW 32 VMFS "vmdk-vmfs-flat.raw"']))
    write(os.path.join(out, 'vmdk-vmfs-flat.raw'), pattern('L', 0, 32 * SECTOR))
    # zero-size monolithicSparse (qemu 7.2 cannot reopen it)
    write(os.path.join(out, 'vmdk-zero-size.vmdk'), sparse(0, {}, 'vmdk-zero-size.vmdk', grain_sectors=8))

    # ---- hostile: one broken bound each --------------------------------
    def hs(name, data):
        write(os.path.join(hostile, name), data)

    base = dict(capacity_bytes=1 << 20, grains={0: pattern('M', 0, G)})
    hs('vmdk-grain-too-big.vmdk', header(2048, grain=0x400000, gtes=1, gd=21, overhead=1)
       + bytes(21 * SECTOR))
    hs('vmdk-gtes-too-big.vmdk', header(2048, gtes=1024, gd=21, overhead=1) + bytes(21 * SECTOR))
    hs('vmdk-l1-entry-zero.vmdk', header(2048, gtes=0, gd=21, overhead=1) + bytes(21 * SECTOR))
    hs('vmdk-l1-too-big.vmdk', header(1 << 26, grain=1, gtes=1, gd=21, overhead=1)
       + bytes(21 * SECTOR))
    hs('vmdk-truncated.vmdk', header(2048, gd=21, overhead=1000) + bytes(21 * SECTOR))
    hs('vmdk-version4.vmdk', header(2048, gd=21, overhead=1, version=4) + bytes(21 * SECTOR))
    hs('vmdk-bad-footer.vmdk', vmware_stream(1 << 20, {0: pattern('N', 0, G)},
                                             'vmdk-bad-footer.vmdk', bad='footer'))
    hs('vmdk-gd-outside.vmdk', header(2048, gd=100000, overhead=1) + bytes(2 * SECTOR))
    hs('vmdk-gte-past-eof.vmdk', sparse(**base, name='x')[:-G])
    hs('vmdk-marker-size.vmdk', vmware_stream(1 << 20, {0: pattern('O', 0, G)},
                                              'vmdk-marker-size.vmdk', bad='marker-size'))
    hs('vmdk-cowd-grain0.vmdk',
       descriptor('vmfsSparse', ['RW 2048 VMFSSPARSE "vmdk-cowd-grain0-delta.vmdk"']))
    hs('vmdk-cowd-grain0-delta.vmdk', cowd(1 << 20, {}, grain_sectors=0, gd_entries=1))
    hs('vmdk-cowd-small-gd.vmdk',
       descriptor('vmfsSparse', ['RW 65536 VMFSSPARSE "vmdk-cowd-small-gd-delta.vmdk"']))
    hs('vmdk-cowd-small-gd-delta.vmdk', cowd(32 << 20, {}, grain_sectors=1, gd_entries=1))
    hs('vmdk-no-extents.vmdk', descriptor('monolithicFlat', []))
    hs('vmdk-extent-outside.vmdk', descriptor('monolithicFlat', ['RW 8 FLAT "../x.raw" 0']))
    hs('vmdk-extent-absolute.vmdk', descriptor('monolithicFlat', ['RW 8 FLAT "/etc/passwd" 0']))
    hs('vmdk-extent-protocol.vmdk',
       descriptor('monolithicFlat', ['RW 8 FLAT "nbd:localhost:10809" 0']))
    hs('vmdk-hint-too-long.vmdk', pad(descriptor('monolithicFlat', ['RW 8 FLAT "vmdk-x.raw" 0'],
                                                 hint='h' * 5000)))
    hs('vmdk-bad-extent-line.vmdk', descriptor('monolithicFlat', ['RW 8 FLAT "vmdk-x.raw"']))
    hs('vmdk-bad-type.vmdk', descriptor('custom', ['RW 8 FLAT "vmdk-x.raw" 0']))
    hs('vmdk-no-cid.vmdk', descriptor('monolithicFlat', ['RW 8 FLAT "vmdk-x.raw" 0'])
       .replace(b'CID=12345678\n', b'').replace(b'parentCID=ffffffff\n', b''))
    hs('vmdk-x.raw', bytes(8 * SECTOR))


if __name__ == '__main__':
    main()

#!/usr/bin/env python3
"""Build the qcow2 test fixtures: a tiny valid image (512-byte clusters,
64 KiB virtual, one data cluster) and hostile variants that each break one
rule the driver enforces.  Deterministic; run from any directory:
    python3 tests/images/make_qcow2_fixtures.py
The expected one-line messages are asserted by tests/unit/test_qcow2_hostile.c."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CS = 512


def base(**kw):
    """Return (bytearray image, header dict) for the valid base layout:
    c0 header, c1 refcount table, c2 refcount block, c3 L1, c4 L2, c5 data."""
    h = dict(magic=0x514649FB, version=3, backing_offset=0, backing_size=0,
             cluster_bits=9, size=65536, crypt=0, l1_size=2, l1_offset=3 * CS,
             rt_offset=1 * CS, rt_clusters=1, nb_snapshots=0, snapshots_offset=0,
             incompat=0, compat=0, autoclear=0, refcount_order=4, header_length=112,
             compression=0)
    h.update(kw)
    img = bytearray(6 * CS)
    struct.pack_into(">IIQIIQIIQQIIQQQQII", img, 0, h["magic"], h["version"],
                     h["backing_offset"], h["backing_size"], h["cluster_bits"], h["size"],
                     h["crypt"], h["l1_size"], h["l1_offset"], h["rt_offset"],
                     h["rt_clusters"], h["nb_snapshots"], h["snapshots_offset"],
                     h["incompat"], h["compat"], h["autoclear"], h["refcount_order"],
                     h["header_length"])
    img[104] = h["compression"]
    struct.pack_into(">Q", img, 1 * CS, 2 * CS)
    for c in range(6):
        struct.pack_into(">H", img, 2 * CS + 2 * c, 1)
    struct.pack_into(">Q", img, 3 * CS, (4 * CS) | (1 << 63))
    struct.pack_into(">Q", img, 4 * CS, (5 * CS) | (1 << 63))
    img[5 * CS:6 * CS] = b"\x5a" * CS
    return img


def ext(img, off, typ, data):
    struct.pack_into(">II", img, off, typ, len(data))
    img[off + 8:off + 8 + len(data)] = data
    return off + 8 + ((len(data) + 7) & ~7)


def write(name, img):
    path = os.path.join(HERE, name)
    with open(path, "wb") as f:
        f.write(bytes(img))


def main():
    write("qcow2-tiny.qcow2", base())
    hostile = os.path.join("hostile", "qcow2-")
    variants = {
        "version4": base(version=4),
        "cluster-bits-8": base(cluster_bits=8),
        "cluster-bits-22": base(cluster_bits=22),
        "header-short": base(header_length=100),
        "header-exceeds-cluster": base(header_length=1024),
        "header-unaligned": base(header_length=108),
        "backing-offset": base(backing_offset=4096),
        "compression-unknown": base(header_length=112, compression=2),
        "compression-bit": base(incompat=8),
        "unknown-feature": base(incompat=1 << 9),
        "refcount-order": base(refcount_order=7),
        "no-reftable": base(rt_clusters=0),
        "reftable-too-large": base(rt_clusters=1 << 20),
        "reftable-unaligned": base(rt_offset=CS + 8),
        "reftable-past-eof": base(rt_offset=64 * CS, rt_clusters=4),
        "snapshots-too-many": base(nb_snapshots=70000, snapshots_offset=5 * CS),
        "l1-too-large": base(l1_size=(32 << 20) // 8 + 1),
        "l1-unaligned": base(l1_offset=3 * CS + 8),
        "l1-too-small": base(l1_size=1),
        "l1-past-eof": base(l1_offset=4096 * CS),
        "crypt-method-3": base(crypt=3),
        "crypt-luks-no-header": base(crypt=2),
        "crypt-aes": base(crypt=1),
        "subcluster-too-small": base(incompat=1 << 4),
        "corrupt-bit": base(incompat=2),
        "data-file-missing": base(incompat=4),
        "data-file-raw-alone": base(autoclear=2),
    }
    img = base()
    ext(img, 112, 0xE2792ACA, b"x" * 16)
    variants["backing-fmt-too-long"] = img
    img = base()
    struct.pack_into(">II", img, 112, 0x12345678, 1000)
    variants["ext-too-large"] = img
    img = base(backing_offset=400, backing_size=200)
    variants["backing-name-too-long"] = img
    # a snapshot table that runs past the end of the file
    img = base(nb_snapshots=1, snapshots_offset=5 * CS)
    struct.pack_into(">QIHHIIQII", img, 5 * CS, 3 * CS, 2, 1, 1000, 0, 0, 0, 0, 0)
    variants["snapshot-past-eof"] = img
    img = base(nb_snapshots=1, snapshots_offset=5 * CS)
    struct.pack_into(">QIHHIIQII", img, 5 * CS, 3 * CS, 2, 1, 1, 0, 0, 0, 0, 2000)
    variants["snapshot-extra-too-big"] = img
    # I/O-time faults: bad compressed data, a zero flag in a v2 image
    img = base()
    struct.pack_into(">Q", img, 4 * CS, (1 << 62) | (5 * CS))
    img[5 * CS:6 * CS] = b"\xff" * CS
    variants["compressed-garbage"] = img
    img = base(version=2, header_length=72)
    struct.pack_into(">Q", img, 4 * CS, 1)
    variants["v2-zero-flag"] = img
    for name, data in variants.items():
        write(hostile + name + ".qcow2", data)


if __name__ == "__main__":
    main()

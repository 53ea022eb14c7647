#!/usr/bin/env python3
"""Seeded inputs for bench/run.sh (Python 3 standard library only).

usage:
  gen.py [--seed N] [--scale X] --dir DIR make NAME   make input NAME in DIR
                                                      (if missing), print its path
  gen.py [--seed N] [--scale X] describe              one line per input
  gen.py [--seed N] ceilings [--mib N]                zlib / memcpy throughput lines
  gen.py names                                        the input names
  gen.py [--seed N] [--scale X] key                   cache subdir name for these
  gen.py [--seed N] sample text|random PATH [--mib N] the ceilings' data, to a file

Inputs (sizes at --scale 1; VIMG_BENCH_SCALE scales all but the 1 TiB one):
  scat.raw           8 GiB raw, about 2 GiB of data in chunks of 1-6 MiB at
                     random 64 KiB-aligned offsets: random bytes (40 %),
                     text-like lines (40 %, about 4x with zlib) and written
                     zeros (20 %: allocated in the raw file, but zero)
  scat.qcow2         scat.raw converted by the reference qemu-img
  scat-sparse.vmdk   the same as vmdk monolithicSparse
  scat-stream.vmdk   the same as vmdk streamOptimized
  chain-top.qcow2    3-deep chain: scat.qcow2 <- chain-mid.qcow2 <- chain-top.qcow2;
                     the overlays have data written over the base by qemu-io
                     (write -P at 4 KiB-aligned offsets, some write -z)
  dense.raw          2 GiB raw, non-zero data everywhere
  sparse1t.raw       1 TiB raw with 64 MiB of data in 8 places (first and
                     last MiB included); not scaled

The same seed and scale give the same bytes (the qcow2/vmdk/chain inputs are
made by the reference qemu-img/qemu-io from those bytes).  Every input is
made under a temporary name and renamed when complete, so a cache dir never
holds a half-made input.  GEN_VERSION is part of the cache key: bump it when
the bytes an input gets change.
"""

import argparse
import itertools
import os
import random
import subprocess
import sys
import time
import zlib

GEN_VERSION = 1

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
TIB = 1024 * GIB
PIECE = MIB            # every data write is one os.pwrite of at most 1 MiB
ALIGN = 64 * KIB       # chunk offsets
RAND_POOL = 32 * MIB
TEXT_POOL = 8 * MIB

NAMES = ("scat.raw", "scat.qcow2", "scat-sparse.vmdk", "scat-stream.vmdk",
         "chain-top.qcow2", "dense.raw", "sparse1t.raw")


def round_up(x, a):
    return (x + a - 1) // a * a


def mib_round(x):
    return max(MIB, int(round(x / MIB)) * MIB)


class Sizes:
    def __init__(self, scale):
        self.scat = max(64 * MIB, mib_round(8 * GIB * scale))
        self.scat_data = mib_round(2 * GIB * scale)
        self.dense = max(16 * MIB, mib_round(2 * GIB * scale))
        self.sparse1t = TIB
        self.sparse1t_data = 64 * MIB
        # data the two overlays write over the base
        self.mid_data = max(4 * MIB, mib_round(256 * MIB * scale))
        self.top_data = max(2 * MIB, mib_round(128 * MIB * scale))
        self.top_zero = max(1 * MIB, mib_round(32 * MIB * scale))


class Pools:
    """Random and text byte pools; data pieces are slices of them.

    A 64 KiB cluster cut from the random pool is as incompressible as fresh
    random bytes (compressors work per cluster or grain), and slicing is
    ~100x faster than making new random bytes in Python.
    """

    def __init__(self, seed):
        self.seed = seed
        self._rand = None
        self._text = None

    @property
    def rand(self):
        if self._rand is None:
            self._rand = random.Random(f"{self.seed}:randpool").randbytes(RAND_POOL)
        return self._rand

    @property
    def text(self):
        if self._text is None:
            self._text = make_text(random.Random(f"{self.seed}:textpool"), TEXT_POOL)
        return self._text

    def piece(self, rng, kind, n):
        if kind == "zero":
            return bytes(n)
        pool = self.rand if kind == "random" else self.text
        o = rng.randrange(0, len(pool) - n + 1)
        return pool[o:o + n]


def make_text(rng, size):
    """Lines of words from a 1024-word vocabulary with Zipf-like frequencies,
    three lines in ten repeating a recent line (as logs do): zlib level 6
    gets about 3.8x on 64 KiB clusters with a 4 KiB window, about 4x on the
    whole."""
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2,
               1, 1, 1, 1, 1, 1, 1]
    lengths = [2, 3, 3, 4, 4, 5, 5, 6, 7, 8, 9, 10]
    words = ["".join(rng.choices(letters, weights=weights, k=rng.choice(lengths)))
             for _ in range(1024)]
    cum = list(itertools.accumulate(1.0 / (i + 1) ** 1.1 for i in range(len(words))))
    stream = rng.choices(words, cum_weights=cum, k=size // 5)
    lines, n, i = [], 0, 0
    while n < size:
        if lines and rng.random() < 0.3:
            line = lines[-rng.randint(1, min(len(lines), 40))]
        else:
            k = rng.randint(5, 16)
            if i + k > len(stream):
                i = 0
            line = " ".join(stream[i:i + k]).capitalize() + ".\n"
            i += k
        lines.append(line)
        n += len(line)
    return "".join(lines).encode()[:size]


def place(rng, size, lengths, align=ALIGN):
    """Non-overlapping offsets (multiples of align) for chunks of the given
    lengths, in the given order, spread at random over [0, size)."""
    slots = [round_up(n, align) // align for n in lengths]
    free = size // align - sum(slots)
    if free < 0:
        raise SystemExit("gen.py: chunks do not fit the image")
    gaps = sorted(rng.randint(0, free) for _ in lengths)
    offsets, used = [], 0
    for g, s in zip(gaps, slots):
        offsets.append((g + used) * align)
        used += s
    return offsets


def write_chunk(fd, rng, pools, kind, off, length):
    done = 0
    while done < length:
        n = min(PIECE, length - done)
        os.pwrite(fd, pools.piece(rng, kind, n), off + done)
        done += n


def scat_layout(seed, sizes):
    rng = random.Random(f"{seed}:scat")
    lengths, kinds, total = [], [], 0
    while total < sizes.scat_data:
        n = rng.randrange(256, 1537) * 4 * KIB          # 1-6 MiB, 4 KiB steps
        n = min(n, sizes.scat_data - total)
        lengths.append(n)
        kinds.append(rng.choices(("random", "text", "zero"), weights=(40, 40, 20))[0])
        total += n
    return rng, list(zip(place(rng, sizes.scat, lengths), lengths, kinds))


def make_scat_raw(path, seed, sizes, pools):
    rng, layout = scat_layout(seed, sizes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, sizes.scat)
        for off, n, kind in layout:
            write_chunk(fd, rng, pools, kind, off, n)
    finally:
        os.close(fd)


def make_dense_raw(path, seed, sizes, pools):
    rng = random.Random(f"{seed}:dense")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, sizes.dense, PIECE):
            n = min(PIECE, sizes.dense - off)
            kind = rng.choice(("random", "text"))
            os.pwrite(fd, pools.piece(rng, kind, n), off)
    finally:
        os.close(fd)


def make_sparse1t_raw(path, seed, sizes, pools):
    rng = random.Random(f"{seed}:sparse1t")
    n, count = 8 * MIB, sizes.sparse1t_data // (8 * MIB)
    # the first and the last chunk at the very ends, the others anywhere
    # between them
    inner = place(rng, sizes.sparse1t - 2 * n, [n] * (count - 2))
    offsets = [0] + [n + o for o in inner] + [sizes.sparse1t - n]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, sizes.sparse1t)
        for off in offsets:
            write_chunk(fd, rng, pools, rng.choice(("random", "text")), off, n)
    finally:
        os.close(fd)


def run(argv):
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise SystemExit(f"gen.py: {' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")


def overlay_cmds(rng, virt, data, zero):
    """qemu-io commands: pattern writes of 64 KiB-4 MiB at 4 KiB-aligned
    offsets (so some start or end inside a cluster), then a few zero
    writes that hide what lies below."""
    cmds, total = [], 0
    while total < data:
        n = min(rng.randrange(16, 1025) * 4 * KIB, data - total)
        off = rng.randrange(0, (virt - n) // (4 * KIB) + 1) * 4 * KIB
        cmds.append(f"write -P {rng.randrange(1, 256)} {off} {n}")
        total += n
    total = 0
    while total < zero:
        n = min(rng.randrange(16, 257) * 4 * KIB, zero - total)
        off = rng.randrange(0, (virt - n) // (4 * KIB) + 1) * 4 * KIB
        cmds.append(f"write -z {off} {n}")
        total += n
    return cmds


def make_overlay(dirpath, name, backing, cmds, qemu_img, qemu_io):
    tmp = os.path.join(dirpath, f".{name}.tmp.{os.getpid()}")
    try:
        # a relative backing name: the cache dir may be moved
        run([qemu_img, "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", tmp])
        argv = [qemu_io, "-f", "qcow2"]
        for c in cmds:
            argv += ["-c", c]
        run(argv + [tmp])
        os.rename(tmp, os.path.join(dirpath, name))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def make(name, d, seed, sizes, pools, qemu_img, qemu_io):
    """Make input `name` in dir d unless it is there; return its path."""
    path = os.path.join(d, name)
    if os.path.exists(path):
        return path
    conv = {"scat.qcow2": ["-O", "qcow2"],
            "scat-sparse.vmdk": ["-O", "vmdk"],
            "scat-stream.vmdk": ["-O", "vmdk", "-o", "subformat=streamOptimized"]}
    if name == "chain-top.qcow2":
        make("scat.qcow2", d, seed, sizes, pools, qemu_img, qemu_io)
        rng = random.Random(f"{seed}:chain")
        if not os.path.exists(os.path.join(d, "chain-mid.qcow2")):
            make_overlay(d, "chain-mid.qcow2", "scat.qcow2",
                         overlay_cmds(rng, sizes.scat, sizes.mid_data, sizes.top_zero),
                         qemu_img, qemu_io)
        rng = random.Random(f"{seed}:chain-top")
        make_overlay(d, name, "chain-mid.qcow2",
                     overlay_cmds(rng, sizes.scat, sizes.top_data, sizes.top_zero),
                     qemu_img, qemu_io)
        return path
    tmp = os.path.join(d, f".{name}.tmp.{os.getpid()}")
    try:
        if name in conv:
            src = make("scat.raw", d, seed, sizes, pools, qemu_img, qemu_io)
            run([qemu_img, "convert", "-f", "raw"] + conv[name] + [src, tmp])
        elif name == "scat.raw":
            make_scat_raw(tmp, seed, sizes, pools)
        elif name == "dense.raw":
            make_dense_raw(tmp, seed, sizes, pools)
        elif name == "sparse1t.raw":
            make_sparse1t_raw(tmp, seed, sizes, pools)
        else:
            raise SystemExit(f"gen.py: no input named {name!r} (see gen.py names)")
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def human(n):
    for unit, f in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB)):
        if n >= f:
            return f"{n / f:.4g} {unit}"
    return f"{n / KIB:.4g} KiB"


def describe(seed, sizes):
    _, layout = scat_layout(seed, sizes)
    by = {}
    for _, n, kind in layout:
        by[kind] = by.get(kind, 0) + n
    print(f"scat: {human(sizes.scat)} virtual, {len(layout)} chunks of 1-6 MiB: "
          + ", ".join(f"{human(by.get(k, 0))} {k}" for k in ("random", "text", "zero"))
          + " (raw, qcow2, vmdk sparse and stream made from it by qemu-img)")
    print(f"chain: scat.qcow2 <- mid ({human(sizes.mid_data)} written, {human(sizes.top_zero)} "
          f"zeroed) <- top ({human(sizes.top_data)} written, {human(sizes.top_zero)} zeroed)")
    print(f"dense: {human(sizes.dense)} raw, non-zero everywhere (random and text MiBs)")
    print(f"sparse1t: {human(sizes.sparse1t)} raw, {human(sizes.sparse1t_data)} of data in 8 places")


def ceilings(seed, mib):
    """One line per measurement, MB/s = 1e6 bytes/s of uncompressed data,
    one thread.  Compression is per 64 KiB cluster, raw deflate with a
    4 KiB window as qcow2 stores it."""
    pools = Pools(seed)
    n = mib * MIB
    samples = {kind: sample_bytes(pools, seed, kind, mib) for kind in ("text", "random")}
    # memcpy: slice assignment between two preallocated buffers
    src, dst = bytearray(samples["random"]), bytearray(n)
    dst[:] = src
    t = time.perf_counter()
    for _ in range(4):
        dst[:] = src
    print(f"memcpy (python bytearray copy, {mib} MiB x4): {4 * n / (time.perf_counter() - t) / 1e6:.0f} MB/s")
    del src, dst
    cl = 64 * KIB
    for kind, data in samples.items():
        t = time.perf_counter()
        comp = []
        for off in range(0, n, cl):
            c = zlib.compressobj(6, zlib.DEFLATED, -12)
            comp.append(c.compress(data[off:off + cl]) + c.flush())
        ct = time.perf_counter() - t
        t = time.perf_counter()
        for b in comp:
            zlib.decompressobj(-12).decompress(b)
        dt = time.perf_counter() - t
        ratio = n / sum(len(b) for b in comp)
        print(f"zlib level 6, {kind} ({mib} MiB, 64 KiB clusters, x{ratio:.2f}): "
              f"deflate {n / ct / 1e6:.0f} MB/s, inflate {n / dt / 1e6:.0f} MB/s per core")


def sample_bytes(pools, seed, kind, mib):
    rng = random.Random(f"{seed}:ceil:{kind}")
    return b"".join(pools.piece(rng, kind, MIB) for _ in range(mib))


def sample(seed, kind, mib, path):
    with open(path, "wb") as f:
        f.write(sample_bytes(Pools(seed), seed, kind, mib))


def main():
    ap = argparse.ArgumentParser(description="seeded inputs for bench/run.sh")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--dir")
    ap.add_argument("--qemu-img", default="/usr/bin/qemu-img")
    ap.add_argument("--qemu-io", default="/usr/bin/qemu-io")
    ap.add_argument("cmd", choices=("make", "describe", "ceilings", "sample", "names", "key"))
    ap.add_argument("args", nargs="*")
    ap.add_argument("--mib", type=int, default=32)
    a = ap.parse_args()
    if not 0 < a.scale <= 16:
        raise SystemExit("gen.py: --scale wants a number in (0, 16]")
    sizes = Sizes(a.scale)
    if a.cmd == "names":
        print("\n".join(NAMES))
    elif a.cmd == "key":
        print(f"seed{a.seed}-scale{a.scale!r}-g{GEN_VERSION}")
    elif a.cmd == "describe":
        describe(a.seed, sizes)
    elif a.cmd == "ceilings":
        ceilings(a.seed, a.mib)
    elif a.cmd == "sample":         # sample KIND PATH: the ceilings data, for zstd -b
        if len(a.args) != 2 or a.args[0] not in ("text", "random"):
            raise SystemExit("gen.py: sample text|random PATH")
        sample(a.seed, a.args[0], a.mib, a.args[1])
    else:
        if not a.dir or len(a.args) != 1:
            raise SystemExit("gen.py: make wants --dir DIR and one input name")
        os.makedirs(a.dir, exist_ok=True)
        print(make(a.args[0], a.dir, a.seed, sizes, Pools(a.seed), a.qemu_img, a.qemu_io))


if __name__ == "__main__":
    sys.exit(main())

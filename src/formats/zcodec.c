/* DEFLATE codecs shared by the qcow, qcow2 and vmdk drivers (see zcodec.h). */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <zlib.h>
#if HAVE_LIBDEFLATE
#include <libdeflate.h>
#endif
#if HAVE_ZSTD
#include <zstd.h>
#endif

#include "formats/zcodec.h"
#include "util/util.h"


/*
 * Codec objects are costly to make (zlib's deflate state and zstd's tables
 * are hundreds of KiB to megabytes, mapped and faulted in afresh each time)
 * and not thread-safe, while the copy engine's workers and readers call in
 * here for every cluster.  So each thread keeps one of each it has used;
 * the key's destructor frees them when the thread exits, and __thread
 * makes the lookup free.
 */
struct zc_tls {
#if HAVE_LIBDEFLATE
    struct libdeflate_decompressor *d;
    struct libdeflate_compressor *c;
#endif
    z_stream raw;          /* raw deflate encoder, window 2^raw_bits */
    int raw_bits;          /* 0: raw not set up */
#if HAVE_ZSTD
    ZSTD_CCtx *zc;
    ZSTD_DStream *zd;
#endif
};

static pthread_key_t zc_key;
static pthread_once_t zc_once = PTHREAD_ONCE_INIT;
static int zc_key_ok;
static __thread struct zc_tls *zc_mine;

static void zc_free(void *p)
{
    struct zc_tls *t = p;

#if HAVE_LIBDEFLATE
    libdeflate_free_decompressor(t->d);
    libdeflate_free_compressor(t->c);
#endif
    if (t->raw_bits) {
        deflateEnd(&t->raw);
    }
#if HAVE_ZSTD
    ZSTD_freeCCtx(t->zc);
    ZSTD_freeDStream(t->zd);
#endif
    free(t);
    zc_mine = NULL;   /* a later destructor of this thread may decode again */
}

static void zc_key_init(void)
{
    zc_key_ok = 0 == pthread_key_create(&zc_key, zc_free);
}

/* This thread's objects, NULL when they cannot be had. */
static struct zc_tls *zc_get(void)
{
    if (zc_mine) {
        return zc_mine;
    }
    pthread_once(&zc_once, zc_key_init);
    if (!zc_key_ok) {
        return NULL;
    }
    struct zc_tls *t = calloc(1, sizeof(*t));
    if (!t) {
        return NULL;
    }
    if (pthread_setspecific(zc_key, t)) {
        free(t);
        return NULL;
    }
    zc_mine = t;
    return t;
}

#if HAVE_LIBDEFLATE
static struct libdeflate_decompressor *zc_decompressor(void)
{
    struct zc_tls *t = zc_get();

    if (t && !t->d) {
        t->d = libdeflate_alloc_decompressor();
    }
    return t ? t->d : NULL;
}
#endif

/* zlib's answer for vimg_inflate_raw: qemu's own test, which accepts a
 * stream that goes on past the full cluster (Z_BUF_ERROR). */
static int zlib_inflate_raw(void *dst, size_t dlen, const void *src, size_t slen,
                            int window_bits)
{
    z_stream z;
    int ret;

    if (dlen > UINT_MAX || slen > UINT_MAX) {
        return -EIO;
    }
    memset(&z, 0, sizeof(z));
    if (Z_OK != inflateInit2(&z, -window_bits)) {
        return -ENOMEM;
    }
    z.next_in = (Bytef *)src;
    z.avail_in = (uInt)slen;
    z.next_out = dst;
    z.avail_out = (uInt)dlen;
    ret = inflate(&z, Z_FINISH);
    inflateEnd(&z);
    if ((Z_STREAM_END == ret || Z_BUF_ERROR == ret) && 0 == z.avail_out) {
        return 0;
    }
    return -EIO;
}

int vimg_inflate_raw(void *dst, size_t dlen, const void *src, size_t slen, int window_bits)
{
#if HAVE_LIBDEFLATE
    struct libdeflate_decompressor *d = zc_decompressor();
    size_t in_used, out_len;

    /* A stream that ends exactly at the full cluster is the common case;
     * anything else (longer, shorter, corrupt) goes to zlib, whose answer
     * is the reference.  libdeflate checks distances against the output
     * only, as zlib does within one call, so the window limit changes
     * nothing here. */
    if (d && LIBDEFLATE_SUCCESS == libdeflate_deflate_decompress_ex(d, src, slen, dst, dlen,
                                                                    &in_used, &out_len) &&
        out_len == dlen) {
        return 0;
    }
#endif
    return zlib_inflate_raw(dst, dlen, src, slen, window_bits);
}

int vimg_zlib_uncompress(void *dst, size_t dcap, size_t *out_len, const void *src,
                         size_t slen)
{
    uLongf n = dcap;

#if HAVE_LIBDEFLATE
    struct libdeflate_decompressor *d = zc_decompressor();
    size_t in_used, out;

    if (d && LIBDEFLATE_SUCCESS == libdeflate_zlib_decompress_ex(d, src, slen, dst, dcap,
                                                                 &in_used, &out)) {
        *out_len = out;
        return 0;
    }
#endif
    if (dcap > ULONG_MAX || Z_OK != uncompress(dst, &n, src, slen)) {
        return -EIO;
    }
    *out_len = n;
    return 0;
}

bool vimg_looks_incompressible(const void *buf, size_t len)
{
    const uint8_t *p = buf;
    enum { CHUNK = 16384 };
    size_t i;

    if (len < 32768 || len > (1u << 30) || len % CHUNK) {
        return false;
    }
    /* Per 16 KiB, about what deflate codes with one set of Huffman tables:
     * the bits per byte must be so close to 8 that the tables cannot pay
     * for themselves (a saving of at most 64 bytes), or deflate wins. */
    for (size_t c = 0; c < len; c += CHUNK) {
        uint32_t h[4][256];
        double sum = 0;
        memset(h, 0, sizeof(h));
        /* four tables: no store-to-load stall on runs of one byte value */
        for (i = c; i < c + CHUNK; i += 4) {
            h[0][p[i]]++;
            h[1][p[i + 1]]++;
            h[2][p[i + 2]]++;
            h[3][p[i + 3]]++;
        }
        for (int b = 0; b < 256; b++) {
            uint32_t n = h[0][b] + h[1][b] + h[2][b] + h[3][b];
            if (n) {
                sum += n * log2(n);
            }
        }
        if (log2(CHUNK) - sum / CHUNK < 8.0 - 512.0 / CHUNK) {
            return false;
        }
    }
    /* Even bytes of every value in equal numbers compress when strings
     * repeat (runs, copies, counters): count 3-byte strings (deflate's
     * shortest match) seen again within 4 KiB, the window qcow2 allows.
     * Random data has about len / 4096 of them by chance. */
    static const unsigned bits = 12;
    uint32_t last[1u << 12], seen[1u << 12];
    unsigned matches = 0, limit = (unsigned)(len / 1024);
    uint32_t v = (uint32_t)p[0] << 8 | (uint32_t)p[1] << 16;
    memset(last, 0, sizeof(last));
    for (i = 0; i + 3 <= len; i++) {
        v = v >> 8 | (uint32_t)p[i + 2] << 16;      /* the 3 bytes at i */
        uint32_t k = (v * 2654435761u) >> (32 - bits);
        if (last[k] && seen[k] == v && i + 1 - last[k] <= 4096 && ++matches > limit) {
            return false;
        }
        last[k] = (uint32_t)i + 1;
        seen[k] = v;
    }
    return true;
}

long vimg_deflate_raw(void *dst, size_t dlen, const void *src, size_t slen, int window_bits)
{
    struct zc_tls *t;
    int ret;

    if (dlen > UINT_MAX || slen > UINT_MAX || window_bits < 9 || window_bits > 15) {
        return -EINVAL;
    }
    if (dlen < slen && vimg_looks_incompressible(src, slen)) {
        /* deflate would not get it below dlen: qemu then stores the
         * cluster plainly, and so do we, without the match search */
        return -ENOSPC;
    }
    if (!(t = zc_get())) {
        return -ENOMEM;
    }
    if (t->raw_bits != window_bits) {
        if (t->raw_bits) {
            deflateEnd(&t->raw);
            t->raw_bits = 0;
        }
        memset(&t->raw, 0, sizeof(t->raw));
        /* qemu's parameters: default level, memLevel 9 */
        if (Z_OK != deflateInit2(&t->raw, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -window_bits, 9,
                                 Z_DEFAULT_STRATEGY)) {
            return -ENOMEM;
        }
        t->raw_bits = window_bits;
    } else if (Z_OK != deflateReset(&t->raw)) {
        return -EIO;
    }
    t->raw.next_in = (Bytef *)src;
    t->raw.avail_in = (uInt)slen;
    t->raw.next_out = dst;
    t->raw.avail_out = (uInt)dlen;
    ret = deflate(&t->raw, Z_FINISH);
    if (Z_STREAM_END != ret) {
        return Z_OK == ret || Z_BUF_ERROR == ret ? -ENOSPC : -EIO;
    }
    return (long)(dlen - t->raw.avail_out);
}

/* A zlib stream of stored blocks: what any level gives for data that does
 * not shrink, without an encoder. */
static long zlib_stored(uint8_t *dst, size_t dcap, const uint8_t *src, size_t slen)
{
    size_t blocks = slen ? (slen + 65534) / 65535 : 1, need = 2 + 5 * blocks + slen + 4;
    uint32_t a = (uint32_t)adler32(1, src, (uInt)slen);
    uint8_t *p = dst;

    if (need > dcap) {
        return -ENOSPC;
    }
    *p++ = 0x78;   /* deflate, 32 KiB window */
    *p++ = 0x01;   /* no dictionary, lowest level; 0x7801 % 31 == 0 */
    for (size_t i = 0; i < blocks; i++) {
        size_t n = VIMG_MIN(slen - i * 65535, 65535);
        *p++ = i + 1 == blocks;   /* BFINAL, BTYPE 00 */
        *p++ = (uint8_t)n;
        *p++ = (uint8_t)(n >> 8);
        *p++ = (uint8_t)~n;
        *p++ = (uint8_t)(~n >> 8);
        memcpy(p, src + i * 65535, n);
        p += n;
    }
    *p++ = (uint8_t)(a >> 24);
    *p++ = (uint8_t)(a >> 16);
    *p++ = (uint8_t)(a >> 8);
    *p++ = (uint8_t)a;
    return (long)need;
}

long vimg_zlib_compress(void *dst, size_t dcap, const void *src, size_t slen)
{
    if (slen > UINT_MAX || dcap > LONG_MAX) {
        return -EINVAL;
    }
    if (vimg_looks_incompressible(src, slen)) {
        return zlib_stored(dst, dcap, src, slen);
    }
#if HAVE_LIBDEFLATE
    /* libdeflate's level 7 gives grains a little smaller than zlib's 6
     * (qemu's) on text, binaries and file-system data alike, in 0.5-0.75 of
     * the time (docs/performance.md, "vmdk stream write"). */
    struct zc_tls *t = zc_get();
    if (!t) {
        return -ENOMEM;
    }
    if (!t->c && !(t->c = libdeflate_alloc_compressor(7))) {
        return -ENOMEM;
    }
    size_t n = libdeflate_zlib_compress(t->c, src, slen, dst, dcap);
    if (n) {
        return (long)n;
    }
    /* no room: the stored form may still fit where dcap is just enough */
    return zlib_stored(dst, dcap, src, slen);
#else
    uLongf n = dcap;
    int z = compress2(dst, &n, src, slen, Z_DEFAULT_COMPRESSION);
    if (Z_BUF_ERROR == z) {
        return -ENOSPC;
    }
    if (Z_MEM_ERROR == z) {
        return -ENOMEM;
    }
    return Z_OK == z ? (long)n : -EIO;
#endif
}

#if HAVE_ZSTD
int vimg_zstd_decompress(void *dst, size_t dlen, const void *src, size_t slen)
{
    struct zc_tls *t = zc_get();
    ZSTD_outBuffer out = { dst, dlen, 0 };
    ZSTD_inBuffer in = { src, slen, 0 };

    if (!t) {
        return -ENOMEM;
    }
    if (!t->zd && !(t->zd = ZSTD_createDStream())) {
        return -ENOMEM;
    }
    /* a fresh frame: nothing left over from the last (maybe bad) cluster */
    ZSTD_DCtx_reset(t->zd, ZSTD_reset_session_only);
    /* frame after frame until the cluster is full */
    while (out.pos < out.size) {
        size_t last = in.pos;
        size_t r = ZSTD_decompressStream(t->zd, &out, &in);
        if (ZSTD_isError(r)) {
            return -EIO;
        }
        if (out.pos == out.size) {
            break;
        }
        if (in.pos == in.size || (in.pos == last && 0 == r)) {
            return -EIO;
        }
    }
    return 0;
}

long vimg_zstd_compress(void *dst, size_t dlen, const void *src, size_t slen)
{
    struct zc_tls *t = zc_get();
    ZSTD_outBuffer out = { dst, dlen, 0 };
    ZSTD_inBuffer in = { src, slen, 0 };

    if (!t) {
        return -ENOMEM;
    }
    if (!t->zc && !(t->zc = ZSTD_createCCtx())) {
        return -ENOMEM;
    }
    /* parameters stay the defaults: the output is what a fresh context
     * gives, qemu's */
    ZSTD_CCtx_reset(t->zc, ZSTD_reset_session_only);
    for (;;) {
        size_t r = ZSTD_compressStream2(t->zc, &out, &in, ZSTD_e_end);
        if (ZSTD_isError(r)) {
            return -EIO;
        }
        if (0 == r) {
            return (long)out.pos;
        }
        if (out.pos == out.size) {
            return -ENOSPC;
        }
    }
}
#endif

/* DEFLATE codecs shared by the qcow, qcow2 and vmdk drivers (see zcodec.h). */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#if HAVE_LIBDEFLATE
#include <libdeflate.h>
#include <pthread.h>
#endif

#include "formats/zcodec.h"

#if HAVE_LIBDEFLATE
/*
 * libdeflate objects are not thread-safe, so each thread keeps its own
 * decompressor: the copy engine's readers call in here for every cluster.
 * The key's destructor frees it when a worker exits; __thread makes the
 * lookup free.
 */
struct zc_tls {
    struct libdeflate_decompressor *d;
};

static pthread_key_t zc_key;
static pthread_once_t zc_once = PTHREAD_ONCE_INIT;
static int zc_key_ok;
static __thread struct zc_tls *zc_mine;

static void zc_free(void *p)
{
    struct zc_tls *t = p;

    libdeflate_free_decompressor(t->d);
    free(t);
    zc_mine = NULL;   /* a later destructor of this thread may decode again */
}

static void zc_key_init(void)
{
    zc_key_ok = 0 == pthread_key_create(&zc_key, zc_free);
}

/* This thread's objects, NULL when they cannot be had (then zlib does it). */
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

long vimg_zlib_compress(void *dst, size_t dcap, const void *src, size_t slen, int level)
{
    uLongf n = dcap;
    int z;

    if (level < 0) {
        level = Z_DEFAULT_COMPRESSION == level ? 6 : level;
    }
    /* Encoding stays zlib's: libdeflate's level 6 finds fewer matches in
     * text-like data (about 4 % bigger grains, measured), and its higher
     * levels are slower than zlib's 6.  Data that cannot shrink goes out
     * as stored blocks straight away, as zlib would end up storing it. */
    if (level > 0 && vimg_looks_incompressible(src, slen)) {
        level = 0;
    }
    z = compress2(dst, &n, src, slen, level);
    if (Z_BUF_ERROR == z) {
        return -ENOSPC;
    }
    if (Z_MEM_ERROR == z) {
        return -ENOMEM;
    }
    return Z_OK == z ? (long)n : -EIO;
}

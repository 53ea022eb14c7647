/* DEFLATE codecs shared by the qcow, qcow2 and vmdk drivers (see zcodec.h). */
#include "config.h"

#include <errno.h>
#include <limits.h>
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
 * libdeflate objects are not thread-safe and a compressor costs hundreds of
 * KiB to set up, so each thread keeps one of each: the copy engine's reader
 * and compression workers call in here for every cluster.  The key's
 * destructor frees them when a worker exits; __thread makes the lookup free.
 */
struct zc_tls {
    struct libdeflate_decompressor *d;
    struct libdeflate_compressor *c;
    int c_level;
};

static pthread_key_t zc_key;
static pthread_once_t zc_once = PTHREAD_ONCE_INIT;
static int zc_key_ok;
static __thread struct zc_tls *zc_mine;

static void zc_free(void *p)
{
    struct zc_tls *t = p;

    libdeflate_free_decompressor(t->d);
    libdeflate_free_compressor(t->c);
    free(t);
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

static struct libdeflate_compressor *zc_compressor(int level)
{
    struct zc_tls *t = zc_get();

    if (!t) {
        return NULL;
    }
    if (t->c && t->c_level != level) {
        libdeflate_free_compressor(t->c);
        t->c = NULL;
    }
    if (!t->c) {
        t->c = libdeflate_alloc_compressor(level);
        t->c_level = level;
    }
    return t->c;
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

long vimg_zlib_compress(void *dst, size_t dcap, const void *src, size_t slen, int level)
{
    uLongf n = dcap;
    int z;

    if (level < 0) {
        level = Z_DEFAULT_COMPRESSION == level ? 6 : level;
    }
#if HAVE_LIBDEFLATE
    /* libdeflate's levels 0-9 trade speed for size as zlib's do, and each
     * beats zlib's at the same number on both counts for disk data. */
    struct libdeflate_compressor *c = level >= 0 && level <= 9 ? zc_compressor(level) : NULL;

    if (c) {
        size_t r = libdeflate_zlib_compress(c, src, slen, dst, dcap);
        if (r) {
            return (long)r;
        }
        /* did not fit: zlib's encoding is a little different and may */
    }
#endif
    z = compress2(dst, &n, src, slen, level);
    if (Z_BUF_ERROR == z) {
        return -ENOSPC;
    }
    if (Z_MEM_ERROR == z) {
        return -ENOMEM;
    }
    return Z_OK == z ? (long)n : -EIO;
}

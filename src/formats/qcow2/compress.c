/* qcow2 compression codecs: raw deflate with a 4 KiB window, and zstd.
 * Writing stays zlib's: qemu inflates with a 4 KiB window, which only an
 * encoder that limits its window can respect (libdeflate cannot). */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#if HAVE_ZSTD
#include <zstd.h>
#endif

#include "formats/qcow2/qcow2.h"
#include "formats/zcodec.h"

static long qcow2_deflate(void *dst, size_t dlen, const void *src, size_t slen)
{
    z_stream z;
    int ret;

    memset(&z, 0, sizeof(z));
    if (Z_OK != deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
                             Z_DEFAULT_STRATEGY)) {
        return -EIO;
    }
    z.next_in = (Bytef *)src;
    z.avail_in = (uInt)slen;
    z.next_out = dst;
    z.avail_out = (uInt)dlen;
    ret = deflate(&z, Z_FINISH);
    deflateEnd(&z);
    if (Z_STREAM_END != ret) {
        return Z_OK == ret || Z_BUF_ERROR == ret ? -ENOSPC : -EIO;
    }
    return (long)(dlen - z.avail_out);
}

#if HAVE_ZSTD
/*
 * zstd contexts are costly to make (their tables are megabytes, mapped and
 * faulted in afresh each time) and not thread-safe, so each thread keeps
 * one of each: the copy engine's compression workers and readers call in
 * here for every cluster.  The key's destructor frees them at thread exit.
 */
struct qc_tls {
    ZSTD_CCtx *c;
    ZSTD_DStream *d;
};

static pthread_key_t qc_key;
static pthread_once_t qc_once = PTHREAD_ONCE_INIT;
static int qc_key_ok;
static __thread struct qc_tls *qc_mine;

static void qc_free(void *p)
{
    struct qc_tls *t = p;

    ZSTD_freeCCtx(t->c);
    ZSTD_freeDStream(t->d);
    free(t);
    qc_mine = NULL;
}

static void qc_key_init(void)
{
    qc_key_ok = 0 == pthread_key_create(&qc_key, qc_free);
}

static struct qc_tls *qc_get(void)
{
    if (qc_mine) {
        return qc_mine;
    }
    pthread_once(&qc_once, qc_key_init);
    struct qc_tls *t = qc_key_ok ? calloc(1, sizeof(*t)) : NULL;
    if (!t) {
        return NULL;
    }
    if (pthread_setspecific(qc_key, t)) {
        free(t);
        return NULL;
    }
    qc_mine = t;
    return t;
}

static int qcow2_unzstd(void *dst, size_t dlen, const void *src, size_t slen)
{
    struct qc_tls *t = qc_get();
    ZSTD_DStream *ds;
    ZSTD_outBuffer out = { dst, dlen, 0 };
    ZSTD_inBuffer in = { src, slen, 0 };
    int ret = 0;

    if (!t) {
        return -ENOMEM;
    }
    if (!t->d && !(t->d = ZSTD_createDStream())) {
        return -ENOMEM;
    }
    ds = t->d;
    /* a fresh frame: nothing left over from the last (maybe bad) cluster */
    ZSTD_DCtx_reset(ds, ZSTD_reset_session_only);
    /* frame after frame until the cluster is full */
    while (out.pos < out.size) {
        size_t last = in.pos;
        size_t r = ZSTD_decompressStream(ds, &out, &in);
        if (ZSTD_isError(r)) {
            ret = -EIO;
            break;
        }
        if (out.pos == out.size) {
            break;
        }
        if (in.pos == in.size || (in.pos == last && 0 == r)) {
            ret = -EIO;
            break;
        }
    }
    return ret;
}

static long qcow2_zstd(void *dst, size_t dlen, const void *src, size_t slen)
{
    struct qc_tls *t = qc_get();
    ZSTD_CCtx *cctx;
    ZSTD_outBuffer out = { dst, dlen, 0 };
    ZSTD_inBuffer in = { src, slen, 0 };
    long ret;

    if (!t) {
        return -ENOMEM;
    }
    if (!t->c && !(t->c = ZSTD_createCCtx())) {
        return -ENOMEM;
    }
    cctx = t->c;
    /* parameters stay the defaults: the output is what a fresh context
     * gives, qemu's */
    ZSTD_CCtx_reset(cctx, ZSTD_reset_session_only);
    for (;;) {
        size_t r = ZSTD_compressStream2(cctx, &out, &in, ZSTD_e_end);
        if (ZSTD_isError(r)) {
            ret = -EIO;
            break;
        }
        if (0 == r) {
            ret = (long)out.pos;
            break;
        }
        if (out.pos == out.size) {
            ret = -ENOSPC;
            break;
        }
    }
    return ret;
}
#endif

int qcow2_decompress(int type, void *dst, size_t dlen, const void *src, size_t slen)
{
    if (QCOW2_COMPRESS_ZLIB == type) {
        /* qemu stops as soon as the cluster is full and ignores what
         * follows (the rest of the last sector), so a stream that ends
         * early is an error but one with trailing bytes is not. */
        return vimg_inflate_raw(dst, dlen, src, slen, 12);
    }
#if HAVE_ZSTD
    if (QCOW2_COMPRESS_ZSTD == type) {
        return qcow2_unzstd(dst, dlen, src, slen);
    }
#endif
    return -ENOTSUP;
}

long qcow2_compress(int type, void *dst, size_t dlen, const void *src, size_t slen)
{
    if (QCOW2_COMPRESS_ZLIB == type) {
        if (dlen < slen && vimg_looks_incompressible(src, slen)) {
            /* deflate would not get it below dlen: qemu then stores the
             * cluster plainly, and so do we, without the match search */
            return -ENOSPC;
        }
        return qcow2_deflate(dst, dlen, src, slen);
    }
#if HAVE_ZSTD
    if (QCOW2_COMPRESS_ZSTD == type) {
        return qcow2_zstd(dst, dlen, src, slen);
    }
#endif
    return -ENOTSUP;
}

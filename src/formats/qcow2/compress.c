/* qcow2 compression types onto the shared codecs (formats/zcodec.h): raw
 * deflate with a 4 KiB window, and zstd. */
#include "config.h"

#include <errno.h>

#include "formats/qcow2/qcow2.h"
#include "formats/zcodec.h"

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
        return vimg_zstd_decompress(dst, dlen, src, slen);
    }
#endif
    return -ENOTSUP;
}

long qcow2_compress(int type, void *dst, size_t dlen, const void *src, size_t slen)
{
    if (QCOW2_COMPRESS_ZLIB == type) {
        return vimg_deflate_raw(dst, dlen, src, slen, 12);
    }
#if HAVE_ZSTD
    if (QCOW2_COMPRESS_ZSTD == type) {
        return vimg_zstd_compress(dst, dlen, src, slen);
    }
#endif
    return -ENOTSUP;
}

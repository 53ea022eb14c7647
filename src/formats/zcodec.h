/*
 * DEFLATE for the drivers: qcow/qcow2 compressed clusters (raw deflate) and
 * vmdk grains (zlib streams).  With libdeflate (HAVE_LIBDEFLATE) decoding
 * uses it; encoding is zlib's (same output size as qemu's); zlib stays the
 * reference: whatever libdeflate does
 * not decode to the answer zlib would give is decoded again by zlib, so
 * corrupt or unusual data behave as they do in qemu.  Thread-safe: every
 * thread keeps its own libdeflate objects (freed when the thread exits).
 */
#ifndef VIMG_FORMATS_ZCODEC_H
#define VIMG_FORMATS_ZCODEC_H

#include <stdbool.h>
#include <stddef.h>

/*
 * Inflate raw deflate into exactly dlen bytes, as qemu's qcow/qcow2 do:
 * 0 once dst is full, whatever follows in src (the stored length is rounded
 * up to a sector); -EIO when the data is corrupt or ends before dst is full.
 * window_bits is zlib's (12 for qcow/qcow2).
 */
int vimg_inflate_raw(void *dst, size_t dlen, const void *src, size_t slen, int window_bits);

/*
 * Decode one zlib (RFC 1950) stream into dst, like zlib's uncompress():
 * 0 with *out_len set (at most dcap; bytes after the stream are ignored),
 * -EIO when it is corrupt, its checksum is wrong or it does not fit.
 */
int vimg_zlib_uncompress(void *dst, size_t dcap, size_t *out_len, const void *src,
                         size_t slen);

/*
 * Encode src as one zlib stream at zlib level (0-9, -1 for 6): the length,
 * -ENOSPC when it does not fit in dcap, -ENOMEM or -EIO.
 */
long vimg_zlib_compress(void *dst, size_t dcap, const void *src, size_t slen, int level);
/*
 * True when DEFLATE cannot shrink buf below its own length: its byte
 * entropy is so close to 8 bits that Huffman coding saves less than the
 * code tables cost, and chance matches in such data are too rare to pay.
 * Only answers for len >= 32 KiB (false below).  About 2 GB/s, so random
 * or already compressed data skips the encoder's match search.
 */
bool vimg_looks_incompressible(const void *buf, size_t len);

#endif

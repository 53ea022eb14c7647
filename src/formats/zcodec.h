/*
 * The codecs of the drivers: qcow/qcow2 compressed clusters (raw deflate
 * with a 4 KiB window, or zstd) and vmdk grains (zlib streams).  With
 * libdeflate (HAVE_LIBDEFLATE) decoding uses it, and so does vmdk grain
 * encoding; raw deflate is encoded by zlib, whose window limit qemu's
 * reader needs.  zlib stays the reference: whatever libdeflate does not
 * decode to the answer zlib would give is decoded again by zlib, so corrupt
 * or unusual data behave as they do in qemu.  Thread-safe: every thread
 * keeps its own codec objects (freed when the thread exits).
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
 * Raw deflate at zlib's default level with a 2^window_bits window and
 * memLevel 9 (qemu's qcow/qcow2 encoder, same output): the length, -ENOSPC
 * when it does not fit in dlen (at once, without the match search, when
 * dlen < slen and the data looks incompressible), -ENOMEM or -EIO.
 */
long vimg_deflate_raw(void *dst, size_t dlen, const void *src, size_t slen, int window_bits);

/*
 * Encode src as one zlib stream (vmdk grains): libdeflate's level 7 when
 * built in (smaller than zlib's default level, qemu's, and faster), else
 * zlib's default level; stored blocks for data that looks incompressible.
 * The length, -ENOSPC when it does not fit in dcap, -ENOMEM or -EIO.
 */
long vimg_zlib_compress(void *dst, size_t dcap, const void *src, size_t slen);

#if HAVE_ZSTD
/*
 * qcow2's zstd clusters, as qemu: decode frame after frame until dst
 * (dlen bytes) is full, 0 or -EIO; encode with a default context (the
 * length, -ENOSPC when it does not fit in dlen).
 */
int vimg_zstd_decompress(void *dst, size_t dlen, const void *src, size_t slen);
long vimg_zstd_compress(void *dst, size_t dlen, const void *src, size_t slen);
#endif
/*
 * True when DEFLATE cannot shrink buf below its own length: its byte
 * entropy is so close to 8 bits that Huffman coding saves less than the
 * code tables cost, and chance matches in such data are too rare to pay.
 * Only answers for len >= 32 KiB (false below).  Text is judged in one pass
 * of byte counts (~1.4 GB/s); random data, which also gets the repeat scan,
 * at ~300 MB/s: still several times faster than the encoders, so random
 * or already compressed data skips the encoder's match search.
 */
bool vimg_looks_incompressible(const void *buf, size_t len);

#endif

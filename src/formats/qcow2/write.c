/*
 * qcow2 writes.  Every metadata change is written through at once, in an
 * order that leaves a consistent image (at worst with leaked clusters) if
 * the process dies between any two writes:
 *   refcount increments -> data -> L2 entry -> L1 entry -> refcount decrements.
 * flush() then makes it durable with fsync.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2/qcow2.h"
#include "util/util.h"

int qcow2_mark_dirty(struct vimg_image *img, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    int ret;

    if (QCOW2_APPEND_OFF != s->app.state) {
        /* a write outside the append-mode writer: its metadata first */
        ret = qcow2_append_commit(img, err);
        if (ret < 0) {
            return ret;
        }
    }
    if (s->repair_failed) {
        /* once is enough: a check per write would make a hostile image
         * cost a full scan for every request */
        vimg_error_set(err, EIO, "Could not repair dirty image: %s", strerror(EIO));
        return -EIO;
    }
    if (s->needs_repair) {
        struct vimg_check_result r = { 0 };
        s->needs_repair = false;
        ret = qcow2_check(img, &r, 3, err);
        free(r.log);
        if (ret < 0 || r.corruptions || r.check_errors) {
            vimg_error_clear(err);
            vimg_error_set(err, EIO, "Could not repair dirty image: %s", strerror(EIO));
            s->needs_repair = true;
            s->repair_failed = true;
            return -EIO;
        }
    }
    if (s->autoclear & QCOW2_AUTOCLEAR_BITMAPS) {
        /* vimg does not track dirty bitmaps: as the spec asks of such a
         * program, mark them inconsistent before changing the image */
        s->autoclear &= ~QCOW2_AUTOCLEAR_BITMAPS;
        ret = qcow2_write_header(img, err);
        if (ret < 0) {
            return ret;
        }
    }
    if (!s->lazy || s->version < 3 || (s->incompat & QCOW2_INCOMPAT_DIRTY)) {
        return 0;
    }
    ret = qcow2_update_incompat(img, s->incompat | QCOW2_INCOMPAT_DIRTY, err);
    if (0 == ret) {
        s->dirty_set_by_us = true;
    }
    return ret;
}

static int qcow2_write_l1_entry(struct vimg_image *img, uint64_t idx,
                                struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint8_t b[8];
    int ret;

    vimg_st_be64(b, s->l1[idx]);
    ret = vimg_file_pwrite(img->file, b, 8, s->l1_offset + idx * 8);
    if (ret < 0) {
        return qcow2_io_error(img, ret, "Could not write L1 table", err);
    }
    return 0;
}

/* The L2 table for l1_idx, made present and private (COPIED). */
int qcow2_get_l2_for_write(struct vimg_image *img, uint64_t l1_idx,
                           uint64_t *l2_off, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t old = s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK, new_off;
    uint8_t *tbl, *src;
    int ret;

    if (old && (s->l1[l1_idx] & QCOW2_OFLAG_COPIED)) {
        if (qcow2_offset_into_cluster(s, old)) {
            vimg_error_set(err, EIO, "'%s': L2 table offset %#" PRIx64 " unaligned "
                           "(L1 index: %#" PRIx64 ")", img->filename, old, l1_idx);
            return -EIO;
        }
        *l2_off = old;
        return 0;
    }
    ret = qcow2_alloc_clusters(img, 1, &new_off, err);
    if (ret < 0) {
        return ret;
    }
    ret = qcow2_cache_get(img, &s->l2_cache, new_off, false, &tbl, err);
    if (ret < 0) {
        return ret;
    }
    if (old) {
        ret = qcow2_read_l2(img, old, &src, err);
        if (ret < 0) {
            qcow2_cache_drop(&s->l2_cache, new_off);
            return ret;
        }
        /* src and tbl are distinct slots: the cache holds several tables */
        ret = qcow2_cache_get(img, &s->l2_cache, new_off, false, &tbl, err);
        if (ret < 0) {
            return ret;
        }
        memcpy(tbl, src, s->cluster_size);
    }
    ret = vimg_file_pwrite(img->file, tbl, s->cluster_size, new_off);
    if (ret < 0) {
        qcow2_cache_drop(&s->l2_cache, new_off);
        return qcow2_io_error(img, ret, "Could not write L2 table", err);
    }
    s->l1[l1_idx] = new_off | QCOW2_OFLAG_COPIED;
    ret = qcow2_write_l1_entry(img, l1_idx, err);
    if (ret < 0) {
        return ret;
    }
    if (old) {
        ret = qcow2_update_refcount(img, old, 1, -1, err);
        if (ret < 0) {
            return ret;
        }
    }
    *l2_off = new_off;
    return 0;
}

static int qcow2_set_l2(struct vimg_image *img, uint64_t l2_off, uint64_t idx,
                        uint64_t entry, uint64_t bitmap, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint8_t *l2;
    int ret = qcow2_read_l2(img, l2_off, &l2, err);
    if (ret < 0) {
        return ret;
    }
    vimg_st_be64(l2 + idx * s->l2_entry_size, entry);
    if (s->ext_l2) {
        vimg_st_be64(l2 + idx * 16 + 8, bitmap);
    }
    ret = vimg_file_pwrite(img->file, l2 + idx * s->l2_entry_size, s->l2_entry_size,
                           l2_off + idx * s->l2_entry_size);
    if (ret < 0) {
        qcow2_cache_drop(&s->l2_cache, l2_off);
        return qcow2_io_error(img, ret, "Could not write L2 table", err);
    }
    return 0;
}

/* Drop the reference an old L2 entry held (after it was replaced). */
static int qcow2_release_entry(struct vimg_image *img, uint64_t entry, uint64_t keep_host,
                               struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t host, n;

    if (entry & QCOW2_OFLAG_COMPRESSED) {
        qcow2_compressed_range(s, entry, &host, &n);
        return qcow2_update_refcount(img, host, n, -1, err);
    }
    host = entry & QCOW2_L2E_OFFSET_MASK;
    if (!host || host == keep_host || (s->incompat & QCOW2_INCOMPAT_DATAFILE)) {
        return 0;
    }
    return qcow2_update_refcount(img, host, 1, -1, err);
}

/* Look up the L2 entry of guest offset off for writing. */
static int qcow2_lookup_w(struct vimg_image *img, uint64_t off, uint64_t *l2_off,
                          uint64_t *idx, uint64_t *entry, uint64_t *bitmap,
                          struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t l1_idx = off >> (s->cluster_bits + s->l2_bits);
    uint8_t *l2;
    int ret;

    if (l1_idx >= s->l1_size) {
        vimg_error_set(err, EIO, "'%s': offset %" PRIu64 " lies beyond the L1 table",
                       img->filename, off);
        return -EIO;
    }
    ret = qcow2_get_l2_for_write(img, l1_idx, l2_off, err);
    if (ret < 0) {
        return ret;
    }
    ret = qcow2_read_l2(img, *l2_off, &l2, err);
    if (ret < 0) {
        return ret;
    }
    *idx = (off >> s->cluster_bits) & (s->l2_entries - 1);
    *entry = qcow2_l2_entry(s, l2, *idx);
    *bitmap = qcow2_l2_bitmap(s, l2, *idx);
    return 0;
}

/* Host cluster of an entry we may write into in place, or 0. */
static uint64_t qcow2_inplace_host(struct qcow2_state *s, uint64_t entry)
{
    if (entry & QCOW2_OFLAG_COMPRESSED) {
        return 0;
    }
    if (!(entry & QCOW2_OFLAG_COPIED)) {
        return 0;
    }
    if (!(entry & QCOW2_L2E_OFFSET_MASK) && !(s->incompat & QCOW2_INCOMPAT_DATAFILE)) {
        return 0;
    }
    return entry & QCOW2_L2E_OFFSET_MASK;
}

/* Write [off, off+len) inside one guest cluster; buf NULL writes zeros. */
static int qcow2_write_in_cluster(struct vimg_image *img, const uint8_t *buf, uint64_t len,
                                  uint64_t off, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t gc = qcow2_start_of_cluster(s, off), in = off - gc;
    uint64_t l2_off, idx, entry, bitmap, host, new_entry;
    bool data_file = !!(s->incompat & QCOW2_INCOMPAT_DATAFILE);
    uint8_t *cl = NULL;
    int ret;

    ret = qcow2_lookup_w(img, off, &l2_off, &idx, &entry, &bitmap, err);
    if (ret < 0) {
        return ret;
    }
    host = qcow2_inplace_host(s, entry);
    if (data_file && !host && !(entry & QCOW2_OFLAG_COMPRESSED)) {
        /* an external data file maps guest offsets to the same host offsets */
        host = gc;
    }
    if (s->cbuf_guest == gc) {
        s->cbuf_guest = UINT64_MAX;
    }
    if (host && (entry & QCOW2_OFLAG_COPIED) && !(entry & QCOW2_OFLAG_ZERO) &&
        (!s->ext_l2 || ((bitmap & 0xffffffffull) == 0xffffffffull &&
                        !(bitmap >> 32)))) {
        /* a private, fully allocated cluster: write in place */
        if (buf) {
            ret = vimg_file_pwrite(s->data_file, buf, len, host + in);
        } else {
            ret = s->data_file->ops->zero(s->data_file, host + in, len, false);
        }
        if (ret < 0) {
            return qcow2_io_error(img, ret, "Could not write data", err);
        }
        return 0;
    }
    /* Build the whole cluster: the old content around the new bytes. */
    cl = malloc(s->cluster_size);
    if (!cl) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    if (len < s->cluster_size) {
        uint64_t n = VIMG_MIN(s->cluster_size, img->size - gc);
        memset(cl, 0, s->cluster_size);
        ret = vimg_pread(img, cl, n, gc, err);
        if (ret < 0) {
            free(cl);
            return ret;
        }
    }
    if (buf) {
        memcpy(cl + in, buf, len);
    } else {
        memset(cl + in, 0, len);
    }
    if (!host) {
        ret = qcow2_alloc_clusters(img, 1, &host, err);
        if (ret < 0) {
            free(cl);
            return ret;
        }
    }
    ret = vimg_file_pwrite(s->data_file, cl, s->cluster_size, host);
    free(cl);
    if (ret < 0) {
        return qcow2_io_error(img, ret, "Could not write data", err);
    }
    new_entry = host | QCOW2_OFLAG_COPIED;
    ret = qcow2_set_l2(img, l2_off, idx, new_entry, s->ext_l2 ? 0xffffffffull : 0, err);
    if (ret < 0) {
        return ret;
    }
    return qcow2_release_entry(img, entry, host, err);
}

int qcow2_write(struct vimg_image *img, const void *buf, size_t len, uint64_t offset,
                struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    const uint8_t *p = buf;
    int ret = qcow2_mark_dirty(img, err);

    while (ret >= 0 && len) {
        uint64_t n = VIMG_MIN(len, s->cluster_size - qcow2_offset_into_cluster(s, offset));
        ret = qcow2_write_in_cluster(img, p, n, offset, err);
        p += n;
        offset += n;
        len -= n;
    }
    return ret < 0 ? ret : 0;
}

enum qcow2_zmode {
    QCOW2_Z_UNMAP,        /* write_zeroes that may free the cluster */
    QCOW2_Z_KEEP,         /* write_zeroes that keeps a private allocation */
    QCOW2_Z_DISCARD,      /* reads as zeros afterwards where the format can */
    QCOW2_Z_FULL_DISCARD, /* back to the backing image (shrink) */
};

/* Change one whole guest cluster into a zero or unallocated one. */
static int qcow2_zero_cluster(struct vimg_image *img, uint64_t gc, enum qcow2_zmode mode,
                              struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t l2_off, idx, entry, bitmap, new_entry = 0, new_bitmap = 0, keep = 0;
    uint64_t l1_idx = gc >> (s->cluster_bits + s->l2_bits);
    int ret;

    if (QCOW2_Z_UNMAP != mode && QCOW2_Z_KEEP != mode &&
        (l1_idx >= s->l1_size || !(s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK))) {
        /* nothing allocated: discarding needs no new L2 table, except to
         * hide a backing file */
        if (QCOW2_Z_FULL_DISCARD == mode || !img->backing_name || s->version < 3) {
            return 0;
        }
    }
    ret = qcow2_lookup_w(img, gc, &l2_off, &idx, &entry, &bitmap, err);
    if (ret < 0) {
        return ret;
    }
    if (s->cbuf_guest == gc) {
        s->cbuf_guest = UINT64_MAX;
    }
    if (QCOW2_Z_FULL_DISCARD == mode) {
        new_entry = new_bitmap = 0;
    } else if (QCOW2_Z_DISCARD == mode) {
        enum qcow2_ctype t = qcow2_entry_type(s, entry, 0, 0);
        bool allocated = (entry & QCOW2_OFLAG_COMPRESSED) ||
                         (entry & QCOW2_L2E_OFFSET_MASK) || QCOW2_C_NORMAL == t;
        if (img->backing_name || allocated) {
            if (s->ext_l2) {
                new_bitmap = 0xffffffff00000000ull;
            } else {
                new_entry = s->version >= 3 ? QCOW2_OFLAG_ZERO : 0;
            }
        } else {
            return 0;
        }
    } else if (s->ext_l2) {
        new_bitmap = 0xffffffff00000000ull;
        if (QCOW2_Z_KEEP == mode && qcow2_inplace_host(s, entry)) {
            keep = qcow2_inplace_host(s, entry);
            new_entry = entry & ~QCOW2_OFLAG_ZERO;
        }
    } else {
        new_entry = QCOW2_OFLAG_ZERO;
        if (QCOW2_Z_KEEP == mode && qcow2_inplace_host(s, entry)) {
            keep = qcow2_inplace_host(s, entry);
            new_entry = keep | QCOW2_OFLAG_COPIED | QCOW2_OFLAG_ZERO;
        }
    }
    if (new_entry == entry && new_bitmap == bitmap) {
        return 0;
    }
    ret = qcow2_set_l2(img, l2_off, idx, new_entry, new_bitmap, err);
    if (ret < 0) {
        return ret;
    }
    return qcow2_release_entry(img, entry, keep, err);
}

int qcow2_write_zeroes(struct vimg_image *img, uint64_t offset, uint64_t len,
                       unsigned flags, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    int ret = qcow2_mark_dirty(img, err);

    while (ret >= 0 && len) {
        uint64_t in = qcow2_offset_into_cluster(s, offset);
        uint64_t n = VIMG_MIN(len, s->cluster_size - in);
        bool whole = 0 == in && (n == s->cluster_size || offset + n == img->size);

        if (whole && (s->version >= 3 || s->ext_l2)) {
            ret = qcow2_zero_cluster(img, offset, (flags & VIMG_ZERO_MAY_UNMAP)
                                                      ? QCOW2_Z_UNMAP : QCOW2_Z_KEEP, err);
        } else if (whole && !img->backing_name) {
            /* v2: an unallocated cluster reads as zeros without a backing file */
            ret = qcow2_zero_cluster(img, offset, QCOW2_Z_FULL_DISCARD, err);
        } else {
            ret = qcow2_write_in_cluster(img, NULL, n, offset, err);
        }
        offset += n;
        len -= n;
    }
    return ret < 0 ? ret : 0;
}

int qcow2_discard(struct vimg_image *img, uint64_t offset, uint64_t len,
                  struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t end = offset + len;
    uint64_t gc;
    int ret = 0;

    /* only whole clusters are discarded, as qemu does */
    if (!vimg_round_up(offset, s->cluster_size, &gc)) {
        return 0;
    }
    ret = qcow2_mark_dirty(img, err);
    for (; ret >= 0 && gc < end; gc += s->cluster_size) {
        if (gc + s->cluster_size > end && end != img->size) {
            break;
        }
        ret = qcow2_zero_cluster(img, gc, QCOW2_Z_DISCARD, err);
    }
    return ret < 0 ? ret : 0;
}

int qcow2_flush(struct vimg_image *img, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    int ret = 0;

    ret = qcow2_append_commit(img, err);
    if (ret < 0) {
        return ret;
    }
    ret = qcow2_cache_flush(img, &s->rb_cache, err);
    if (ret < 0) {
        return ret;
    }
    if (s->data_file && s->data_file != img->file) {
        ret = vimg_file_sync(s->data_file);
    }
    if (ret >= 0) {
        ret = vimg_file_sync(img->file);
    }
    if (ret < 0) {
        return qcow2_io_error(img, ret, "Could not flush", err);
    }
    return 0;
}

long qcow2_compress_cluster(struct vimg_image *img, void *out, size_t out_cap,
                            const void *buf, size_t len, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint8_t *in;
    long clen;

    if (len > s->cluster_size || out_cap < 1) {
        vimg_error_set(err, EINVAL, "'%s': compressed writes must be whole clusters",
                       img->filename);
        return -EINVAL;
    }
    if (len == s->cluster_size) {
        clen = qcow2_compress((int)s->compression_type, out,
                              VIMG_MIN(out_cap, s->cluster_size - 1), buf, len);
    } else {
        /* a short last cluster is padded with zeros, as qemu does */
        in = calloc(1, s->cluster_size);
        if (!in) {
            vimg_error_set(err, ENOMEM, "out of memory");
            return -ENOMEM;
        }
        memcpy(in, buf, len);
        clen = qcow2_compress((int)s->compression_type, out,
                              VIMG_MIN(out_cap, s->cluster_size - 1), in, s->cluster_size);
        free(in);
    }
    if (clen < 0 && -ENOSPC != clen) {
        vimg_error_set(err, EIO, "'%s': compression failed", img->filename);
    }
    return clen;
}

int qcow2_write_compressed_data(struct vimg_image *img, const void *cdata, size_t clen,
                                size_t len, uint64_t offset, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t l2_off, idx, entry, bitmap, host, nsec, new_entry;
    int ret;

    if (s->incompat & QCOW2_INCOMPAT_DATAFILE) {
        vimg_error_set(err, ENOTSUP, "Compression is not supported with external data "
                       "files");
        return -ENOTSUP;
    }
    if (qcow2_offset_into_cluster(s, offset) || len > s->cluster_size || !clen ||
        clen >= s->cluster_size) {
        vimg_error_set(err, EINVAL, "'%s': compressed writes must be whole clusters",
                       img->filename);
        return -EINVAL;
    }
    ret = qcow2_mark_dirty(img, err);
    if (ret >= 0) {
        ret = qcow2_lookup_w(img, offset, &l2_off, &idx, &entry, &bitmap, err);
    }
    if (ret >= 0) {
        ret = qcow2_alloc_bytes(img, clen, &host, err);
    }
    if (ret >= 0) {
        ret = vimg_file_pwrite(img->file, cdata, clen, host);
        if (ret < 0) {
            qcow2_io_error(img, ret, "Could not write compressed data", err);
        }
    }
    if (ret < 0) {
        return ret;
    }
    if (s->cbuf_guest == offset) {
        s->cbuf_guest = UINT64_MAX;
    }
    nsec = ((host + clen - 1) >> 9) - (host >> 9);
    new_entry = QCOW2_OFLAG_COMPRESSED | (nsec << s->csize_shift) | host;
    ret = qcow2_set_l2(img, l2_off, idx, new_entry, 0, err);
    if (ret < 0) {
        return ret;
    }
    return qcow2_release_entry(img, entry, 0, err);
}

int qcow2_write_compressed(struct vimg_image *img, const void *buf, size_t len,
                           uint64_t offset, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint8_t *out;
    long clen;
    int ret;

    if (0 == len) {
        /* qemu-img convert -c ends with this "EOF" write: the file end is
         * rounded up to a whole sector, so packed compressed data never
         * leaves a partial last sector */
        int64_t fsize;
        uint64_t aligned;

        if (s->incompat & QCOW2_INCOMPAT_DATAFILE) {
            vimg_error_set(err, ENOTSUP, "Compression is not supported with external "
                           "data files");
            return -ENOTSUP;
        }
        fsize = vimg_file_size(img->file);
        if (fsize < 0) {
            return qcow2_io_error(img, (int)fsize, "Could not get the image file size",
                                  err);
        }
        if (!vimg_round_up((uint64_t)fsize, 512, &aligned) || aligned == (uint64_t)fsize) {
            return 0;
        }
        ret = img->file->ops->truncate(img->file, aligned);
        if (ret < 0) {
            return qcow2_io_error(img, ret, "Could not align the end of the image file",
                                  err);
        }
        return 0;
    }
    out = malloc(s->cluster_size);
    if (!out) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    clen = qcow2_compress_cluster(img, out, s->cluster_size - 1, buf, len, err);
    if (-ENOSPC == clen) {
        /* does not shrink: store it plainly, as qemu does */
        free(out);
        return qcow2_write(img, buf, len, offset, err);
    }
    if (clen < 0) {
        free(out);
        return (int)clen;
    }
    ret = qcow2_write_compressed_data(img, out, (size_t)clen, len, offset, err);
    free(out);
    return ret;
}

/* Replace the L1 table by one of new_size entries (growing only). */
static int qcow2_grow_l1(struct vimg_image *img, uint32_t new_size, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t bytes = (uint64_t)new_size * 8, nclusters, new_off;
    uint64_t old_off = s->l1_offset, old_bytes = (uint64_t)s->l1_size * 8;
    uint64_t *nl1;
    uint8_t hdr[12];
    int ret;

    nclusters = vimg_div_round_up(bytes, s->cluster_size);
    nl1 = calloc(nclusters * s->cluster_size / 8, 8);
    if (!nl1) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    ret = qcow2_alloc_clusters(img, nclusters, &new_off, err);
    if (ret < 0) {
        free(nl1);
        return ret;
    }
    for (uint32_t i = 0; i < s->l1_size; i++) {
        nl1[i] = htobe64(s->l1[i]);
    }
    ret = vimg_file_pwrite(img->file, nl1, bytes, new_off);
    if (ret < 0 || (ret = vimg_file_sync(img->file)) < 0) {
        free(nl1);
        return qcow2_io_error(img, ret, "Failed to grow the L1 table", err);
    }
    for (uint32_t i = 0; i < new_size; i++) {
        nl1[i] = be64toh(nl1[i]);
    }
    vimg_st_be32(hdr, new_size);
    vimg_st_be64(hdr + 4, new_off);
    ret = vimg_file_pwrite(img->file, hdr, 12, 36);
    if (ret < 0) {
        free(nl1);
        return qcow2_io_error(img, ret, "Failed to grow the L1 table", err);
    }
    free(s->l1);
    s->l1 = nl1;
    s->l1_size = new_size;
    s->l1_offset = new_off;
    if (old_bytes) {
        return qcow2_update_refcount(img, old_off, old_bytes, -1, err);
    }
    return 0;
}

static int qcow2_set_size(struct vimg_image *img, uint64_t size, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint8_t b[8];
    int ret;

    vimg_st_be64(b, size);
    ret = vimg_file_pwrite(img->file, b, 8, 24);
    if (ret < 0) {
        return qcow2_io_error(img, ret, "Failed to update the image size", err);
    }
    s->header_size = size;
    img->size = size;
    return 0;
}

/*
 * Growth with preallocation=falloc|full into the image file itself, laid
 * out as qemu does: a new refcount area after the last used cluster that
 * covers the new data and L2 tables, the data clusters in one run after
 * it, the file grown over them, then the L2 entries in guest order (new L2
 * tables go to the first free clusters, which the old refcount table has
 * just become).  Extended L2 bitmaps are left alone: the preallocated
 * subclusters still read from the backing file or as zeros.
 */
static int qcow2_prealloc_falloc(struct vimg_image *img, uint64_t old_length, uint64_t size,
                                 enum vimg_prealloc prealloc, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t cs = s->cluster_size, last, old_end = 0, new_end = 0, start, host, guest;
    uint64_t nb_data = 0, nb_l2;
    int64_t fsize = vimg_file_size(img->file);
    int ret;

    if (fsize < 0) {
        return qcow2_io_error(img, (int)fsize, "Failed to inquire current file length",
                              err);
    }
    /* the area starts after the last cluster in use, not at the file's end */
    ret = qcow2_clusters_in_use(img, (uint64_t)fsize, &last, err);
    if (ret < 0) {
        return ret;
    }
    old_end = last ? last * cs : vimg_div_round_up((uint64_t)fsize, cs) * cs;
    vimg_round_up(size, cs, &nb_data);
    nb_data = (nb_data - qcow2_start_of_cluster(s, old_length)) >> s->cluster_bits;
    /* one more L2 table for an unaligned head or tail */
    nb_l2 = vimg_div_round_up(nb_data, s->l2_entries) + 1;
    ret = qcow2_refcount_area(img, old_end, nb_data + nb_l2, true, 0, 0, &start, err);
    if (ret < 0) {
        vimg_error_prefix(err, "Failed to resize refcount structures: ");
        return ret;
    }
    ret = qcow2_update_refcount(img, start, nb_data * cs, 1, err);
    if (ret < 0) {
        vimg_error_prefix(err, "Failed to allocate data clusters: ");
        return ret;
    }
    new_end = start + nb_data * cs;
    fsize = vimg_file_size(img->file);
    if (fsize >= 0 && (uint64_t)fsize < new_end) {
        ret = img->file->ops->allocate(img->file, (uint64_t)fsize, new_end - (uint64_t)fsize,
                                       VIMG_PREALLOC_FULL == prealloc ? VIMG_ALLOC_FULL
                                                                      : VIMG_ALLOC_FALLOC);
        if (-ENOTSUP == ret) {
            ret = img->file->ops->truncate(img->file, new_end);
        }
        if (ret < 0) {
            qcow2_update_refcount(img, start, nb_data * cs, -1, &(struct vimg_error){ 0 });
            return qcow2_io_error(img, ret, "Failed to resize underlying file", err);
        }
    }
    host = start;
    guest = old_length;
    while (nb_data) {
        uint64_t idx = (guest >> s->cluster_bits) & (s->l2_entries - 1);
        uint64_t n = VIMG_MIN(nb_data, s->l2_entries - idx);
        uint64_t head = qcow2_offset_into_cluster(s, guest), l2_off;
        uint64_t *old;
        uint8_t *l2;

        guest = qcow2_start_of_cluster(s, guest);
        ret = qcow2_get_l2_for_write(img, guest >> (s->cluster_bits + s->l2_bits), &l2_off,
                                     err);
        if (ret < 0) {
            return ret;
        }
        if (head) {
            /* the guest bytes before the old end move into the new cluster */
            uint8_t *buf = malloc(head);
            if (!buf) {
                vimg_error_set(err, ENOMEM, "out of memory");
                return -ENOMEM;
            }
            ret = vimg_pread(img, buf, head, guest, err);
            if (ret >= 0) {
                ret = vimg_file_pwrite(img->file, buf, head, host);
                if (ret < 0) {
                    qcow2_io_error(img, ret, "Could not write data", err);
                }
            }
            free(buf);
            if (ret < 0) {
                return ret;
            }
        }
        old = calloc(n, sizeof(*old));
        if (!old) {
            vimg_error_set(err, ENOMEM, "out of memory");
            return -ENOMEM;
        }
        ret = qcow2_read_l2(img, l2_off, &l2, err);
        if (ret < 0) {
            free(old);
            return ret;
        }
        for (uint64_t i = 0; i < n; i++) {
            old[i] = qcow2_l2_entry(s, l2, idx + i);
            vimg_st_be64(l2 + (idx + i) * s->l2_entry_size,
                         (host + i * cs) | QCOW2_OFLAG_COPIED);
        }
        ret = vimg_file_pwrite(img->file, l2 + idx * s->l2_entry_size, n * s->l2_entry_size,
                               l2_off + idx * s->l2_entry_size);
        if (ret < 0) {
            qcow2_cache_drop(&s->l2_cache, l2_off);
            free(old);
            return qcow2_io_error(img, ret, "Failed to update L2 tables", err);
        }
        for (uint64_t i = 0; i < n && ret >= 0; i++) {
            ret = qcow2_release_entry(img, old[i], host + i * cs, err);
        }
        free(old);
        if (ret < 0) {
            return ret;
        }
        guest += n * cs;
        host += n * cs;
        nb_data -= n;
    }
    return 0;
}

int qcow2_truncate(struct vimg_image *img, uint64_t size, enum vimg_prealloc prealloc,
                   struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t shift = s->cluster_bits + s->l2_bits;
    uint64_t need = (size >> shift) + ((size & ((1ull << shift) - 1)) ? 1 : 0);
    int ret = qcow2_mark_dirty(img, err);

    if (ret < 0) {
        return ret;
    }
    if (size % 512) {
        vimg_error_set(err, EINVAL, "The new size must be a multiple of 512");
        return -EINVAL;
    }
    if (s->nb_snapshots && s->version < 3) {
        vimg_error_set(err, ENOTSUP, "Can't resize a v2 image which has snapshots");
        return -ENOTSUP;
    }
    if (VIMG_PREALLOC_OFF != prealloc && size < img->size) {
        vimg_error_set(err, EINVAL, "Preallocation can't be used for shrinking an image");
        return -EINVAL;
    }
    if (need > QCOW2_MAX_L1_SIZE / 8) {
        vimg_error_set(err, EFBIG, "File too large");
        return -EFBIG;
    }
    if (size < img->size) {
        uint64_t gc = 0;
        vimg_round_up(size, s->cluster_size, &gc);
        for (; gc < img->size; gc += s->cluster_size) {
            uint64_t l1_idx = gc >> shift;
            if (!(s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK)) {
                gc = ((l1_idx + 1) << shift) - s->cluster_size;
                continue;
            }
            ret = qcow2_zero_cluster(img, gc, QCOW2_Z_FULL_DISCARD, err);
            if (ret < 0) {
                return ret;
            }
            if (l1_idx < need && (s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK)) {
                /* qemu writes whole L2 tables from its cache */
                qcow2_cache_mark_dirty(&s->l2_cache, s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK);
            }
        }
        ret = qcow2_cache_flush(img, &s->l2_cache, err);
        if (ret < 0) {
            return ret;
        }
        /* the L2 tables wholly past the new end go */
        for (uint64_t i = need; i < s->l1_size; i++) {
            uint64_t old = s->l1[i] & QCOW2_L1E_OFFSET_MASK;
            if (!old) {
                continue;
            }
            s->l1[i] = 0;
            ret = qcow2_write_l1_entry(img, i, err);
            if (ret < 0) {
                return ret;
            }
            qcow2_cache_drop(&s->l2_cache, old);
            ret = qcow2_update_refcount(img, old, 1, -1, err);
            if (ret < 0) {
                return ret;
            }
        }
        /* as qemu: cut the file after the last cluster still in use */
        {
            int64_t fsize = vimg_file_size(img->file);
            uint64_t last;
            ret = qcow2_clusters_in_use(img, fsize > 0 ? (uint64_t)fsize : 0, &last, err);
            if (ret < 0) {
                return ret;
            }
            ret = qcow2_cache_flush(img, &s->rb_cache, err);
            if (ret < 0) {
                return ret;
            }
            /* qemu rewrites the refcount table when it shrinks it */
            {
                uint64_t *t = malloc(s->rt_clusters * s->cluster_size);
                if (t) {
                    memset(t, 0, s->rt_clusters * s->cluster_size);
                    for (uint64_t i = 0; i < s->rt_size; i++) {
                        t[i] = htobe64(s->rt[i]);
                    }
                    vimg_file_pwrite(img->file, t, s->rt_clusters * s->cluster_size,
                                     s->rt_offset);
                    free(t);
                }
            }
            if (fsize > 0 && last * s->cluster_size < (uint64_t)fsize) {
                img->file->ops->truncate(img->file, last * s->cluster_size);
            }
        }
    } else if (need > s->l1_size) {
        ret = qcow2_grow_l1(img, (uint32_t)need, err);
        if (ret < 0) {
            return ret;
        }
    }
    {
        uint64_t old_size = img->size;
        int64_t old_len = vimg_file_size(s->data_file ? s->data_file : img->file);
        ret = qcow2_set_size(img, size, err);
        if (ret < 0) {
            return ret;
        }
        if ((VIMG_PREALLOC_FALLOC == prealloc || VIMG_PREALLOC_FULL == prealloc) &&
            (!s->data_file || s->data_file == img->file) && size >= old_size) {
            /* qemu does this even when the size stays (create with size 0) */
            ret = qcow2_prealloc_falloc(img, old_size, size, prealloc, err);
            if (ret < 0) {
                return ret;
            }
        } else if (VIMG_PREALLOC_OFF != prealloc && size > old_size) {
            struct vimg_file *df = s->data_file ? s->data_file : img->file;
            ret = qcow2_prealloc_metadata(img, old_size, size, err);
            if (ret < 0) {
                return ret;
            }
            if (VIMG_PREALLOC_METADATA != prealloc && old_len >= 0) {
                int64_t len = vimg_file_size(df);
                if (len > old_len) {
                    ret = df->ops->allocate(df, (uint64_t)old_len, (uint64_t)(len - old_len),
                                            VIMG_PREALLOC_FULL == prealloc ? VIMG_ALLOC_FULL
                                                                           : VIMG_ALLOC_FALLOC);
                    if (ret < 0 && -ENOTSUP != ret) {
                        return qcow2_io_error(img, ret, "Could not preallocate data", err);
                    }
                }
            }
        }
    }
    return vimg_file_sync(img->file) < 0 ? qcow2_io_error(img, -EIO, "Could not flush", err)
                                         : 0;
}

/*
 * streamOptimized in VMware's own layout, written as a stream: the header
 * says "GD at end"; compressed grains (each behind a grain marker) are
 * appended in the order they come; a grain table is appended, behind its
 * marker, once the writer moves past its range; flush and close append the
 * grain directory, the footer (the header again, with the real GD offset)
 * and the end-of-stream marker.  The next grain overwrites that trailer,
 * so the file is a valid image after every flush, and a file VMware made
 * can be appended to without losing its footer (qemu 7.2 loses it).
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "formats/vmdk/vmdk.h"
#include "formats/zcodec.h"
#include "util/util.h"

static int vmdk_stream_io(struct vimg_error *err, int ret, struct vmdk_extent *e,
                          uint64_t off)
{
    vimg_error_set(err, -ret, "error while writing '%s' at byte %" PRIu64 ": %s",
                   e->file->name, off, strerror(-ret));
    return ret;
}

static uint64_t vmdk_stream_gt_sectors(const struct vmdk_extent *e)
{
    return vimg_div_round_up((uint64_t)e->gtes * 4, VMDK_SECTOR);
}

static void vmdk_marker(uint8_t *m, uint64_t val, uint32_t type)
{
    memset(m, 0, VMDK_SECTOR);
    vimg_st_le64(m, val);
    vimg_st_le32(m + 12, type);
}

/* Append the held grain table behind its marker. */
static int vmdk_stream_emit_gt(struct vmdk_extent *e, struct vimg_error *err)
{
    uint64_t secs = vmdk_stream_gt_sectors(e), bytes = (1 + secs) * VMDK_SECTOR;
    uint64_t at = e->st.append;
    uint8_t *b;
    int ret;

    if (!e->st.gt_dirty || e->st.open_gt < 0) {
        return 0;
    }
    if ((at + bytes) / VMDK_SECTOR > VMDK_MAX_ALLOC_SECTOR) {
        vimg_error_set(err, ENOSPC, "'%s': the extent file is full", e->file->name);
        return -ENOSPC;
    }
    b = calloc(1, bytes);
    if (!b) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    vmdk_marker(b, secs, VMDK_MARKER_GT);
    for (uint32_t i = 0; i < e->gtes; i++) {
        vimg_st_le32(b + VMDK_SECTOR + (size_t)i * 4, e->st.gt[i]);
    }
    ret = vimg_file_pwrite(e->file, b, bytes, at);
    free(b);
    if (ret < 0) {
        return vmdk_stream_io(err, ret, e, at);
    }
    vmdk_gt_cache_drop(e, at + VMDK_SECTOR);
    e->gd[e->st.open_gt] = (at + VMDK_SECTOR) / VMDK_SECTOR;
    e->st.append = at + bytes;
    e->st.gt_dirty = false;
    e->st.dirty = true;
    return 0;
}

/* Make GT gi the held one. */
static int vmdk_stream_hold(struct vimg_image *img, struct vmdk_extent *e, uint64_t gi,
                            struct vimg_error *err)
{
    int ret;

    if (e->st.open_gt == (int64_t)gi) {
        return 0;
    }
    if ((ret = vmdk_stream_emit_gt(e, err)) < 0) {
        return ret;
    }
    if (!e->st.gt && !(e->st.gt = calloc(e->gtes, sizeof(uint32_t)))) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    memset(e->st.gt, 0, (size_t)e->gtes * sizeof(uint32_t));
    if (e->gd[gi]) {
        uint8_t *gt;
        if ((ret = vmdk_gt_load(img, e, e->gd[gi] * VMDK_SECTOR, &gt, err)) < 0) {
            return ret;
        }
        for (uint32_t i = 0; i < e->gtes; i++) {
            e->st.gt[i] = vimg_ld_le32(gt + (size_t)i * 4);
        }
    }
    e->st.open_gt = (int64_t)gi;
    return 0;
}

/* Append one grain record (marker + zlib data) for extent offset r. */
int vmdk_stream_put(struct vimg_image *img, struct vmdk_extent *e, uint64_t r, size_t len,
                    const void *cdata, size_t clen, struct vimg_error *err)
{
    uint64_t gi = r / e->gt_cover, ti = (r % e->gt_cover) / e->grain, at;
    size_t reclen;
    uint8_t *rec;
    int ret;

    if (r % e->grain || len > e->grain || (len < e->grain && r + len != e->length)) {
        vimg_error_set(err, EINVAL, "'%s': compressed writes must cover whole grains",
                       img->filename);
        return -EINVAL;
    }
    if (0 == clen || clen > 2 * e->grain) {
        vimg_error_set(err, EINVAL, "'%s': compressed grain of %zu bytes", img->filename,
                       clen);
        return -EINVAL;
    }
    if ((ret = vmdk_stream_hold(img, e, gi, err)) < 0) {
        return ret;
    }
    if (e->st.gt[ti] && !(e->zeroed && VMDK_GTE_ZEROED == e->st.gt[ti])) {
        vimg_error_set(err, EIO, "Could not write to allocated cluster for streamOptimized");
        return -EIO;
    }
    reclen = (size_t)vimg_div_round_up(12 + clen, VMDK_SECTOR) * VMDK_SECTOR;
    at = e->st.append;
    if ((at + reclen) / VMDK_SECTOR > VMDK_MAX_ALLOC_SECTOR) {
        vimg_error_set(err, ENOSPC, "'%s': the extent file is full", e->file->name);
        return -ENOSPC;
    }
    rec = calloc(1, reclen);
    if (!rec) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    vimg_st_le64(rec, (e->start + r) / VMDK_SECTOR);
    vimg_st_le32(rec + 8, (uint32_t)clen);
    memcpy(rec + 12, cdata, clen);
    ret = vimg_file_pwrite(e->file, rec, reclen, at);
    free(rec);
    if (ret < 0) {
        return vmdk_stream_io(err, ret, e, at);
    }
    e->st.gt[ti] = (uint32_t)(at / VMDK_SECTOR);
    e->st.append = at + reclen;
    e->st.gt_dirty = true;
    e->st.dirty = true;
    return 0;
}

long vmdk_deflate(void *out, size_t out_cap, const void *buf, size_t len)
{
    long r = vimg_zlib_compress(out, out_cap, buf, len);
    return r < 0 && -ENOSPC != r ? -EINVAL : r;
}

int vmdk_compress_grain(struct vimg_image *img, const void *buf, size_t len,
                        uint8_t **out, size_t *out_len, struct vimg_error *err)
{
    size_t cap = compressBound(len);
    uint8_t *c = malloc(cap);
    long clen;

    if (!c) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    clen = vmdk_deflate(c, cap, buf, len);
    if (clen < 0) {
        free(c);
        vimg_error_set(err, EINVAL, "'%s': compression failed", img->filename);
        return -EINVAL;
    }
    *out = c;
    *out_len = (size_t)clen;
    return 0;
}

int vmdk_stream_write(struct vimg_image *img, struct vmdk_extent *e, const void *buf,
                      size_t len, uint64_t r, struct vimg_error *err)
{
    uint8_t *c;
    size_t clen;
    int ret = vmdk_compress_grain(img, buf, len, &c, &clen, err);

    if (ret < 0) {
        return ret;
    }
    ret = vmdk_stream_put(img, e, r, len, c, clen, err);
    free(c);
    return ret;
}

int vmdk_stream_finish(struct vimg_image *img, struct vmdk_extent *e, struct vimg_error *err)
{
    uint64_t gd_secs, at, bytes, gd_sector;
    uint8_t *b, *p;
    int ret;

    if (!e->st.active || !e->st.dirty) {
        return 0;
    }
    if ((ret = vmdk_stream_emit_gt(e, err)) < 0) {
        return ret;
    }
    gd_secs = vimg_div_round_up((uint64_t)e->l1_size * 4, VMDK_SECTOR);
    at = e->st.append;
    bytes = (1 + gd_secs + 3) * VMDK_SECTOR;
    if ((at + bytes) / VMDK_SECTOR > VMDK_MAX_ALLOC_SECTOR) {
        vimg_error_set(err, ENOSPC, "'%s': the extent file is full", e->file->name);
        return -ENOSPC;
    }
    b = calloc(1, bytes);
    if (!b) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    gd_sector = at / VMDK_SECTOR + 1;
    vmdk_marker(b, gd_secs, VMDK_MARKER_GD);
    for (uint32_t i = 0; i < e->l1_size; i++) {
        vimg_st_le32(b + VMDK_SECTOR + (size_t)i * 4, (uint32_t)e->gd[i]);
    }
    p = b + (1 + gd_secs) * VMDK_SECTOR;
    vmdk_marker(p, 1, VMDK_MARKER_FOOTER);
    memcpy(p + VMDK_SECTOR, e->st.header, VMDK_SECTOR);
    vimg_st_le64(p + VMDK_SECTOR + 56, gd_sector);
    /* the end-of-stream marker is the zeroed last sector */
    ret = vimg_file_pwrite(e->file, b, bytes, at);
    free(b);
    if (ret < 0) {
        return vmdk_stream_io(err, ret, e, at);
    }
    if ((ret = e->file->ops->truncate(e->file, at + bytes)) < 0 ||
        (ret = vimg_file_sync(e->file)) < 0) {
        return vmdk_stream_io(err, ret, e, at + bytes);
    }
    e->gd_off = gd_sector * VMDK_SECTOR;
    e->st.trailer = at;
    e->st.dirty = false;
    return 0;
}

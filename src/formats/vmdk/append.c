/*
 * The append-mode writer (driver.h, alloc_data) for hosted sparse extents
 * (monolithicSparse, twoGbMaxExtentSparse): convert into a fresh image
 * hands grains out at each extent's end in guest order, where qemu-img
 * puts them, and lets the copy engine write them itself, asynchronously.
 *
 * The grain tables of such an image are preallocated and reachable from
 * the grain directory, so a table written early would point at grains
 * whose data may not be written yet.  So the first call writes zeros over
 * the directories on disk (the image reads as empty), grain tables go to
 * their places as the writer moves past them, and commit puts the
 * directories back once data and tables are flushed: the image is valid
 * at every step, and a crash before the commit leaves an empty image.
 *
 * Any other kind of write commits first and turns the writer off.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "formats/vmdk/vmdk.h"
#include "util/util.h"

#define VMDK_APPEND_ZBUF (1u << 20)

/* A grain table the writer will overwrite whole must lie in the metadata
 * area after the header and descriptor (where the first directory starts,
 * in qemu's and VMware's layouts) and clear of both directories: the
 * image is ours, but its tables come from the file. */
static bool vmdk_append_gt_ok(const struct vmdk_extent *e, uint64_t sector)
{
    uint64_t off = sector * VMDK_SECTOR, end = off + (uint64_t)e->gtes * 4;
    uint64_t dir = (uint64_t)e->l1_size * 4;
    uint64_t meta = e->rgd ? VIMG_MIN(e->gd_off, e->rgd_off) : e->gd_off;

    return sector < (UINT64_MAX / VMDK_SECTOR) && off >= VIMG_MAX(meta, VMDK_SECTOR) &&
           end <= e->overhead &&
           (end <= e->gd_off || off >= e->gd_off + dir) &&
           (!e->rgd || end <= e->rgd_off || off >= e->rgd_off + dir);
}

static bool vmdk_append_eligible(struct vimg_image *img)
{
    struct vmdk_state *s = img->opaque;

    if (!(img->flags & VIMG_OPEN_RDWR) || img->backing || 0 == s->n) {
        return false;
    }
    for (size_t i = 0; i < s->n; i++) {
        const struct vmdk_extent *e = &s->ext[i];
        uint64_t data0;
        if (VMDK_EXT_SPARSE != e->kind || e->compressed || e->readonly || 4 != e->esize ||
            e->gd_at_end || !e->gd || !vimg_round_up(e->overhead, e->grain, &data0) ||
            e->next_alloc > data0) {
            /* grains exist already, or the layout is not qemu's */
            return false;
        }
        for (uint32_t g = 0; g < e->l1_size; g++) {
            if (!vmdk_append_gt_ok(e, e->gd[g]) || (e->rgd && !vmdk_append_gt_ok(e, e->rgd[g]))) {
                return false;
            }
        }
    }
    return true;
}

/* The directories of every extent, from memory (restore) or zeroed. */
static int vmdk_append_put_dirs(struct vimg_image *img, bool restore, struct vimg_error *err)
{
    struct vmdk_state *s = img->opaque;

    for (size_t i = 0; i < s->n; i++) {
        struct vmdk_extent *e = &s->ext[i];
        size_t bytes = (size_t)e->l1_size * 4;
        uint8_t *b = calloc(1, bytes ? bytes : 1);
        int ret = 0;

        if (!b) {
            vimg_error_set(err, ENOMEM, "out of memory");
            return -ENOMEM;
        }
        for (int copy = 0; copy < 2 && ret >= 0; copy++) {
            uint64_t at = 0 == copy ? e->gd_off : e->rgd_off;
            if (1 == copy && !e->rgd) {
                break;
            }
            for (uint32_t g = 0; restore && g < e->l1_size; g++) {
                vimg_st_le32(b + (size_t)g * 4,
                             0 == copy ? (uint32_t)e->gd[g] : e->rgd[g]);
            }
            ret = vimg_file_pwrite(e->file, b, bytes, at);
            if (ret < 0) {
                vmdk_io_error(err, ret, "writing", e->file, at);
            }
        }
        free(b);
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

/* Zeros for [from, to) of a grain handed out that the engine will not
 * write: qemu-img writes whole grains, and a file that holds the zeros
 * maps and allocates the same. */
static int vmdk_append_zero(struct vimg_image *img, struct vmdk_extent *e, uint64_t from,
                            uint64_t to, struct vimg_error *err)
{
    struct vmdk_append *a = &((struct vmdk_state *)img->opaque)->app;

    if (!a->zbuf && from < to && !(a->zbuf = calloc(1, VMDK_APPEND_ZBUF))) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    /* grains may be up to 1 GiB: zeros from a bounded buffer */
    while (from < to) {
        size_t n = (size_t)VIMG_MIN(to - from, (uint64_t)VMDK_APPEND_ZBUF);
        int ret = vimg_file_pwrite(e->file, a->zbuf, n, from);
        if (ret < 0) {
            return vmdk_io_error(err, ret, "writing", e->file, from);
        }
        from += n;
    }
    return 0;
}

/* The rest of the grain the previous run ended in, up to host offset upto
 * of the same extent when the next run goes on in it (0: to its end). */
static int vmdk_append_fill_tail(struct vimg_image *img, struct vmdk_extent *e, uint64_t upto,
                                 struct vimg_error *err)
{
    struct vmdk_append *a = &((struct vmdk_state *)img->opaque)->app;
    struct vmdk_extent *fe = a->fill_ext;
    uint64_t from = a->fill_from, end;

    if (!fe) {
        return 0;
    }
    a->fill_ext = NULL;
    end = vimg_align_down(from, fe->grain) + fe->grain;
    if (fe == e && upto > from && upto < end) {
        end = upto;
    }
    return vmdk_append_zero(img, fe, from, end, err);
}

/* The held grain table goes to its places (primary and redundant). */
static int vmdk_append_put_gt(struct vimg_image *img, struct vimg_error *err)
{
    struct vmdk_append *a = &((struct vmdk_state *)img->opaque)->app;
    struct vmdk_extent *e = a->ext;
    size_t bytes;
    uint8_t *b;
    int ret = 0;

    if (!e || !a->gt_dirty) {
        return 0;
    }
    bytes = (size_t)e->gtes * 4;
    b = malloc(bytes);
    if (!b) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < e->gtes; i++) {
        vimg_st_le32(b + (size_t)i * 4, a->gt[i]);
    }
    for (int copy = 0; copy < 2 && ret >= 0; copy++) {
        uint64_t at;
        if (1 == copy && !e->rgd) {
            break;
        }
        at = (0 == copy ? e->gd[a->gi] : e->rgd[a->gi]) * (uint64_t)VMDK_SECTOR;
        ret = vimg_file_pwrite(e->file, b, bytes, at);
        if (ret < 0) {
            vmdk_io_error(err, ret, "writing", e->file, at);
        }
        vmdk_gt_cache_drop(e, at);
    }
    free(b);
    a->gt_dirty = false;
    return ret;
}

/* Hold the grain table gi of extent e (as on disk: a fresh image's are
 * all zero, anything else is not ours to overwrite). */
static int vmdk_append_hold(struct vimg_image *img, struct vmdk_extent *e, uint64_t gi,
                            struct vimg_error *err)
{
    struct vmdk_append *a = &((struct vmdk_state *)img->opaque)->app;
    uint8_t *gt;
    int ret;

    if (a->ext == e && a->gi == gi) {
        return 0;
    }
    if ((ret = vmdk_append_put_gt(img, err)) < 0) {
        return ret;
    }
    if ((ret = vmdk_gt_load(img, e, e->gd[gi] * VMDK_SECTOR, &gt, err)) < 0) {
        return ret;
    }
    for (uint32_t i = 0; i < e->gtes; i++) {
        a->gt[i] = vimg_ld_le32(gt + (size_t)i * 4);
        if (a->gt[i]) {
            vimg_error_set(err, EIO, "'%s': grain table %" PRIu64 " of a new image is not "
                           "empty", e->file->name, gi);
            return -EIO;
        }
    }
    a->ext = e;
    a->gi = gi;
    return 0;
}

static int vmdk_append_start(struct vimg_image *img, struct vimg_error *err)
{
    struct vmdk_state *s = img->opaque;
    struct vmdk_append *a = &s->app;
    uint32_t gtes = 0;
    int ret;

    if (!vmdk_append_eligible(img)) {
        a->state = VMDK_APPEND_OFF;
        return 0;
    }
    for (size_t i = 0; i < s->n; i++) {
        gtes = VIMG_MAX(gtes, s->ext[i].gtes);
    }
    a->gt = calloc(gtes ? gtes : 1, sizeof(uint32_t));
    if (!a->gt) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    a->ext = NULL;
    a->fill_ext = NULL;
    /* the first write changes the CID, as qemu's does; then the image
     * reads as empty until commit */
    if ((ret = vmdk_cid_update(img, err)) < 0 ||
        (ret = vmdk_append_put_dirs(img, false, err)) < 0) {
        free(a->gt);
        a->gt = NULL;
        a->state = VMDK_APPEND_OFF;
        return ret;
    }
    a->state = VMDK_APPEND_ON;
    return 0;
}

int vmdk_alloc_data(struct vimg_image *img, uint64_t offset, uint64_t len,
                    struct vimg_run *run, struct vimg_error *err)
{
    struct vmdk_state *s = img->opaque;
    struct vmdk_append *a = &s->app;
    struct vmdk_extent *e;
    uint64_t r, gi, pos, end, host0 = 0;
    int ret;

    if (VMDK_APPEND_UNKNOWN == a->state && (ret = vmdk_append_start(img, err)) < 0) {
        return ret;
    }
    if (VMDK_APPEND_ON != a->state) {
        /* the engine falls back to plain writes; no message */
        return -ENOTSUP;
    }
    e = vmdk_find(s, offset);
    if (!len || !e) {
        vimg_error_set(err, EINVAL, "'%s': no data to place at offset %" PRIu64,
                       img->filename, offset);
        return -EINVAL;
    }
    r = offset - e->start;
    gi = r / e->gt_cover;
    if (gi >= e->l1_size) {
        vimg_error_set(err, EIO, "'%s': offset %" PRIu64 " lies beyond the grain directory",
                       img->filename, offset);
        return -EIO;
    }
    if (a->ext && (e < a->ext || (e == a->ext && gi < a->gi))) {
        vimg_error_set(err, EINVAL, "'%s': append-mode writes must come in guest order",
                       img->filename);
        return -EINVAL;
    }
    if ((ret = vmdk_append_hold(img, e, gi, err)) < 0) {
        return ret;
    }
    /* one contiguous host run, within this grain table's span */
    end = VIMG_MIN(r + len, VIMG_MIN((gi + 1) * e->gt_cover, e->length));
    for (pos = r; pos < end;) {
        uint64_t ti = (pos % e->gt_cover) / e->grain, in = pos % e->grain;
        uint64_t host = (uint64_t)a->gt[ti] * VMDK_SECTOR;

        if (!host) {
            if (host0 && e->next_alloc != host0 + (pos - r)) {
                break;
            }
            if ((ret = vmdk_check_alloc(e, e->grain, err)) < 0) {
                if (host0) {
                    break;
                }
                return ret;
            }
            host = e->next_alloc;
            e->next_alloc += e->grain;
            a->gt[ti] = (uint32_t)(host / VMDK_SECTOR);
            a->gt_dirty = true;
            if (in && (ret = vmdk_append_zero(img, e, host, host + in, err)) < 0) {
                return ret;
            }
        }
        if (!host0) {
            if ((ret = vmdk_append_fill_tail(img, e, host + in, err)) < 0) {
                return ret;
            }
            host0 = host + in;
        } else if (host + in != host0 + (pos - r)) {
            break;
        }
        pos += VIMG_MIN(e->grain - in, end - pos);
    }
    run->flags = VIMG_RUN_HOST_VALID;
    run->host = e->file;
    run->host_off = host0;
    run->length = pos - r;
    if ((host0 + run->length) % e->grain) {
        a->fill_ext = e;
        a->fill_from = host0 + run->length;
    }
    return 0;
}

int vmdk_append_commit(struct vimg_image *img, struct vimg_error *err)
{
    struct vmdk_state *s = img->opaque;
    struct vmdk_append *a = &s->app;
    int ret;

    if (VMDK_APPEND_ON != a->state) {
        a->state = VMDK_APPEND_OFF;
        return 0;
    }
    a->state = VMDK_APPEND_OFF;
    ret = vmdk_append_fill_tail(img, NULL, 0, err);
    if (ret >= 0) {
        ret = vmdk_append_put_gt(img, err);
    }
    free(a->gt);
    a->gt = NULL;
    free(a->zbuf);
    a->zbuf = NULL;
    a->ext = NULL;
    /* every file covers the grains handed out, even one whose tail the
     * engine never wrote; data and tables reach the disk before the
     * directories that make them reachable */
    for (size_t i = 0; i < s->n && ret >= 0; i++) {
        struct vmdk_extent *e = &s->ext[i];
        if ((ret = vimg_file_cover(e->file, e->next_alloc)) < 0) {
            vmdk_io_error(err, ret, "extending", e->file, e->next_alloc);
        } else if ((ret = vimg_file_sync(e->file)) < 0) {
            vmdk_io_error(err, ret, "flushing", e->file, 0);
        }
    }
    if (ret < 0) {
        return ret;
    }
    return vmdk_append_put_dirs(img, true, err);
}

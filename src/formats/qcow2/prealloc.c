/*
 * vimg preallocate on an existing qcow2 image: every guest cluster without
 * host space gets its own, and what the guest reads stays the same.
 * Clusters that read as zeros (unallocated without backing data, or zero
 * clusters) get fresh host clusters holding zeros and plain L2 entries,
 * one write per run of such clusters; clusters whose content shows
 * through from the backing image (or an extended-L2 cluster with such
 * subclusters) are copied up through the normal write path.  Data,
 * compressed and preallocated-zero clusters are left alone.
 * The core fills the holes of the host file afterwards for falloc/full.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2/qcow2.h"
#include "util/util.h"

enum { PA_SKIP, PA_META, PA_COPY };

/* What the backing chain shows through an unallocated cluster. */
static int qcow2_pa_backing_kind(struct vimg_image *img, uint64_t gc, uint64_t len,
                                 int *kind, struct vimg_error *err)
{
    *kind = PA_META;
    if (!img->backing) {
        return 0;
    }
    for (uint64_t off = gc; off < gc + len;) {
        struct vimg_status st;
        int ret = vimg_block_status(img, off, gc + len - off, &st, err);
        if (ret < 0) {
            return ret;
        }
        if (!(st.flags & VIMG_STATUS_ZERO)) {
            *kind = PA_COPY;
            return 0;
        }
        off += st.length;
    }
    return 0;
}

static int qcow2_pa_kind(struct vimg_image *img, uint64_t gc, int *kind,
                         struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t l1_idx = gc >> (s->cluster_bits + s->l2_bits);
    uint64_t l2_off = s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK;
    uint64_t entry = 0, bitmap = 0, len = VIMG_MIN(s->cluster_size, img->size - gc);
    uint8_t *l2;
    int ret;

    if (l2_off) {
        ret = qcow2_read_l2(img, l2_off, &l2, err);
        if (ret < 0) {
            return ret;
        }
        uint64_t idx = (gc >> s->cluster_bits) & (s->l2_entries - 1);
        entry = qcow2_l2_entry(s, l2, idx);
        bitmap = qcow2_l2_bitmap(s, l2, idx);
    }
    *kind = PA_SKIP;
    if (entry & QCOW2_OFLAG_COMPRESSED) {
        return 0;
    }
    if (entry & QCOW2_L2E_OFFSET_MASK) {
        /* extended L2: subclusters neither allocated nor zero still show
         * the backing file; the whole cluster is written then */
        if (s->ext_l2 && ((bitmap | (bitmap >> 32)) & 0xffffffffull) != 0xffffffffull) {
            *kind = PA_COPY;
        }
        return 0;
    }
    if (s->ext_l2) {
        /* no host cluster: every subcluster is zero or unallocated */
        if (bitmap & 0xffffffffull) {
            return 0;
        }
        if ((bitmap >> 32) == 0xffffffffull) {
            *kind = PA_META;
            return 0;
        }
        return qcow2_pa_backing_kind(img, gc, len, kind, err);
    }
    switch (qcow2_entry_type(s, entry, 0, 0)) {
    case QCOW2_C_ZERO:
        *kind = PA_META;
        return 0;
    case QCOW2_C_UNALLOC:
        return qcow2_pa_backing_kind(img, gc, len, kind, err);
    default:
        return 0;
    }
}

/* n clusters from guest gc (one L2 table) that read as zeros: host
 * clusters of zeros and plain entries. */
static int qcow2_pa_meta(struct vimg_image *img, uint64_t gc, uint64_t n,
                         struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t l1_idx = gc >> (s->cluster_bits + s->l2_bits);
    uint64_t idx = (gc >> s->cluster_bits) & (s->l2_entries - 1);
    uint64_t l2_off, host, end;
    int64_t fsize;
    uint8_t *l2;
    int ret;

    ret = qcow2_get_l2_for_write(img, l1_idx, &l2_off, err);
    if (ret < 0) {
        return ret;
    }
    ret = qcow2_alloc_clusters(img, n, &host, err);
    if (ret < 0) {
        return ret;
    }
    end = host + n * s->cluster_size;
    fsize = vimg_file_size(img->file);
    if (fsize < 0) {
        return qcow2_io_error(img, (int)fsize, "Could not get file size", err);
    }
    if (host < (uint64_t)fsize) {
        /* a freed cluster may hold old data */
        ret = img->file->ops->zero(img->file, host, VIMG_MIN(end, (uint64_t)fsize) - host,
                                   true);
    } else {
        ret = 0;
    }
    if (0 == ret && (uint64_t)fsize < end) {
        ret = img->file->ops->truncate(img->file, end);
    }
    if (ret < 0) {
        return qcow2_io_error(img, ret, "Could not preallocate data", err);
    }
    ret = qcow2_read_l2(img, l2_off, &l2, err);
    if (ret < 0) {
        return ret;
    }
    for (uint64_t i = 0; i < n; i++) {
        uint8_t *e = l2 + (idx + i) * s->l2_entry_size;
        vimg_st_be64(e, (host + i * s->cluster_size) | QCOW2_OFLAG_COPIED);
        if (s->ext_l2) {
            vimg_st_be64(e + 8, 0xffffffffull);
        }
    }
    ret = vimg_file_pwrite(img->file, l2 + idx * s->l2_entry_size, n * s->l2_entry_size,
                           l2_off + idx * s->l2_entry_size);
    if (ret < 0) {
        qcow2_cache_drop(&s->l2_cache, l2_off);
        return qcow2_io_error(img, ret, "Could not write L2 table", err);
    }
    return 0;
}

int qcow2_preallocate(struct vimg_image *img, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t cs = s->cluster_size, span = cs << s->l2_bits;
    uint8_t *buf = NULL;
    int ret;

    if (s->incompat & QCOW2_INCOMPAT_DATAFILE) {
        vimg_error_set(err, ENOTSUP, "'%s': preallocate does not support images with an "
                       "external data file", img->filename);
        return -ENOTSUP;
    }
    ret = qcow2_mark_dirty(img, err);
    for (uint64_t gc = 0; ret >= 0 && gc < img->size;) {
        uint64_t span_end = VIMG_MIN(img->size, (gc / span + 1) * span), n = 1;
        int kind, next;

        ret = qcow2_pa_kind(img, gc, &kind, err);
        if (ret < 0) {
            break;
        }
        if (PA_COPY == kind) {
            size_t len = (size_t)VIMG_MIN(cs, img->size - gc);
            if (!buf && !(buf = malloc(cs))) {
                vimg_error_set(err, ENOMEM, "out of memory");
                ret = -ENOMEM;
                break;
            }
            ret = vimg_pread(img, buf, len, gc, err);
            if (ret >= 0) {
                ret = qcow2_write(img, buf, len, gc, err);
            }
        } else if (PA_META == kind) {
            while (gc + n * cs < span_end) {
                ret = qcow2_pa_kind(img, gc + n * cs, &next, err);
                if (ret < 0 || PA_META != next) {
                    break;
                }
                n++;
            }
            if (ret >= 0) {
                ret = qcow2_pa_meta(img, gc, n, err);
            }
        }
        gc += n * cs;
    }
    free(buf);
    if (ret < 0) {
        return ret;
    }
    return qcow2_flush(img, err);
}

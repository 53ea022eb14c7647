/*
 * The append-mode writer (driver.h, alloc_data): convert into a fresh qcow2
 * image hands data clusters out at the end of the file in guest order and
 * lets the copy engine write them itself, asynchronously.  Only the L2
 * table being filled lives in memory; it goes to the append point once the
 * guest offsets move past its span.  Refcounts and L1 entries are written
 * once, at commit: refcounts first, then the L1 table, so the image is
 * valid at every step (a crash before the L1 write only leaks clusters).
 *
 * Any other kind of write (a plain write, zeroes, discard, compressed data,
 * resize) commits first and turns the writer off: from then on the normal
 * write path, which sees the committed metadata, does everything.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2/qcow2.h"
#include "util/util.h"

static bool qcow2_append_eligible(struct vimg_image *img)
{
    struct qcow2_state *s = qcow2_s(img);

    /* copy-on-write from a backing file, subcluster bitmaps and external
     * data files need the normal path; so does anything already mapped */
    if (!(img->flags & VIMG_OPEN_RDWR) || s->backing_name || s->ext_l2 ||
        (s->incompat & QCOW2_INCOMPAT_DATAFILE) || s->data_file != img->file ||
        s->nb_snapshots || s->needs_repair || s->repair_failed) {
        return false;
    }
    for (uint32_t i = 0; i < s->l1_size; i++) {
        if (s->l1[i]) {
            return false;
        }
    }
    return true;
}

/* Zeros for the bytes of a cluster handed out that the engine will not
 * write (before the first run in it, or after the last): qemu-img writes
 * whole clusters, and a host file that holds the zeros maps the same. */
static int qcow2_append_zero(struct vimg_image *img, uint64_t from, uint64_t to,
                             struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    struct qcow2_append *a = &s->app;
    int ret;

    if (from >= to) {
        return 0;
    }
    if (!a->zbuf && !(a->zbuf = calloc(1, s->cluster_size))) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    ret = vimg_file_pwrite(img->file, a->zbuf, (size_t)(to - from), from);
    return ret < 0 ? qcow2_io_error(img, ret, "Could not write data", err) : 0;
}

/* Fill the rest of the cluster the previous run ended in, up to host
 * offset upto when the next run continues in it (0: to its end). */
static int qcow2_append_fill_tail(struct vimg_image *img, uint64_t upto,
                                  struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    struct qcow2_append *a = &s->app;
    uint64_t from = a->fill_from, end;

    if (!from) {
        return 0;
    }
    a->fill_from = 0;
    end = (from | (s->cluster_size - 1)) + 1;
    if (upto > from && upto < end) {
        end = upto;
    }
    return qcow2_append_zero(img, from, end, err);
}

/* The filled L2 table goes to the cluster reserved for it; its L1 entry
 * waits for commit, in memory. */
static int qcow2_append_put_table(struct vimg_image *img, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    struct qcow2_append *a = &s->app;
    int ret;

    if (!a->tbl_used) {
        return 0;
    }
    ret = vimg_file_pwrite(img->file, a->tbl, s->cluster_size, a->tbl_host);
    if (ret < 0) {
        return qcow2_io_error(img, ret, "Could not write L2 table", err);
    }
    s->l1[a->l1_idx] = a->tbl_host | QCOW2_OFLAG_COPIED;
    a->tbl_used = false;
    memset(a->tbl, 0, s->cluster_size);
    return 0;
}

int qcow2_alloc_data(struct vimg_image *img, uint64_t offset, uint64_t len,
                     struct vimg_run *run, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    struct qcow2_append *a = &s->app;
    uint64_t cs = s->cluster_size, l1_idx, pos, end, host0 = 0;
    int ret;

    if (QCOW2_APPEND_UNKNOWN == a->state) {
        int64_t fsize = vimg_file_size(img->file);
        if (fsize < 0) {
            return qcow2_io_error(img, (int)fsize, "Could not get file size", err);
        }
        if (!qcow2_append_eligible(img)) {
            a->state = QCOW2_APPEND_OFF;
        } else {
            a->tbl = calloc(1, cs);
            if (!a->tbl) {
                vimg_error_set(err, ENOMEM, "out of memory");
                return -ENOMEM;
            }
            a->start = a->next = (vimg_div_round_up((uint64_t)fsize, cs) * cs);
            a->l1_idx = UINT64_MAX;
            a->state = QCOW2_APPEND_ON;
        }
    }
    if (QCOW2_APPEND_ON != a->state) {
        /* the engine falls back to plain writes; no message */
        return -ENOTSUP;
    }
    if (!len || offset >= img->size) {
        vimg_error_set(err, EINVAL, "'%s': no data to place at offset %" PRIu64,
                       img->filename, offset);
        return -EINVAL;
    }
    l1_idx = offset >> (s->cluster_bits + s->l2_bits);
    if (l1_idx >= s->l1_size) {
        vimg_error_set(err, EIO, "'%s': offset %" PRIu64 " lies beyond the L1 table",
                       img->filename, offset);
        return -EIO;
    }
    if (l1_idx != a->l1_idx) {
        if (a->l1_idx != UINT64_MAX && l1_idx < a->l1_idx) {
            vimg_error_set(err, EINVAL, "'%s': append-mode writes must come in guest "
                           "order", img->filename);
            return -EINVAL;
        }
        ret = qcow2_append_put_table(img, err);
        if (ret < 0) {
            return ret;
        }
        a->l1_idx = l1_idx;
    }
    /* one contiguous host run, within this L2 table's span */
    end = VIMG_MIN(offset + len, (l1_idx + 1) << (s->cluster_bits + s->l2_bits));
    end = VIMG_MIN(end, (vimg_div_round_up(img->size, cs) * cs));
    for (pos = offset; pos < end;) {
        uint64_t l2i = (pos >> s->cluster_bits) & (s->l2_entries - 1);
        uint64_t in = pos & (cs - 1);
        uint64_t host = vimg_ld_be64(a->tbl + l2i * 8) & QCOW2_L2E_OFFSET_MASK;

        if (!host) {
            if (!a->tbl_used) {
                /* the table's cluster comes before its first data cluster,
                 * where qemu-img puts it */
                a->tbl_host = a->next;
                a->next += cs;
                a->tbl_used = true;
            }
            if (host0 && a->next != host0 + (pos - offset)) {
                break;
            }
            if (a->next + cs > QCOW2_L2E_OFFSET_MASK + 1 - cs) {
                if (host0) {
                    break;
                }
                vimg_error_set(err, EFBIG, "'%s': the image file would grow past the "
                               "largest offset qcow2 can record", img->filename);
                return -EFBIG;
            }
            host = a->next;
            a->next += cs;
            vimg_st_be64(a->tbl + l2i * 8, host | QCOW2_OFLAG_COPIED);
            if (in) {
                ret = qcow2_append_zero(img, host, host + in, err);
                if (ret < 0) {
                    return ret;
                }
            }
        }
        if (!host0) {
            ret = qcow2_append_fill_tail(img, host + in, err);
            if (ret < 0) {
                return ret;
            }
            host0 = host + in;
        } else if (host + in != host0 + (pos - offset)) {
            break;
        }
        pos += VIMG_MIN(cs - in, end - pos);
    }
    run->flags = VIMG_RUN_HOST_VALID;
    run->host = img->file;
    run->host_off = host0;
    run->length = pos - offset;
    if ((host0 + run->length) & (cs - 1)) {
        a->fill_from = host0 + run->length;
    }
    return 0;
}

int qcow2_append_commit(struct vimg_image *img, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    struct qcow2_append *a = &s->app;
    uint64_t *l1 = NULL;
    int ret;

    if (QCOW2_APPEND_ON != a->state) {
        a->state = QCOW2_APPEND_OFF;
        return 0;
    }
    a->state = QCOW2_APPEND_OFF;
    ret = qcow2_append_fill_tail(img, 0, err);
    if (ret >= 0) {
        ret = qcow2_append_put_table(img, err);
    }
    free(a->tbl);
    a->tbl = NULL;
    free(a->zbuf);
    a->zbuf = NULL;
    if (ret < 0 || a->next == a->start) {
        return ret;
    }
    if ((ret = vimg_file_cover(img->file, a->next)) < 0) {
        return qcow2_io_error(img, ret, "Could not extend the image file", err);
    }
    /* data and tables before the refcounts that claim them, refcounts
     * before the L1 entries that reference the tables */
    ret = vimg_file_sync(img->file);
    if (ret < 0) {
        return qcow2_io_error(img, ret, "Could not flush", err);
    }
    /* New refcount blocks must land past the appended area, which has no
     * refcounts yet and would look free.  One refcount block's range at a
     * time: a block created midway through a larger update makes it undo
     * and retry, and the undo would move the free-cluster hint back into
     * the area. */
    for (uint64_t c = a->start >> s->cluster_bits, e = a->next >> s->cluster_bits; c < e;) {
        uint64_t n = VIMG_MIN(e - c, s->rb_entries - c % s->rb_entries);
        s->free_hint = VIMG_MAX(s->free_hint, e);
        ret = qcow2_update_refcount(img, c << s->cluster_bits, n << s->cluster_bits, 1, err);
        if (ret < 0) {
            return ret;
        }
        c += n;
    }
    ret = qcow2_cache_flush(img, &s->rb_cache, err);
    if (ret >= 0 && (ret = vimg_file_sync(img->file)) < 0) {
        qcow2_io_error(img, ret, "Could not flush", err);
    }
    if (ret < 0) {
        return ret;
    }
    l1 = malloc((size_t)s->l1_size * 8);
    if (!l1) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < s->l1_size; i++) {
        vimg_st_be64((uint8_t *)&l1[i], s->l1[i]);
    }
    ret = vimg_file_pwrite(img->file, l1, (size_t)s->l1_size * 8, s->l1_offset);
    free(l1);
    if (ret < 0) {
        return qcow2_io_error(img, ret, "Could not write L1 table", err);
    }
    return 0;
}

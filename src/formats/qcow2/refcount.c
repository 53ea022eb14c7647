/* qcow2 refcounts: lookups, updates (written through at once), refcount
 * block and table growth, and cluster allocation. */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2/qcow2.h"
#include "util/util.h"

uint64_t qcow2_rb_get(const struct qcow2_state *s, const uint8_t *rb, uint64_t i)
{
    switch (s->refcount_order) {
    case 0:
        return (rb[i / 8] >> (i % 8)) & 1;
    case 1:
        return (rb[i / 4] >> (2 * (i % 4))) & 3;
    case 2:
        return (rb[i / 2] >> (4 * (i % 2))) & 15;
    case 3:
        return rb[i];
    case 4:
        return vimg_ld_be16(rb + 2 * i);
    case 5:
        return vimg_ld_be32(rb + 4 * i);
    default:
        return vimg_ld_be64(rb + 8 * i);
    }
}

void qcow2_rb_set(const struct qcow2_state *s, uint8_t *rb, uint64_t i, uint64_t v)
{
    unsigned sh;
    switch (s->refcount_order) {
    case 0:
    case 1:
    case 2:
        sh = (unsigned)((i % (8u >> s->refcount_order)) << s->refcount_order);
        {
            uint8_t mask = (uint8_t)(((1u << s->refcount_bits) - 1) << sh);
            uint64_t byte = (i << s->refcount_order) / 8;
            rb[byte] = (uint8_t)((rb[byte] & ~mask) | ((v << sh) & mask));
        }
        break;
    case 3:
        rb[i] = (uint8_t)v;
        break;
    case 4:
        vimg_st_be16(rb + 2 * i, (uint16_t)v);
        break;
    case 5:
        vimg_st_be32(rb + 4 * i, (uint32_t)v);
        break;
    default:
        vimg_st_be64(rb + 8 * i, v);
        break;
    }
}

static int qcow2_load_rb(struct vimg_image *img, uint64_t rt_idx, uint8_t **rb,
                         uint64_t *rb_off, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t off;

    *rb = NULL;
    *rb_off = 0;
    if (rt_idx >= s->rt_size) {
        return 0;
    }
    off = s->rt[rt_idx] & QCOW2_REFT_OFFSET_MASK;
    if (!off) {
        return 0;
    }
    if (qcow2_offset_into_cluster(s, off)) {
        vimg_error_set(err, EIO, "'%s': Image is corrupt (unaligned refblock offset)",
                       img->filename);
        return -EIO;
    }
    *rb_off = off;
    return qcow2_cache_get(img, &s->rb_cache, off, true, rb, err);
}

int qcow2_get_refcount(struct vimg_image *img, uint64_t cluster, uint64_t *rc,
                       struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint8_t *rb;
    uint64_t rb_off;
    int ret = qcow2_load_rb(img, cluster / s->rb_entries, &rb, &rb_off, err);
    if (ret < 0) {
        return ret;
    }
    *rc = rb ? qcow2_rb_get(s, rb, cluster % s->rb_entries) : 0;
    return 0;
}

/* Write the bytes of refblock rb (at rb_off) that hold entries lo..hi. */
static int qcow2_rb_write_range(struct vimg_image *img, uint8_t *rb, uint64_t rb_off,
                                uint64_t lo, uint64_t hi, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t first = (lo << s->refcount_order) / 8;
    uint64_t end = (((hi + 1) << s->refcount_order) + 7) / 8;
    int ret = vimg_file_pwrite(img->file, rb + first, (size_t)(end - first), rb_off + first);
    if (ret < 0) {
        return qcow2_io_error(img, ret, "Could not write refcount block", err);
    }
    qcow2_cache_mark_dirty(&s->rb_cache, rb_off);
    return 0;
}

static int qcow2_update_rc_once(struct vimg_image *img, uint64_t host_off, uint64_t len,
                                int64_t delta, struct vimg_error *err);

/* qemu's search for free clusters: n in a row from the hint on, moving the
 * hint past them.  Nothing is marked used yet. */
static int qcow2_alloc_noref(struct vimg_image *img, uint64_t n, uint64_t *start,
                             struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t i = 0, rc, past_end = 0, fclusters = UINT64_MAX;
    int ret;

    while (i < n) {
        uint64_t c = s->free_hint++;
        ret = qcow2_get_refcount(img, c, &rc, err);
        if (ret < 0) {
            return ret;
        }
        if (rc) {
            /* Refcounts for clusters far past the end of the file are
             * corrupt; do not scan billions of them.  (The file size only
             * when needed: an fstat per allocation showed in profiles.) */
            if (UINT64_MAX == fclusters) {
                int64_t fsize = vimg_file_size(img->file);
                fclusters = fsize > 0 ? (uint64_t)fsize >> s->cluster_bits : 0;
            }
            if (c >= fclusters && ++past_end > 65536) {
                vimg_error_set(err, EIO, "'%s': no free cluster found: the refcounts "
                               "are corrupt", img->filename);
                return -EIO;
            }
            i = 0;
            continue;
        }
        i++;
        if (s->free_hint > (QCOW2_L2E_OFFSET_MASK >> s->cluster_bits)) {
            vimg_error_set(err, EFBIG, "'%s': no free cluster left", img->filename);
            return -EFBIG;
        }
    }
    *start = s->free_hint - n;
    if (0 == *start && !s->creating) {
        vimg_error_set(err, EIO, "'%s': Preventing invalid allocation at offset 0",
                       img->filename);
        return -EIO;
    }
    return 0;
}

/*
 * Create the refcount block for rt_idx (cluster c needs it).  As in qemu,
 * the block goes to the first free cluster, describing itself when it can,
 * and the caller is told to start over (-EAGAIN, no message): the block may
 * have landed where the caller meant to put its data.  When the table has
 * no entry rt_idx, qemu still places the block first and then builds a
 * larger table, with blocks describing it, at the start of the first
 * refcount block range past both the block and rt_idx's range.
 */
static int qcow2_alloc_rb(struct vimg_image *img, uint64_t rt_idx, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t nb;
    uint8_t *rb, ent[8];
    int ret;

    ret = qcow2_alloc_noref(img, 1, &nb, err);
    if (ret < 0) {
        return ret;
    }
    if (nb / s->rb_entries != rt_idx) {
        ret = qcow2_update_rc_once(img, nb << s->cluster_bits, 1, 1, err);
        if (ret < 0) {
            return ret;
        }
    }
    ret = qcow2_cache_get(img, &s->rb_cache, nb << s->cluster_bits, false, &rb, err);
    if (ret < 0) {
        return ret;
    }
    if (nb / s->rb_entries == rt_idx) {
        qcow2_rb_set(s, rb, nb % s->rb_entries, 1);
    }
    ret = vimg_file_pwrite(img->file, rb, s->cluster_size, nb << s->cluster_bits);
    if (ret < 0) {
        qcow2_cache_drop(&s->rb_cache, nb << s->cluster_bits);
        return qcow2_io_error(img, ret, "Could not write refcount block", err);
    }
    if (rt_idx >= s->rt_size) {
        uint64_t used = VIMG_MAX(rt_idx + 1, nb / s->rb_entries + 1), end;
        ret = qcow2_refcount_area(img, (used * s->rb_entries) << s->cluster_bits, 0, false,
                                  rt_idx, nb << s->cluster_bits, &end, err);
        return ret < 0 ? ret : -EAGAIN;
    }
    vimg_st_be64(ent, nb << s->cluster_bits);
    ret = vimg_file_pwrite(img->file, ent, 8, s->rt_offset + rt_idx * 8);
    if (ret < 0) {
        return qcow2_io_error(img, ret, "Could not update refcount table", err);
    }
    s->rt[rt_idx] = nb << s->cluster_bits;
    return -EAGAIN;
}

static int qcow2_update_rc_undo(struct vimg_image *img, uint64_t host_off, uint64_t len,
                                int64_t delta, bool undo, struct vimg_error *err);

static int qcow2_update_rc_once(struct vimg_image *img, uint64_t host_off, uint64_t len,
                                int64_t delta, struct vimg_error *err)
{
    return qcow2_update_rc_undo(img, host_off, len, delta, true, err);
}

/* undo: on failure, take back what was done (not done for the undo
 * itself, which would otherwise undo its own failure forever) */
static int qcow2_update_rc_undo(struct vimg_image *img, uint64_t host_off, uint64_t len,
                                int64_t delta, bool undo, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t first = host_off >> s->cluster_bits;
    uint64_t last, c;
    /* the changed entries of one block go out in one write (one per
     * cluster made large allocations cost a syscall each) */
    uint8_t *pend = NULL;
    uint64_t pend_idx = 0, pend_off = 0, pend_lo = 0, pend_hi = 0;
    int ret = 0;

    if (!len) {
        return 0;
    }
    last = (host_off + len - 1) >> s->cluster_bits;
    for (c = first; c <= last; c++) {
        uint64_t rt_idx = c / s->rb_entries, rb_off, v;
        uint8_t *rb;

        if (pend && rt_idx != pend_idx) {
            /* before the load: it may evict the pending block */
            ret = qcow2_rb_write_range(img, pend, pend_off, pend_lo, pend_hi, err);
            pend = NULL;
            if (ret < 0) {
                break;
            }
        }
        ret = qcow2_load_rb(img, rt_idx, &rb, &rb_off, err);
        if (ret < 0) {
            break;
        }
        if (!rb) {
            if (delta < 0) {
                vimg_error_set(err, EIO, "'%s': no refcount block for cluster %" PRIu64,
                               img->filename, c);
                ret = -EIO;
                break;
            }
            ret = qcow2_alloc_rb(img, rt_idx, err);
            break;
        }
        v = qcow2_rb_get(s, rb, c % s->rb_entries);
        if ((delta < 0 && v < (uint64_t)-delta) ||
            (delta > 0 && s->refcount_max - v < (uint64_t)delta)) {
            vimg_error_set(err, EINVAL, "'%s': refcount of cluster %" PRIu64
                           " would leave its range", img->filename, c);
            ret = -EINVAL;
            break;
        }
        v += (uint64_t)delta;
        qcow2_rb_set(s, rb, c % s->rb_entries, v);
        if (!pend) {
            pend = rb;
            pend_idx = rt_idx;
            pend_off = rb_off;
            pend_lo = c % s->rb_entries;
        }
        pend_hi = c % s->rb_entries;
        if (0 == v && c < s->free_hint) {
            s->free_hint = c;
        }
    }
    if (pend) {
        /* also on failure: the undo below reads these entries back */
        int r2 = qcow2_rb_write_range(img, pend, pend_off, pend_lo, pend_hi,
                                      ret < 0 ? &(struct vimg_error){ 0 } : err);
        if (ret >= 0) {
            ret = r2;
        }
    }
    if (undo && ret < 0 && c > first) {
        /* undo what was done; errors here only leak */
        struct vimg_error ign = { 0 };
        qcow2_update_rc_undo(img, first << s->cluster_bits,
                             (c - first) << s->cluster_bits, -delta, false, &ign);
    }
    return ret;
}

int qcow2_update_refcount(struct vimg_image *img, uint64_t host_off, uint64_t len,
                          int64_t delta, struct vimg_error *err)
{
    int ret;
    do {
        ret = qcow2_update_rc_once(img, host_off, len, delta, err);
    } while (-EAGAIN == ret);
    return ret;
}

int qcow2_alloc_clusters(struct vimg_image *img, uint64_t n, uint64_t *host_off,
                         struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t start;
    int ret;

    do {
        ret = qcow2_alloc_noref(img, n, &start, err);
        if (ret < 0) {
            return ret;
        }
        ret = qcow2_update_rc_once(img, start << s->cluster_bits, n << s->cluster_bits, 1,
                                   err);
        if (-EAGAIN == ret && s->free_hint > start) {
            /* a new refcount block took a cluster: search again from
             * here, as qemu does, so no free cluster is skipped */
            s->free_hint = start;
        }
    } while (-EAGAIN == ret);
    if (ret < 0) {
        return ret;
    }
    *host_off = start << s->cluster_bits;
    return 0;
}

/*
 * Room for len compressed bytes, packed as qemu packs them: right after the
 * previous compressed cluster, running on into the next host cluster when
 * that one is the next free cluster (so the data stays contiguous), else at
 * the start of a fresh cluster.  Every host cluster the bytes touch gets one
 * more reference, so a cluster shared by n compressed clusters has refcount
 * n.  A cluster whose refcount is already at the maximum (always, with
 * 1-bit refcounts) takes no more data: the next one starts a fresh cluster.
 */
int qcow2_alloc_bytes(struct vimg_image *img, uint64_t len, uint64_t *host_off,
                      struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t off = s->free_byte_off, room, c;
    int ret;

    if (0 == len || len > s->cluster_size) {
        vimg_error_set(err, EINVAL, "'%s': compressed data of %" PRIu64 " bytes does not "
                       "fit a cluster", img->filename, len);
        return -EINVAL;
    }
    if (off) {
        uint64_t rc;

        ret = qcow2_get_refcount(img, off >> s->cluster_bits, &rc, err);
        if (ret < 0) {
            return ret;
        }
        if (rc >= s->refcount_max) {
            off = 0;
        }
    }
    room = s->cluster_size - qcow2_offset_into_cluster(s, off);
    do {
        if (0 == off || room < len) {
            ret = qcow2_alloc_noref(img, 1, &c, err);
            if (ret < 0) {
                return ret;
            }
            c <<= s->cluster_bits;
            if (c > s->coffset_mask - (s->cluster_size - 1)) {
                /* the L2 entry of a compressed cluster holds fewer offset
                 * bits than a plain one (2 MiB clusters: 512 TiB) */
                vimg_error_set(err, EFBIG, "'%s': %s", img->filename, strerror(EFBIG));
                return -EFBIG;
            }
            if (0 != off && vimg_align_down(off, s->cluster_size) + s->cluster_size == c) {
                room += s->cluster_size;
            } else {
                off = c;
                room = s->cluster_size;
            }
        }
        ret = qcow2_update_rc_once(img, off, len, 1, err);
        if (-EAGAIN == ret && s->free_hint > (off >> s->cluster_bits)) {
            /* a new refcount block went to the first free cluster: look
             * again from where this attempt started, as qemu does, so the
             * cluster it had picked and is still free is not skipped */
            s->free_hint = off >> s->cluster_bits;
        }
        if (ret < 0) {
            /* as qemu: the retry starts a fresh cluster */
            off = 0;
        }
    } while (-EAGAIN == ret);
    if (ret < 0) {
        return ret;
    }
    *host_off = off;
    s->free_byte_off = off + len;
    if (0 == qcow2_offset_into_cluster(s, s->free_byte_off)) {
        s->free_byte_off = 0;
    }
    return 0;
}

/* Refcount blocks needed to count `clusters` clusters plus the refcount
 * blocks and table themselves (the fixed point), as qemu computes it;
 * `generous` leaves room for a table half as large again. */
uint64_t qcow2_rc_blocks_needed(uint64_t clusters, uint64_t cs, unsigned order,
                                bool generous, uint64_t *table_out)
{
    uint64_t per_table = cs / 8, per_block = (cs * 8) >> order;
    uint64_t table = 0, blocks = 0, n = 0, last;

    do {
        last = n;
        blocks = vimg_div_round_up(clusters + table + blocks, per_block);
        table = vimg_div_round_up(blocks, per_table);
        n = clusters + blocks + table;
        if (n == last && generous) {
            clusters += vimg_div_round_up(table, 2);
            n = 0;
            generous = false;
        }
    } while (n != last);
    if (table_out) {
        *table_out = table;
    }
    return blocks;
}

/*
 * qemu's refcount area (what its preallocation=falloc|full lays out): at
 * start, which must be past every used cluster, the missing refcount
 * blocks and then a new refcount table, together covering everything up
 * to start, themselves and `additional` clusters after them.  Blocks that
 * exist are kept, and new_rb_off (when not 0) becomes entry new_rb_idx.
 * The header switches to the new table in one write once the blocks and
 * the table are on disk, then the old table is freed.
 * *end is the first byte after the area, where the additional clusters
 * may go.
 */
int qcow2_refcount_area(struct vimg_image *img, uint64_t start, uint64_t additional,
                        bool exact, uint64_t new_rb_idx, uint64_t new_rb_off, uint64_t *end,
                        struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t cs = s->cluster_size;
    uint64_t total, area_idx, table_size, table_clusters, max_idx, ncopy, nnew = 0;
    uint64_t table_off, end_off, block_off;
    uint64_t old_off = s->rt_offset, old_clusters = s->rt_clusters;
    uint64_t *nrt;
    uint8_t hdr[12];
    int ret;

    total = qcow2_rc_blocks_needed(start / cs + additional, cs, s->refcount_order, !exact,
                                   NULL);
    if (total > QCOW2_MAX_REFTABLE_SIZE) {
        vimg_error_set(err, EFBIG, "%s", strerror(EFBIG));
        return -EFBIG;
    }
    area_idx = (start / cs) / s->rb_entries;
    table_size = exact ? total : total + vimg_div_round_up(total, 2);
    vimg_round_up(table_size, cs / 8, &table_size);
    table_clusters = table_size * 8 / cs;
    if (table_size > QCOW2_MAX_REFTABLE_SIZE) {
        vimg_error_set(err, EFBIG, "%s", strerror(EFBIG));
        return -EFBIG;
    }
    nrt = calloc(table_size, 8);
    if (!nrt) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    max_idx = 0;
    for (uint64_t i = s->rt_size; i > 1; i--) {
        if (s->rt[i - 1] & QCOW2_REFT_OFFSET_MASK) {
            max_idx = i - 1;
            break;
        }
    }
    /* a smaller table drops the blocks past it: nothing lies there */
    ncopy = VIMG_MIN(table_size > max_idx ? max_idx + 1 : table_size, s->rt_size);
    memcpy(nrt, s->rt, ncopy * 8);
    if (new_rb_off && new_rb_idx < total) {
        /* a block just placed for an index the old table does not have */
        nrt[new_rb_idx] = new_rb_off;
    }
    for (uint64_t i = area_idx; i < total; i++) {
        nnew += !nrt[i];
    }
    table_off = start + nnew * cs;
    end_off = table_off + table_clusters * cs;

    block_off = start;
    for (uint64_t i = area_idx; i < total; i++) {
        uint64_t first = i * s->rb_entries * cs, off;
        uint8_t *rb;

        if (nrt[i]) {
            off = nrt[i] & QCOW2_REFT_OFFSET_MASK;
            ret = qcow2_cache_get(img, &s->rb_cache, off, true, &rb, err);
        } else {
            off = block_off;
            ret = qcow2_cache_get(img, &s->rb_cache, off, false, &rb, err);
            nrt[i] = off;
            block_off += cs;
        }
        if (ret < 0) {
            goto fail;
        }
        if (first < end_off) {
            uint64_t j = first < start ? (start - first) / cs : 0;
            uint64_t lim = VIMG_MIN((end_off - first) / cs, s->rb_entries);
            for (; j < lim; j++) {
                qcow2_rb_set(s, rb, j, 1);
            }
        }
        ret = vimg_file_pwrite(img->file, rb, cs, off);
        if (ret < 0) {
            qcow2_cache_drop(&s->rb_cache, off);
            qcow2_io_error(img, ret, "Could not write refcount block", err);
            goto fail;
        }
    }
    for (uint64_t i = 0; i < table_size; i++) {
        nrt[i] = htobe64(nrt[i]);
    }
    ret = vimg_file_pwrite(img->file, nrt, table_size * 8, table_off);
    for (uint64_t i = 0; i < table_size; i++) {
        nrt[i] = be64toh(nrt[i]);
    }
    if (ret < 0 || (ret = vimg_file_sync(img->file)) < 0) {
        qcow2_io_error(img, ret, "Could not write refcount table", err);
        goto fail;
    }
    vimg_st_be64(hdr, table_off);
    vimg_st_be32(hdr + 8, (uint32_t)table_clusters);
    ret = vimg_file_pwrite(img->file, hdr, 12, 48);
    if (ret < 0 || (ret = vimg_file_sync(img->file)) < 0) {
        qcow2_io_error(img, ret, "Could not switch to the new refcount table", err);
        goto fail;
    }
    free(s->rt);
    s->rt = nrt;
    s->rt_size = table_size;
    s->rt_offset = table_off;
    s->rt_clusters = (uint32_t)table_clusters;
    *end = end_off;
    return qcow2_update_refcount(img, old_off, old_clusters * cs, -1, err);
fail:
    free(nrt);
    return ret;
}

int qcow2_clusters_in_use(struct vimg_image *img, uint64_t fsize, uint64_t *n,
                          struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t last = vimg_div_round_up(fsize, s->cluster_size);

    while (last > 0) {
        uint64_t rc;
        int ret = qcow2_get_refcount(img, last - 1, &rc, err);
        if (ret < 0) {
            return ret;
        }
        if (rc) {
            break;
        }
        last--;
    }
    *n = last;
    return 0;
}

/*
 * qcow2 check: count every reference the metadata makes, compare with the
 * stored refcounts, check the COPIED flags, and repair leaks and refcount
 * errors when asked.  Follows qemu's order so the per-item lines (kept in
 * res->log for the CLI to print on stderr) and the counts match.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2/qcow2.h"
#include "util/util.h"

#define CHECK_FRAG 2

struct qcow2_ck {
    struct vimg_image *img;
    struct qcow2_state *s;
    struct vimg_check_result *res;
    uint32_t *refs;           /* computed references per host cluster */
    uint64_t nb;              /* clusters covered (file length, maybe +1) */
    uint64_t cap;
    int64_t file_len;
    bool rebuild;
    char *log;
    size_t log_len, log_cap;
};

static void qcow2_ck_log(struct qcow2_ck *c, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    if (n < 0) {
        return;
    }
    if ((size_t)n >= sizeof(line)) {
        n = sizeof(line) - 1;
    }
    /* bounded: a hostile image could otherwise make the log huge */
    if (c->log_len > (16u << 20)) {
        return;
    }
    if (c->log_len + (size_t)n + 1 > c->log_cap) {
        /* geometric: one realloc per line made a long log quadratic */
        size_t ncap = VIMG_MAX(c->log_cap * 2, c->log_len + (size_t)n + 1);
        ncap = VIMG_MAX(ncap, (size_t)4096);
        char *p = realloc(c->log, ncap);
        if (!p) {
            return;
        }
        c->log = p;
        c->log_cap = ncap;
    }
    memcpy(c->log + c->log_len, line, (size_t)n + 1);
    c->log_len += (size_t)n;
}

static int qcow2_ck_inc(struct qcow2_ck *c, uint64_t off, uint64_t size)
{
    struct qcow2_state *s = c->s;
    uint64_t start, last;

    if (!size) {
        return 0;
    }
    /* unsigned on purpose: an offset with the top bit set must not wrap
     * into a negative distance and slip past this bound */
    if (off + size < off ||
        off + size >= (uint64_t)c->file_len + s->cluster_size) {
        qcow2_ck_log(c, "ERROR: counting reference for region exceeding the end of the "
                     "file by one cluster or more: offset 0x%" PRIx64 " size 0x%" PRIx64 "\n",
                     off, size);
        c->res->corruptions++;
        return 0;
    }
    start = off >> s->cluster_bits;
    last = (off + size - 1) >> s->cluster_bits;
    for (uint64_t k = start; k <= last; k++) {
        if (k >= c->cap) {
            /* at most one cluster past the end (checked above) */
            uint64_t ncap = k + 1;
            uint32_t *n = realloc(c->refs, ncap * sizeof(*n));
            if (!n) {
                c->res->check_errors++;
                return -ENOMEM;
            }
            memset(n + c->cap, 0, (ncap - c->cap) * sizeof(*n));
            c->refs = n;
            c->cap = ncap;
        }
        if (k >= c->nb) {
            c->nb = k + 1;
        }
        if (c->refs[k] >= VIMG_MIN(s->refcount_max, (uint64_t)UINT32_MAX)) {
            qcow2_ck_log(c, "ERROR: overflow cluster offset=0x%" PRIx64 "\n",
                         k << s->cluster_bits);
            qcow2_ck_log(c, "Use qemu-img amend to increase the refcount entry width or "
                         "qemu-img convert to create a clean copy if the image cannot be "
                         "opened for writing\n");
            c->res->corruptions++;
            continue;
        }
        c->refs[k]++;
    }
    return 0;
}

static int qcow2_ck_l2(struct qcow2_ck *c, uint64_t l2_off, int flags)
{
    struct qcow2_state *s = c->s;
    bool data_file = !!(s->incompat & QCOW2_INCOMPAT_DATAFILE);
    uint64_t next = 0;
    uint8_t *l2 = malloc(s->cluster_size);
    int ret;

    if (!l2) {
        c->res->check_errors++;
        return -ENOMEM;
    }
    ret = vimg_file_pread(c->img->file, l2, s->cluster_size, l2_off);
    if (ret < 0) {
        qcow2_ck_log(c, "ERROR: I/O error in check_refcounts_l2\n");
        c->res->check_errors++;
        free(l2);
        return ret;
    }
    for (uint64_t i = 0; i < s->l2_entries; i++) {
        uint64_t e = qcow2_l2_entry(s, l2, i);
        uint64_t bm = qcow2_l2_bitmap(s, l2, i);
        uint64_t off = e & QCOW2_L2E_OFFSET_MASK;
        bool compressed = !!(e & QCOW2_OFLAG_COMPRESSED);
        bool zero_plain = false, unalloc = false;

        if (!compressed) {
            if (e & QCOW2_L2E_RESERVED) {
                qcow2_ck_log(c, "ERROR found l2 entry with reserved bits set: %" PRIx64 "\n",
                             e);
                c->res->corruptions++;
            }
            if ((e & QCOW2_OFLAG_ZERO) && !s->ext_l2 && !off) {
                zero_plain = true;
            } else if (!off && !(data_file && (e & QCOW2_OFLAG_COPIED)) &&
                       !((e & QCOW2_OFLAG_ZERO) && !s->ext_l2)) {
                unalloc = true;
            }
        }
        if (compressed) {
            uint64_t host, n;
            if (e & QCOW2_OFLAG_COPIED) {
                qcow2_ck_log(c, "ERROR: coffset=0x%" PRIx64 ": copied flag must never be "
                             "set for compressed clusters\n", e & s->coffset_mask);
                e &= ~QCOW2_OFLAG_COPIED;
                c->res->corruptions++;
            }
            if (data_file) {
                qcow2_ck_log(c, "ERROR compressed cluster %d with data file, entry=0x%"
                             PRIx64 "\n", (int)i, e);
                c->res->corruptions++;
                continue;
            }
            if (bm) {
                qcow2_ck_log(c, "ERROR compressed cluster %d with non-zero subcluster "
                             "allocation bitmap, entry=0x%" PRIx64 "\n", (int)i, e);
                c->res->corruptions++;
                continue;
            }
            qcow2_compressed_range(s, e, &host, &n);
            ret = qcow2_ck_inc(c, host, n);
            if (ret < 0) {
                break;
            }
            if (flags & CHECK_FRAG) {
                c->res->allocated_clusters++;
                c->res->compressed_clusters++;
                c->res->fragmented_clusters++;
            }
        } else if (zero_plain) {
            /* nothing referenced */
        } else if (unalloc) {
            if (bm & 0xffffffffull) {
                c->res->corruptions++;
                qcow2_ck_log(c, "ERROR: Unallocated cluster has non-zero subcluster "
                             "allocation map\n");
            }
        } else {
            if ((bm >> 32) & bm) {
                c->res->corruptions++;
                qcow2_ck_log(c, "ERROR offset=%" PRIx64 ": Allocated cluster has corrupted "
                             "subcluster allocation bitmap\n", off);
            }
            if (qcow2_offset_into_cluster(s, off)) {
                bool has_data = s->ext_l2 ? !!(bm & 0xffffffffull)
                                          : !(e & QCOW2_OFLAG_ZERO);
                c->res->corruptions++;
                if (!has_data) {
                    qcow2_ck_log(c, "ERROR offset=%" PRIx64 ": Preallocated cluster is not "
                                 "properly aligned; L2 entry corrupted.\n", off);
                } else {
                    qcow2_ck_log(c, "ERROR offset=%" PRIx64 ": Data cluster is not "
                                 "properly aligned; L2 entry corrupted.\n", off);
                }
            }
            if (flags & CHECK_FRAG) {
                c->res->allocated_clusters++;
                if (next && off != next) {
                    c->res->fragmented_clusters++;
                }
                next = off + s->cluster_size;
            }
            if (!data_file) {
                ret = qcow2_ck_inc(c, off, s->cluster_size);
                if (ret < 0) {
                    break;
                }
            }
        }
    }
    free(l2);
    return ret < 0 ? ret : 0;
}

static int qcow2_ck_l1(struct qcow2_ck *c, uint64_t l1_off, uint32_t l1_size, int flags)
{
    struct qcow2_state *s = c->s;
    uint64_t bytes = (uint64_t)l1_size * 8;
    uint64_t *l1;
    int ret;

    ret = qcow2_ck_inc(c, l1_off, bytes);
    if (ret < 0 || !l1_size) {
        return ret;
    }
    if (l1_off > (uint64_t)c->file_len || bytes > (uint64_t)c->file_len - l1_off) {
        /* already counted as a reference past the end; nothing to read */
        return 0;
    }
    l1 = malloc(bytes);
    if (!l1) {
        c->res->check_errors++;
        return -ENOMEM;
    }
    ret = vimg_file_pread(c->img->file, l1, bytes, l1_off);
    if (ret < 0) {
        qcow2_ck_log(c, "ERROR: I/O error in check_refcounts_l1\n");
        c->res->check_errors++;
        free(l1);
        return ret;
    }
    for (uint32_t i = 0; i < l1_size; i++) {
        uint64_t e = be64toh(l1[i]), l2_off;
        if (!e) {
            continue;
        }
        if (e & QCOW2_L1E_RESERVED) {
            qcow2_ck_log(c, "ERROR found L1 entry with reserved bits set: %" PRIx64 "\n", e);
            c->res->corruptions++;
        }
        l2_off = e & QCOW2_L1E_OFFSET_MASK;
        ret = qcow2_ck_inc(c, l2_off, s->cluster_size);
        if (ret < 0) {
            break;
        }
        if (qcow2_offset_into_cluster(s, l2_off)) {
            qcow2_ck_log(c, "ERROR l2_offset=%" PRIx64 ": Table is not cluster aligned; L1 "
                         "entry corrupted\n", l2_off);
            c->res->corruptions++;
        }
        ret = qcow2_ck_l2(c, l2_off, flags);
        if (ret < 0) {
            break;
        }
    }
    free(l1);
    return ret < 0 ? ret : 0;
}

/* Snapshot table length as stored (entries are 8-byte aligned). */
static uint64_t qcow2_ck_snap_size(struct qcow2_state *s)
{
    uint64_t len = 0;
    for (uint32_t i = 0; s->snapshots && i < s->nb_snapshots; i++) {
        len = (len + 7) & ~7ull;
        len += QCOW2_SNAPSHOT_HEADER + s->snapshots[i].extra_size +
               strlen(s->snapshots[i].id) + strlen(s->snapshots[i].name);
    }
    return len;
}

static int qcow2_ck_bitmaps(struct qcow2_ck *c)
{
    struct qcow2_state *s = c->s;
    uint64_t dir_size, dir_off;
    uint8_t *dir;
    int ret;

    if (!s->has_bitmaps_ext) {
        return 0;
    }
    dir_size = vimg_ld_be64(s->bitmaps_ext + 8);
    dir_off = vimg_ld_be64(s->bitmaps_ext + 16);
    ret = qcow2_ck_inc(c, dir_off, dir_size);
    if (ret < 0 || !dir_size || dir_off > (uint64_t)c->file_len ||
        dir_size > (uint64_t)c->file_len - dir_off) {
        return ret;
    }
    dir = malloc(dir_size);
    if (!dir) {
        c->res->check_errors++;
        return -ENOMEM;
    }
    ret = vimg_file_pread(c->img->file, dir, dir_size, dir_off);
    for (uint64_t p = 0; ret >= 0 && p + 24 <= dir_size;) {
        uint64_t tbl = vimg_ld_be64(dir + p);
        uint32_t tsize = vimg_ld_be32(dir + p + 8);
        uint32_t name = vimg_ld_be16(dir + p + 18);
        uint32_t extra = vimg_ld_be32(dir + p + 20);
        if ((uint64_t)tsize * 8 <= (uint64_t)c->file_len) {
            ret = qcow2_ck_inc(c, tbl, (uint64_t)tsize * 8);
            if (ret >= 0 && tsize && tbl <= (uint64_t)c->file_len &&
                (uint64_t)tsize * 8 <= (uint64_t)c->file_len - tbl) {
                uint64_t *t = malloc((size_t)tsize * 8);
                if (t && vimg_file_pread(c->img->file, t, (size_t)tsize * 8, tbl) >= 0) {
                    for (uint32_t i = 0; i < tsize && ret >= 0; i++) {
                        uint64_t d = be64toh(t[i]) & QCOW2_L2E_OFFSET_MASK;
                        if (d) {
                            ret = qcow2_ck_inc(c, d, s->cluster_size);
                        }
                    }
                }
                free(t);
            }
        }
        p += (24 + (uint64_t)extra + name + 7) & ~7ull;
    }
    free(dir);
    return ret < 0 ? ret : 0;
}

static int qcow2_ck_calculate(struct qcow2_ck *c)
{
    struct qcow2_state *s = c->s;
    int ret;

    ret = qcow2_ck_inc(c, 0, s->cluster_size);
    if (ret >= 0) {
        ret = qcow2_ck_l1(c, s->l1_offset, s->l1_size, CHECK_FRAG);
    }
    if (ret >= 0 && (s->incompat & QCOW2_INCOMPAT_DATAFILE) && s->nb_snapshots) {
        qcow2_ck_log(c, "ERROR %d snapshots in image with data file\n", (int)s->nb_snapshots);
        c->res->corruptions++;
    }
    for (uint32_t i = 0; ret >= 0 && s->snapshots && i < s->nb_snapshots; i++) {
        struct qcow2_snapshot *sn = &s->snapshots[i];
        if (qcow2_offset_into_cluster(s, sn->l1_offset)) {
            qcow2_ck_log(c, "ERROR snapshot %s (%s) l1_offset=%#" PRIx64 ": L1 table is not "
                         "cluster aligned; snapshot table entry corrupted\n", sn->id,
                         sn->name, sn->l1_offset);
            c->res->corruptions++;
            continue;
        }
        if (sn->l1_size > QCOW2_MAX_L1_SIZE / 8) {
            qcow2_ck_log(c, "ERROR snapshot %s (%s) l1_size=%#" PRIx32 ": L1 table is too "
                         "large; snapshot table entry corrupted\n", sn->id, sn->name,
                         sn->l1_size);
            c->res->corruptions++;
            continue;
        }
        ret = qcow2_ck_l1(c, sn->l1_offset, sn->l1_size, 0);
    }
    if (ret >= 0) {
        ret = qcow2_ck_inc(c, s->snapshots_offset, qcow2_ck_snap_size(s));
    }
    if (ret >= 0) {
        ret = qcow2_ck_inc(c, s->rt_offset, s->rt_size * 8);
    }
    if (ret >= 0 && s->has_crypto_ext) {
        ret = qcow2_ck_inc(c, vimg_ld_be64(s->crypto_ext), vimg_ld_be64(s->crypto_ext + 8));
    }
    if (ret >= 0) {
        ret = qcow2_ck_bitmaps(c);
    }
    /* the refcount blocks themselves */
    for (uint64_t i = 0; ret >= 0 && i < s->rt_size; i++) {
        uint64_t off = s->rt[i] & QCOW2_REFT_OFFSET_MASK;
        uint64_t cl = off >> s->cluster_bits;
        if (s->rt[i] & ~QCOW2_REFT_OFFSET_MASK) {
            qcow2_ck_log(c, "ERROR refcount table entry %" PRId64 " has reserved bits set\n",
                         (int64_t)i);
            c->res->corruptions++;
            c->rebuild = true;
            continue;
        }
        if (qcow2_offset_into_cluster(s, off)) {
            qcow2_ck_log(c, "ERROR refcount block %" PRId64 " is not cluster aligned; "
                         "refcount table entry corrupted\n", (int64_t)i);
            c->res->corruptions++;
            c->rebuild = true;
            continue;
        }
        if (cl >= c->nb) {
            c->res->corruptions++;
            qcow2_ck_log(c, "ERROR refcount block %" PRId64 " is outside image\n",
                         (int64_t)i);
            continue;
        }
        if (off) {
            ret = qcow2_ck_inc(c, off, s->cluster_size);
            if (ret >= 0 && 1 != c->refs[cl]) {
                qcow2_ck_log(c, "ERROR refcount block %" PRId64 " refcount=%" PRIu64 "\n",
                             (int64_t)i, (uint64_t)c->refs[cl]);
                c->res->corruptions++;
                c->rebuild = true;
            }
        }
    }
    return ret;
}

static void qcow2_ck_compare(struct qcow2_ck *c, int fix, uint64_t *highest)
{
    struct qcow2_state *s = c->s;
    struct vimg_error e = { 0 };

    *highest = 0;
    for (uint64_t i = 0; i < c->nb; i++) {
        uint64_t stored, computed = c->refs[i];
        int *fixed = NULL;
        if (qcow2_get_refcount(c->img, i, &stored, &e) < 0) {
            qcow2_ck_log(c, "Can't get refcount for cluster %" PRId64 ": %s\n", (int64_t)i,
                         strerror(e.code ? e.code : EIO));
            vimg_error_clear(&e);
            c->res->check_errors++;
            continue;
        }
        if (stored || computed) {
            *highest = i;
        }
        if (stored == computed) {
            continue;
        }
        if (0 == stored) {
            c->rebuild = true;
        } else if (stored > computed && (fix & 1)) {
            fixed = &c->res->leaks_fixed;
        } else if (stored < computed && (fix & 2)) {
            fixed = &c->res->corruptions_fixed;
        }
        qcow2_ck_log(c, "%s cluster %" PRId64 " refcount=%" PRIu64 " reference=%" PRIu64 "\n",
                     fixed ? "Repairing" : stored < computed ? "ERROR" : "Leaked",
                     (int64_t)i, stored, computed);
        if (fixed) {
            int64_t delta = (int64_t)computed - (int64_t)stored;
            if (qcow2_update_refcount(c->img, i << s->cluster_bits, 1, delta, &e) >= 0) {
                if (0 == computed && (i << s->cluster_bits) < (uint64_t)c->file_len) {
                    /* qemu discards what a repair frees */
                    c->img->file->ops->zero(c->img->file, i << s->cluster_bits,
                                            s->cluster_size, true);
                }
                (*fixed)++;
                continue;
            }
            vimg_error_clear(&e);
        }
        if (stored < computed) {
            c->res->corruptions++;
        } else {
            c->res->leaks++;
        }
    }
}

static void qcow2_ck_copied(struct qcow2_ck *c, int fix)
{
    struct qcow2_state *s = c->s;
    bool data_file = !!(s->incompat & QCOW2_INCOMPAT_DATAFILE);
    struct vimg_error e = { 0 };
    uint8_t *l2 = malloc(s->cluster_size);
    bool repair;

    if (!l2) {
        c->res->check_errors++;
        return;
    }
    if (fix & 2) {
        repair = true;
    } else if (fix & 1) {
        repair = !c->res->check_errors && !c->res->corruptions && !c->res->leaks;
    } else {
        repair = false;
    }
    for (uint32_t i = 0; i < s->l1_size; i++) {
        uint64_t e1 = s->l1[i], l2_off = e1 & QCOW2_L1E_OFFSET_MASK, rc;
        int dirty = 0;
        if (!l2_off) {
            continue;
        }
        if (qcow2_get_refcount(c->img, l2_off >> s->cluster_bits, &rc, &e) < 0) {
            vimg_error_clear(&e);
            continue;
        }
        if ((1 == rc) != !!(e1 & QCOW2_OFLAG_COPIED)) {
            c->res->corruptions++;
            qcow2_ck_log(c, "%s OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%" PRIx64
                         " refcount=%" PRIu64 "\n", repair ? "Repairing" : "ERROR", (int)i,
                         e1, rc);
            if (repair) {
                uint8_t b[8];
                s->l1[i] = 1 == rc ? e1 | QCOW2_OFLAG_COPIED : e1 & ~QCOW2_OFLAG_COPIED;
                vimg_st_be64(b, s->l1[i]);
                if (vimg_file_pwrite(c->img->file, b, 8, s->l1_offset + i * 8ull) < 0) {
                    c->res->check_errors++;
                    break;
                }
                c->res->corruptions--;
                c->res->corruptions_fixed++;
            }
        }
        if (vimg_file_pread(c->img->file, l2, s->cluster_size, l2_off) < 0) {
            qcow2_ck_log(c, "ERROR: Could not read L2 table: %s\n", strerror(EIO));
            c->res->check_errors++;
            break;
        }
        for (uint64_t j = 0; j < s->l2_entries; j++) {
            uint64_t le = qcow2_l2_entry(s, l2, j);
            uint64_t off = le & QCOW2_L2E_OFFSET_MASK;
            bool normal;
            if (le & QCOW2_OFLAG_COMPRESSED) {
                continue;
            }
            normal = off || (data_file && (le & QCOW2_OFLAG_COPIED));
            if (!normal) {
                continue;
            }
            if (data_file) {
                rc = 1;
            } else if (qcow2_get_refcount(c->img, off >> s->cluster_bits, &rc, &e) < 0) {
                vimg_error_clear(&e);
                continue;
            }
            if ((1 == rc) != !!(le & QCOW2_OFLAG_COPIED)) {
                c->res->corruptions++;
                qcow2_ck_log(c, "%s OFLAG_COPIED data cluster: l2_entry=%" PRIx64
                             " refcount=%" PRIu64 "\n", repair ? "Repairing" : "ERROR", le, rc);
                if (repair) {
                    vimg_st_be64(l2 + j * s->l2_entry_size,
                                 1 == rc ? le | QCOW2_OFLAG_COPIED : le & ~QCOW2_OFLAG_COPIED);
                    dirty++;
                }
            }
        }
        if (dirty) {
            if (vimg_file_pwrite(c->img->file, l2, s->cluster_size, l2_off) < 0) {
                qcow2_ck_log(c, "ERROR: Could not write L2 table: %s\n", strerror(EIO));
                c->res->check_errors++;
                break;
            }
            qcow2_cache_drop(&s->l2_cache, l2_off);
            c->res->corruptions -= dirty;
            c->res->corruptions_fixed += dirty;
        }
    }
    free(l2);
}

static int qcow2_ck_grow(struct qcow2_ck *c, uint64_t n)
{
    if (n > c->cap) {
        uint32_t *p;
        /* the rebuilt structures go right after the file's end */
        if (n > c->nb + (1u << 24)) {
            return -EFBIG;
        }
        p = realloc(c->refs, n * sizeof(*p));
        if (!p) {
            return -ENOMEM;
        }
        memset(p + c->cap, 0, (n - c->cap) * sizeof(*p));
        c->refs = p;
        c->cap = n;
    }
    if (n > c->nb) {
        c->nb = n;
    }
    return 0;
}

/* qemu's alloc_clusters_imrt: count free clusters in the computed table */
static int64_t qcow2_ck_alloc(struct qcow2_ck *c, uint64_t count, uint64_t *first_free)
{
    uint64_t cl = *first_free, run = 0;
    bool first_gap = true;
    int ret;

    for (; cl < c->nb && run < count; cl++) {
        if (!c->refs[cl]) {
            run++;
            if (first_gap) {
                *first_free = cl;
                first_gap = false;
            }
        } else if (run) {
            run = 0;
        }
    }
    if (run < count) {
        ret = qcow2_ck_grow(c, cl + count - run);
        if (ret < 0) {
            return ret;
        }
    }
    cl -= run;
    for (uint64_t i = 0; i < count; i++) {
        c->refs[cl + i] = 1;
    }
    return (int64_t)cl;
}

static int qcow2_ck_write_rbs(struct qcow2_ck *c, uint64_t first, uint64_t end,
                              uint64_t **rt, uint64_t *rt_n, uint8_t *blk)
{
    struct qcow2_state *s = c->s;
    uint64_t first_free = 0;
    int grown = 0, ret;

    for (uint64_t cl = first; cl < end; cl++) {
        uint64_t idx, start, rb_off;
        if (cl >= c->nb || !c->refs[cl]) {
            continue;
        }
        idx = cl / s->rb_entries;
        start = idx * s->rb_entries;
        if (*rt_n > idx && (*rt)[idx]) {
            rb_off = (*rt)[idx];
        } else {
            int64_t a;
            if (first_free < start) {
                first_free = start;
            }
            a = qcow2_ck_alloc(c, 1, &first_free);
            if (a < 0) {
                return (int)a;
            }
            rb_off = (uint64_t)a << s->cluster_bits;
            if ((uint64_t)a >= end) {
                end = (uint64_t)a + 1;
            }
            if (*rt_n <= idx) {
                uint64_t n = vimg_div_round_up((idx + 1) * 8, s->cluster_size) *
                             s->cluster_size / 8;
                uint64_t *p = realloc(*rt, n * 8);
                if (!p) {
                    return -ENOMEM;
                }
                memset(p + *rt_n, 0, (n - *rt_n) * 8);
                *rt = p;
                *rt_n = n;
                grown = 1;
            }
            (*rt)[idx] = rb_off;
        }
        memset(blk, 0, s->cluster_size);
        for (uint64_t i = 0; i < s->rb_entries && start + i < c->nb; i++) {
            qcow2_rb_set(s, blk, i, VIMG_MIN((uint64_t)c->refs[start + i], s->refcount_max));
        }
        ret = vimg_file_pwrite(c->img->file, blk, s->cluster_size, rb_off);
        if (ret < 0) {
            return ret;
        }
        cl = start + s->rb_entries - 1;
    }
    return grown;
}

/* A new refcount table and blocks from the computed counts; the old ones
 * are left behind as leaks, which the following pass repairs. */
static int qcow2_ck_rebuild(struct qcow2_ck *c)
{
    struct qcow2_state *s = c->s;
    uint64_t *rt = NULL, rt_n = 0, rt_off = 0, rt_clusters = 0;
    uint8_t *blk = malloc(s->cluster_size), hdr[12];
    int ret;

    if (!blk) {
        return -ENOMEM;
    }
    ret = qcow2_ck_write_rbs(c, 0, c->nb, &rt, &rt_n, blk);
    while (ret > 0) {
        uint64_t first_free = 0;
        int64_t a;
        rt_clusters = vimg_div_round_up(rt_n * 8, s->cluster_size);
        a = qcow2_ck_alloc(c, rt_clusters, &first_free);
        if (a < 0) {
            ret = (int)a;
            break;
        }
        rt_off = (uint64_t)a << s->cluster_bits;
        ret = qcow2_ck_write_rbs(c, (uint64_t)a, (uint64_t)a + rt_clusters, &rt, &rt_n, blk);
    }
    free(blk);
    if (ret < 0 || rt_n * 8 > QCOW2_MAX_REFTABLE_SIZE) {
        free(rt);
        return ret < 0 ? ret : -EFBIG;
    }
    for (uint64_t i = 0; i < rt_n; i++) {
        rt[i] = htobe64(rt[i]);
    }
    ret = vimg_file_pwrite(c->img->file, rt, rt_n * 8, rt_off);
    for (uint64_t i = 0; i < rt_n; i++) {
        rt[i] = be64toh(rt[i]);
    }
    if (ret >= 0) {
        vimg_st_be64(hdr, rt_off);
        vimg_st_be32(hdr + 8, (uint32_t)rt_clusters);
        ret = vimg_file_pwrite(c->img->file, hdr, 12, 48);
    }
    if (ret >= 0) {
        ret = vimg_file_sync(c->img->file);
    }
    if (ret < 0) {
        free(rt);
        return ret;
    }
    qcow2_cache_free(&s->rb_cache);
    free(s->rt);
    s->rt = rt;
    s->rt_size = rt_n;
    s->rt_offset = rt_off;
    s->rt_clusters = (uint32_t)rt_clusters;
    s->free_hint = 0;
    return 0;
}

int qcow2_check(struct vimg_image *img, struct vimg_check_result *res, int fix,
                struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    struct qcow2_ck c = { .img = img, .s = s, .res = res };
    struct vimg_check_result pre;
    uint64_t highest = 0;
    int ret;

    c.file_len = vimg_file_size(img->file);
    if (c.file_len < 0) {
        res->check_errors++;
        return qcow2_io_error(img, (int)c.file_len, "Could not get file size", err);
    }
    if (!(img->flags & VIMG_OPEN_RDWR)) {
        fix = 0;
    }
    if (fix) {
        /* the user's repair replaces the one a dirty image would get */
        s->needs_repair = false;
    }
    c.nb = vimg_div_round_up((uint64_t)c.file_len, s->cluster_size);
    c.cap = c.nb + 1;
    c.refs = calloc(c.cap, sizeof(*c.refs));
    if (!c.refs) {
        res->check_errors++;
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    res->total_clusters = vimg_div_round_up(img->size, s->cluster_size);
    ret = qcow2_ck_calculate(&c);
    if (ret < 0) {
        goto out;
    }
    pre = *res;
    qcow2_ck_compare(&c, 0, &highest);
    if (c.rebuild && (fix & 2)) {
        struct vimg_check_result old = *res;
        int fresh_leaks = 0;

        qcow2_ck_log(&c, "Rebuilding refcount structure\n");
        ret = qcow2_ck_rebuild(&c);
        if (ret < 0) {
            res->check_errors++;
            vimg_error_set(err, -ret, "ERROR rebuilding refcount structure: %s",
                           strerror(-ret));
            goto out;
        }
        res->corruptions = 0;
        res->leaks = 0;
        c.rebuild = false;
        c.file_len = vimg_file_size(img->file);
        if (c.file_len < 0) {
            ret = (int)c.file_len;
            goto out;
        }
        memset(c.refs, 0, c.cap * sizeof(*c.refs));
        ret = qcow2_ck_calculate(&c);
        if (ret < 0) {
            goto out;
        }
        if (fix & 1) {
            struct vimg_check_result saved = *res;
            memset(res, 0, sizeof(*res));
            qcow2_ck_compare(&c, 1, &highest);
            if (c.rebuild) {
                qcow2_ck_log(&c, "ERROR rebuilt refcount structure is still broken\n");
            }
            fresh_leaks = res->leaks;
            *res = saved;
        }
        if (res->corruptions < old.corruptions) {
            res->corruptions_fixed += old.corruptions - res->corruptions;
        }
        if (res->leaks < old.leaks) {
            res->leaks_fixed += old.leaks - res->leaks;
        }
        res->leaks += fresh_leaks;
    } else if (fix) {
        if (c.rebuild) {
            qcow2_ck_log(&c, "ERROR need to rebuild refcount structures\n");
            res->check_errors++;
            ret = -EIO;
            goto out;
        }
        if (res->leaks || res->corruptions) {
            *res = pre;
            qcow2_ck_compare(&c, fix, &highest);
        }
    }
    qcow2_ck_copied(&c, fix);
    res->image_end_offset = (highest + 1) * s->cluster_size;
    res->has_stats = true;
    if (fix && 0 == res->check_errors && 0 == res->corruptions) {
        ret = qcow2_update_incompat(img, s->incompat & ~(QCOW2_INCOMPAT_DIRTY |
                                                         QCOW2_INCOMPAT_CORRUPT), err);
        if (ret >= 0) {
            ret = qcow2_flush(img, err);
        }
    }
out:
    free(c.refs);
    res->log = c.log;
    if (ret < 0 && !err->code) {
        vimg_error_set(err, -ret, "'%s': check failed: %s", img->filename, strerror(-ret));
    }
    return ret;
}

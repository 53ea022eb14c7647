/* qcow2: probe, open (header, extensions, tables, snapshots), close, info,
 * and rewriting the first cluster. */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "core/opts.h"
#include "core/qobj.h"
#include "formats/qcow2/qcow2.h"
#include "util/util.h"

int qcow2_io_error(struct vimg_image *img, int ret, const char *what,
                   struct vimg_error *err)
{
    vimg_error_set(err, -ret, "'%s': %s: %s", img->filename, what, strerror(-ret));
    return ret;
}

static int qcow2_probe(const uint8_t *buf, size_t len, const char *filename)
{
    if (len >= 8 && QCOW2_MAGIC == vimg_ld_be32(buf) && vimg_ld_be32(buf + 4) >= 2) {
        return 100;
    }
    return 0;
}

static int qcow2_fail(struct vimg_error *err, int code, const char *msg)
{
    vimg_error_set(err, code, "%s", msg);
    return -code;
}

/* qemu's table check: entries fit under max, offset aligned and the end of
 * the table does not overflow. */
static int qcow2_validate_table(struct qcow2_state *s, uint64_t off, uint64_t n,
                                uint64_t esz, uint64_t max, const char *name,
                                struct vimg_error *err)
{
    if (n > max / esz) {
        vimg_error_set(err, EFBIG, "%s too large", name);
        return -EFBIG;
    }
    if (qcow2_offset_into_cluster(s, off) || (uint64_t)INT64_MAX - n * esz < off) {
        vimg_error_set(err, EINVAL, "%s offset invalid", name);
        return -EINVAL;
    }
    return 0;
}

/* A table must lie inside the file: qemu would read zeros past the end, but
 * that is never a valid image and an attacker could make us allocate for
 * nothing. */
static int qcow2_table_in_file(struct vimg_image *img, uint64_t off, uint64_t bytes,
                               const char *name, struct vimg_error *err)
{
    int64_t fsize = vimg_file_size(img->file);
    if (fsize >= 0 && bytes && (off > (uint64_t)fsize || bytes > (uint64_t)fsize - off)) {
        vimg_error_set(err, EINVAL, "%s lies beyond the end of the file", name);
        return -EINVAL;
    }
    return 0;
}

static void qcow2_report_features(struct qcow2_state *s, uint64_t mask,
                                  struct vimg_error *err)
{
    char out[900];
    size_t used = 0;
    out[0] = 0;
    for (uint32_t i = 0; s->feature_table && i + 48 <= s->feature_table_len; i += 48) {
        const uint8_t *f = s->feature_table + i;
        if (0 == f[0] && f[1] < 64 && (mask & (1ull << f[1]))) {
            char name[47];
            memcpy(name, f + 2, 46);
            name[46] = 0;
            used += (size_t)snprintf(out + used, used < sizeof(out) ? sizeof(out) - used : 0,
                                     "%s%s", used ? ", " : "", name);
            if (used >= sizeof(out)) {
                used = sizeof(out) - 1;
            }
            mask &= ~(1ull << f[1]);
        }
    }
    if (mask) {
        snprintf(out + used, sizeof(out) - used, "%sUnknown incompatible feature: %" PRIx64,
                 used ? ", " : "", mask);
    }
    vimg_error_set(err, ENOTSUP, "Unsupported qcow2 feature(s): %s", out);
}

/* Read the extension area.  With only_features, just pick up the feature
 * table (for the unsupported-feature message) and ignore errors. */
static int qcow2_read_extensions(struct vimg_image *img, uint64_t start, uint64_t end,
                                 bool only_features, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t off = start;
    uint8_t *hdr;
    int ret;

    if (end > s->cluster_size) {
        end = s->cluster_size;
    }
    hdr = malloc(s->cluster_size);
    if (!hdr) {
        return qcow2_fail(err, ENOMEM, "out of memory");
    }
    ret = vimg_file_pread(img->file, hdr, s->cluster_size, 0);
    if (ret < 0) {
        free(hdr);
        return qcow2_io_error(img, ret, "Could not read qcow2 header", err);
    }
    ret = 0;
    while (off < end) {
        uint32_t type, len;
        if (end - off < 8) {
            ret = -EINVAL;
            vimg_error_set(err, EINVAL, "Header extension too large");
            break;
        }
        type = vimg_ld_be32(hdr + off);
        len = vimg_ld_be32(hdr + off + 4);
        off += 8;
        if (len > end - off) {
            ret = -EINVAL;
            vimg_error_set(err, EINVAL, "Header extension too large");
            break;
        }
        if (QCOW2_EXT_END == type) {
            break;
        }
        if (QCOW2_EXT_FEATURES == type) {
            if (!s->feature_table) {
                s->feature_table = malloc(len ? len : 1);
                if (!s->feature_table) {
                    ret = qcow2_fail(err, ENOMEM, "out of memory");
                    break;
                }
                memcpy(s->feature_table, hdr + off, len);
                s->feature_table_len = len;
            }
        } else if (only_features) {
            /* nothing else matters here */
        } else if (QCOW2_EXT_BACKFMT == type) {
            if (len >= 16) {
                vimg_error_set(err, EINVAL,
                               "ERROR: ext_backing_format: len=%" PRIu32 " too large (>=16)",
                               len);
                ret = -EINVAL;
                break;
            }
            free(s->backing_fmt);
            s->backing_fmt = strndup((const char *)hdr + off, len);
            if (!s->backing_fmt) {
                ret = qcow2_fail(err, ENOMEM, "out of memory");
                break;
            }
        } else if (QCOW2_EXT_CRYPTO == type) {
            if (2 != s->crypt_method) {
                ret = qcow2_fail(err, EINVAL, "CRYPTO header extension only expected "
                                 "with LUKS encryption method");
                break;
            }
            if (16 != len) {
                vimg_error_set(err, EINVAL, "CRYPTO header extension size %" PRIu32
                               ", but expected size 16", len);
                ret = -EINVAL;
                break;
            }
            memcpy(s->crypto_ext, hdr + off, 16);
            if (qcow2_offset_into_cluster(s, vimg_ld_be64(s->crypto_ext))) {
                vimg_error_set(err, EINVAL, "Encryption header offset '%" PRIu64
                               "' is not a multiple of cluster size '%" PRIu64 "'",
                               vimg_ld_be64(s->crypto_ext), s->cluster_size);
                ret = -EINVAL;
                break;
            }
            s->has_crypto_ext = true;
        } else if (QCOW2_EXT_BITMAPS == type) {
            if (24 != len) {
                ret = qcow2_fail(err, EINVAL, "bitmaps_ext: Invalid extension length");
                break;
            }
            if (!(s->autoclear & QCOW2_AUTOCLEAR_BITMAPS)) {
                /* inconsistent bitmaps: qemu ignores (and later drops) them */
            } else {
                const uint8_t *b = hdr + off;
                uint32_t nb = vimg_ld_be32(b);
                if (0 != vimg_ld_be32(b + 4)) {
                    ret = qcow2_fail(err, EINVAL, "bitmaps_ext: Reserved field is not zero");
                    break;
                }
                if (nb > 65535) {
                    vimg_error_set(err, EINVAL, "bitmaps_ext: Image has %" PRIu32
                                   " bitmaps, exceeding the QEMU supported maximum of 65535",
                                   nb);
                    ret = -EINVAL;
                    break;
                }
                if (0 == nb) {
                    ret = qcow2_fail(err, EINVAL, "found bitmaps extension with zero bitmaps");
                    break;
                }
                if (qcow2_offset_into_cluster(s, vimg_ld_be64(b + 16))) {
                    ret = qcow2_fail(err, EINVAL,
                                     "bitmaps_ext: invalid bitmap directory offset");
                    break;
                }
                if (vimg_ld_be64(b + 8) > 1024ull * 65535) {
                    vimg_error_set(err, EINVAL, "bitmaps_ext: bitmap directory size (%"
                                   PRIu64 ") exceeds the maximum supported size (%d)",
                                   vimg_ld_be64(b + 8), 1024 * 65535);
                    ret = -EINVAL;
                    break;
                }
                memcpy(s->bitmaps_ext, b, 24);
                s->has_bitmaps_ext = true;
            }
        } else if (QCOW2_EXT_DATAFILE == type) {
            free(s->data_file_name);
            s->data_file_name = strndup((const char *)hdr + off, len);
            if (!s->data_file_name) {
                ret = qcow2_fail(err, ENOMEM, "out of memory");
                break;
            }
        } else {
            struct qcow2_ext *n = realloc(s->unknown_ext,
                                          (s->n_unknown_ext + 1) * sizeof(*n));
            if (!n) {
                ret = qcow2_fail(err, ENOMEM, "out of memory");
                break;
            }
            s->unknown_ext = n;
            n[s->n_unknown_ext].type = type;
            n[s->n_unknown_ext].len = len;
            n[s->n_unknown_ext].data = malloc(len ? len : 1);
            if (!n[s->n_unknown_ext].data) {
                ret = qcow2_fail(err, ENOMEM, "out of memory");
                break;
            }
            memcpy(n[s->n_unknown_ext].data, hdr + off, len);
            s->n_unknown_ext++;
        }
        off += (len + 7ull) & ~7ull;
    }
    free(hdr);
    return ret;
}

void qcow2_free_snapshots(struct qcow2_state *s)
{
    for (uint32_t i = 0; s->snapshots && i < s->nb_snapshots; i++) {
        free(s->snapshots[i].id);
        free(s->snapshots[i].name);
        free(s->snapshots[i].extra);
    }
    free(s->snapshots);
    s->snapshots = NULL;
}

/* The snapshot table, read entry by entry, each bounded by the file. */
static int qcow2_read_snapshots(struct vimg_image *img, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    int64_t fsize = vimg_file_size(img->file);
    uint64_t off = s->snapshots_offset;
    int ret;

    if (!s->nb_snapshots) {
        return 0;
    }
    s->snapshots = calloc(s->nb_snapshots, sizeof(*s->snapshots));
    if (!s->snapshots) {
        return qcow2_fail(err, ENOMEM, "out of memory");
    }
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        struct qcow2_snapshot *sn = &s->snapshots[i];
        uint8_t h[QCOW2_SNAPSHOT_HEADER], extra[24] = { 0 };
        uint16_t id_len, name_len;
        uint64_t end;

        off = (off + 7) & ~7ull;
        if (fsize < 0 || off > (uint64_t)fsize || (uint64_t)fsize - off < sizeof(h)) {
            vimg_error_set(err, EINVAL, "Snapshot table lies beyond the end of the file");
            return -EINVAL;
        }
        ret = vimg_file_pread(img->file, h, sizeof(h), off);
        if (ret < 0) {
            return qcow2_io_error(img, ret, "Failed to read snapshot table", err);
        }
        off += sizeof(h);
        sn->l1_offset = vimg_ld_be64(h);
        sn->l1_size = vimg_ld_be32(h + 8);
        id_len = vimg_ld_be16(h + 12);
        name_len = vimg_ld_be16(h + 14);
        sn->date_sec = vimg_ld_be32(h + 16);
        sn->date_nsec = vimg_ld_be32(h + 20);
        sn->vm_clock_nsec = vimg_ld_be64(h + 24);
        sn->vm_state_size = vimg_ld_be32(h + 32);
        sn->extra_size = vimg_ld_be32(h + 36);
        if (sn->extra_size > QCOW2_MAX_SNAPSHOT_EXTRA) {
            vimg_error_set(err, EFBIG, "Too much extra metadata in snapshot table entry %"
                           PRIu32 "\nYou can force-remove this extra metadata with "
                           "qemu-img check -r all", i);
            return -EFBIG;
        }
        end = off + sn->extra_size + id_len + name_len;
        if (end > (uint64_t)fsize) {
            vimg_error_set(err, EINVAL, "Snapshot table lies beyond the end of the file");
            return -EINVAL;
        }
        ret = vimg_file_pread(img->file, extra, VIMG_MIN(sn->extra_size, 24u), off);
        if (ret < 0) {
            return qcow2_io_error(img, ret, "Failed to read snapshot table", err);
        }
        if (sn->extra_size >= 8) {
            sn->vm_state_size = vimg_ld_be64(extra);
        }
        sn->has_disk_size = sn->extra_size >= 16;
        sn->disk_size = sn->has_disk_size ? vimg_ld_be64(extra + 8) : img->size;
        sn->has_icount = sn->extra_size >= 24;
        sn->icount = sn->has_icount ? (int64_t)vimg_ld_be64(extra + 16) : -1;
        if (sn->extra_size > 24) {
            sn->extra = malloc(sn->extra_size - 24);
            if (!sn->extra) {
                return qcow2_fail(err, ENOMEM, "out of memory");
            }
            ret = vimg_file_pread(img->file, sn->extra, sn->extra_size - 24, off + 24);
            if (ret < 0) {
                return qcow2_io_error(img, ret, "Failed to read snapshot table", err);
            }
        }
        off += sn->extra_size;
        sn->id = calloc(1, id_len + 1u);
        sn->name = calloc(1, name_len + 1u);
        if (!sn->id || !sn->name) {
            return qcow2_fail(err, ENOMEM, "out of memory");
        }
        ret = vimg_file_pread(img->file, sn->id, id_len, off);
        if (ret >= 0) {
            ret = vimg_file_pread(img->file, sn->name, name_len, off + id_len);
        }
        if (ret < 0) {
            return qcow2_io_error(img, ret, "Failed to read snapshot table", err);
        }
        off += id_len + name_len;
        if (off - s->snapshots_offset > QCOW2_MAX_SNAPSHOT_TABLE) {
            vimg_error_set(err, EFBIG, "Snapshot table is too big\nYou can force-remove all "
                           "%" PRIu32 " overhanging snapshots with qemu-img check -r all",
                           s->nb_snapshots - i);
            return -EFBIG;
        }
    }
    return 0;
}

static void qcow2_close(struct vimg_image *img)
{
    struct qcow2_state *s = qcow2_s(img);
    struct vimg_error err = { 0 };

    if ((img->flags & VIMG_OPEN_RDWR) && s->l1) {
        if (s->needs_repair) {
            /* never opened for a write: repair now, as qemu would have at open */
            qcow2_mark_dirty(img, &err);
        }
        if (0 == qcow2_flush(img, &err) && !s->needs_repair) {
            /* a clean close: the refcounts are complete again (qemu clears
             * the bit on every writable close) */
            qcow2_update_incompat(img, s->incompat & ~QCOW2_INCOMPAT_DIRTY, &err);
        }
    }
    qcow2_cache_free(&s->l2_cache);
    qcow2_cache_free(&s->rb_cache);
    free(s->l1);
    free(s->rt);
    free(s->unknown_header);
    qcow2_free_snapshots(s);
    free(s->backing_name);
    free(s->backing_fmt);
    free(s->data_file_name);
    free(s->feature_table);
    for (uint32_t i = 0; i < s->n_unknown_ext; i++) {
        free(s->unknown_ext[i].data);
    }
    free(s->unknown_ext);
    free(s->cbuf);
    free(s->app.tbl);
    free(s->app.zbuf);
    if (s->own_data_file) {
        vimg_file_close(s->data_file);
    }
    memset(s, 0, sizeof(*s));
}

static int qcow2_open(struct vimg_image *img, unsigned flags, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint8_t h[112];
    uint64_t ext_end, l1_needed, backing_off;
    uint32_t backing_len;
    int64_t fsize;
    int ret;

    s->cbuf_guest = UINT64_MAX;
    fsize = vimg_file_size(img->file);
    if (fsize < 0) {
        return qcow2_io_error(img, (int)fsize, "Could not get file size", err);
    }
    memset(h, 0, sizeof(h));
    ret = vimg_file_pread(img->file, h, sizeof(h), 0);
    if (ret < 0) {
        return qcow2_io_error(img, ret, "Could not read qcow2 header", err);
    }
    if ((uint64_t)fsize < 72 || QCOW2_MAGIC != vimg_ld_be32(h)) {
        return qcow2_fail(err, EINVAL, "Image is not in qcow2 format");
    }
    s->version = vimg_ld_be32(h + 4);
    if (s->version < 2 || s->version > 3) {
        vimg_error_set(err, ENOTSUP, "Unsupported qcow2 version %" PRIu32, s->version);
        return -ENOTSUP;
    }
    s->cluster_bits = vimg_ld_be32(h + 20);
    if (s->cluster_bits < QCOW2_MIN_CLUSTER_BITS || s->cluster_bits > QCOW2_MAX_CLUSTER_BITS) {
        vimg_error_set(err, EINVAL, "Unsupported cluster size: 2^%" PRIu32, s->cluster_bits);
        return -EINVAL;
    }
    s->cluster_size = 1ull << s->cluster_bits;
    backing_off = vimg_ld_be64(h + 8);
    backing_len = vimg_ld_be32(h + 16);
    s->header_size = vimg_ld_be64(h + 24);
    s->crypt_method = vimg_ld_be32(h + 32);
    s->l1_size = vimg_ld_be32(h + 36);
    s->l1_offset = vimg_ld_be64(h + 40);
    s->rt_offset = vimg_ld_be64(h + 48);
    s->rt_clusters = vimg_ld_be32(h + 56);
    s->nb_snapshots = vimg_ld_be32(h + 60);
    s->snapshots_offset = vimg_ld_be64(h + 64);
    if (2 == s->version) {
        s->refcount_order = 4;
        s->header_length = 72;
    } else {
        s->incompat = vimg_ld_be64(h + 72);
        s->compat = vimg_ld_be64(h + 80);
        s->autoclear = vimg_ld_be64(h + 88);
        s->refcount_order = vimg_ld_be32(h + 96);
        s->header_length = vimg_ld_be32(h + 100);
        if (s->header_length < 104) {
            return qcow2_fail(err, EINVAL, "qcow2 header too short");
        }
    }
    if (s->header_length % 8) {
        /* the spec requires it; qemu forgets to check */
        vimg_error_set(err, EINVAL, "qcow2 header length %" PRIu32 " is not a multiple of 8",
                       s->header_length);
        return -EINVAL;
    }
    if (s->header_length > s->cluster_size) {
        return qcow2_fail(err, EINVAL, "qcow2 header exceeds cluster size");
    }
    if (s->header_length > 112) {
        s->unknown_header_len = s->header_length - 112;
        s->unknown_header = malloc(s->unknown_header_len);
        if (!s->unknown_header) {
            return qcow2_fail(err, ENOMEM, "out of memory");
        }
        ret = vimg_file_pread(img->file, s->unknown_header, s->unknown_header_len, 112);
        if (ret < 0) {
            return qcow2_io_error(img, ret, "Could not read unknown qcow2 header fields", err);
        }
    }
    if (backing_off > s->cluster_size) {
        return qcow2_fail(err, EINVAL, "Invalid backing file offset");
    }
    ext_end = backing_off ? backing_off : s->cluster_size;
    s->compression_type = s->header_length > 104 ? h[104] : QCOW2_COMPRESS_ZLIB;
    if (s->compression_type > QCOW2_COMPRESS_ZSTD) {
        vimg_error_set(err, EINVAL, "qcow2: unknown compression type: %" PRIu32,
                       s->compression_type);
        return -EINVAL;
    }
    if (QCOW2_COMPRESS_ZLIB == s->compression_type) {
        if (s->incompat & QCOW2_INCOMPAT_COMPRESS) {
            return qcow2_fail(err, EINVAL, "qcow2: Compression type incompatible feature "
                              "bit must not be set");
        }
    } else if (!(s->incompat & QCOW2_INCOMPAT_COMPRESS)) {
        return qcow2_fail(err, EINVAL, "qcow2: Compression type incompatible feature "
                          "bit must be set");
    }
    if (s->incompat & ~QCOW2_INCOMPAT_MASK) {
        struct vimg_error ign = { 0 };
        qcow2_read_extensions(img, s->header_length, ext_end, true, &ign);
        qcow2_report_features(s, s->incompat & ~QCOW2_INCOMPAT_MASK, err);
        return -ENOTSUP;
    }
    s->check_mode = false;
    if ((s->incompat & QCOW2_INCOMPAT_CORRUPT) && (flags & VIMG_OPEN_RDWR)) {
        return qcow2_fail(err, EACCES, "qcow2: Image is corrupt; cannot be opened "
                          "read/write");
    }
    s->ext_l2 = !!(s->incompat & QCOW2_INCOMPAT_EXTL2);
    s->l2_entry_size = s->ext_l2 ? 16 : 8;
    s->sc_bits = s->ext_l2 ? s->cluster_bits - 5 : s->cluster_bits;
    s->sc_size = 1ull << s->sc_bits;
    if (s->sc_size < 512) {
        vimg_error_set(err, EINVAL, "Unsupported subcluster size: %" PRIu64, s->sc_size);
        return -EINVAL;
    }
    if (s->refcount_order > 6) {
        return qcow2_fail(err, EINVAL, "Reference count entry width too large; may not "
                          "exceed 64 bits");
    }
    s->refcount_bits = 1u << s->refcount_order;
    s->refcount_max = 64 == s->refcount_bits ? UINT64_MAX
                                             : (1ull << s->refcount_bits) - 1;
    s->rb_entries = (s->cluster_size * 8) >> s->refcount_order;
    s->l2_bits = s->cluster_bits - (s->ext_l2 ? 4 : 3);
    s->l2_entries = 1ull << s->l2_bits;
    s->csize_shift = 62 - (s->cluster_bits - 8);
    s->csize_mask = (1ull << (s->cluster_bits - 8)) - 1;
    s->coffset_mask = (1ull << s->csize_shift) - 1;
    s->rt_size = (uint64_t)s->rt_clusters << (s->cluster_bits - 3);

    if (0 == s->rt_clusters) {
        return qcow2_fail(err, EINVAL, "Image does not contain a reference count table");
    }
    ret = qcow2_validate_table(s, s->rt_offset, s->rt_clusters, s->cluster_size,
                               QCOW2_MAX_REFTABLE_SIZE, "Reference count table", err);
    if (ret < 0) {
        return ret;
    }
    ret = qcow2_validate_table(s, s->snapshots_offset, s->nb_snapshots,
                               QCOW2_SNAPSHOT_HEADER,
                               QCOW2_SNAPSHOT_HEADER * (uint64_t)QCOW2_MAX_SNAPSHOTS,
                               "Snapshot table", err);
    if (ret < 0) {
        return ret;
    }
    ret = qcow2_validate_table(s, s->l1_offset, s->l1_size, 8, QCOW2_MAX_L1_SIZE,
                               "Active L1 table", err);
    if (ret < 0) {
        return ret;
    }
    {
        uint64_t shift = s->cluster_bits + s->l2_bits;
        l1_needed = (s->header_size >> shift) +
                    ((s->header_size & ((1ull << shift) - 1)) ? 1 : 0);
    }
    if (l1_needed > INT_MAX) {
        return qcow2_fail(err, EFBIG, "Image is too big");
    }
    if (s->l1_size < l1_needed) {
        return qcow2_fail(err, EINVAL, "L1 table is too small");
    }
    /* Beyond qemu: tables must lie in the file before we size buffers by them. */
    ret = qcow2_table_in_file(img, s->l1_offset, (uint64_t)s->l1_size * 8,
                              "Active L1 table", err);
    if (ret < 0) {
        return ret;
    }
    ret = qcow2_table_in_file(img, s->rt_offset, (uint64_t)s->rt_clusters * s->cluster_size,
                              "Reference count table", err);
    if (ret < 0) {
        return ret;
    }
    if (s->l1_size) {
        s->l1 = malloc((size_t)s->l1_size * 8);
        if (!s->l1) {
            return qcow2_fail(err, ENOMEM, "Could not allocate L1 table");
        }
        ret = vimg_file_pread(img->file, s->l1, (size_t)s->l1_size * 8, s->l1_offset);
        if (ret < 0) {
            return qcow2_io_error(img, ret, "Could not read L1 table", err);
        }
        for (uint32_t i = 0; i < s->l1_size; i++) {
            s->l1[i] = be64toh(s->l1[i]);
        }
    }
    s->rt = malloc((size_t)s->rt_size * 8);
    if (!s->rt) {
        return qcow2_fail(err, ENOMEM, "out of memory");
    }
    ret = vimg_file_pread(img->file, s->rt, (size_t)s->rt_size * 8, s->rt_offset);
    if (ret < 0) {
        return qcow2_io_error(img, ret, "Could not initialize refcount handling", err);
    }
    for (uint64_t i = 0; i < s->rt_size; i++) {
        s->rt[i] = be64toh(s->rt[i]);
    }
    s->l2_cache.n = QCOW2_L2_CACHE;
    s->rb_cache.n = QCOW2_RB_CACHE;

    ret = qcow2_read_extensions(img, s->header_length, ext_end, false, err);
    if (ret < 0) {
        return ret;
    }
    if (s->crypt_method > 2) {
        vimg_error_set(err, EINVAL, "Unsupported encryption method %" PRIu32,
                       s->crypt_method);
        return -EINVAL;
    }
    if (s->incompat & QCOW2_INCOMPAT_DATAFILE) {
        if (!(flags & VIMG_OPEN_NO_IO)) {
            if (!s->data_file_name) {
                return qcow2_fail(err, EINVAL, "'data-file' is required for this image");
            }
            ret = vimg_internal_open_child(img, s->data_file_name, "data file",
                                           &s->data_file, err);
            if (ret < 0) {
                return ret;
            }
            s->own_data_file = true;
        }
    } else {
        s->data_file = img->file;
        if (s->autoclear & QCOW2_AUTOCLEAR_RAW) {
            return qcow2_fail(err, EINVAL, "data-file-raw requires a data file");
        }
    }
    if (2 == s->crypt_method && !s->has_crypto_ext) {
        vimg_error_set(err, EINVAL, "Missing CRYPTO header for crypt method %" PRIu32,
                       s->crypt_method);
        return -EINVAL;
    }
    if (backing_off) {
        if (backing_len > VIMG_MIN(QCOW2_MAX_BACKING_NAME, s->cluster_size - backing_off)) {
            return qcow2_fail(err, EINVAL, "Backing file name too long");
        }
        s->backing_name = calloc(1, backing_len + 1u);
        if (!s->backing_name) {
            return qcow2_fail(err, ENOMEM, "out of memory");
        }
        ret = vimg_file_pread(img->file, s->backing_name, backing_len, backing_off);
        if (ret < 0) {
            return qcow2_io_error(img, ret, "Could not read backing file name", err);
        }
    }
    img->size = s->header_size & ~511ull;
    ret = qcow2_read_snapshots(img, err);
    if (ret < 0) {
        return ret;
    }
    if (s->crypt_method && !(flags & VIMG_OPEN_NO_IO)) {
        vimg_error_set(err, ENOTSUP, "'%s': encrypted qcow2 images are not supported",
                       img->filename);
        return -ENOTSUP;
    }
    if (s->backing_name && s->backing_name[0]) {
        ret = vimg_internal_set_backing(img, s->backing_name, s->backing_fmt);
        if (ret < 0) {
            return qcow2_fail(err, ENOMEM, "out of memory");
        }
    }
    s->cbuf = malloc(s->cluster_size);
    if (!s->cbuf) {
        return qcow2_fail(err, ENOMEM, "out of memory");
    }
    img->limits.cluster_size = s->cluster_size;
    img->limits.request_align = 1;
    img->limits.zero_granularity = s->sc_size;
    s->lazy = !!(s->compat & QCOW2_COMPAT_LAZY);
    s->free_hint = 0;
    if ((flags & VIMG_OPEN_RDWR) && (s->incompat & QCOW2_INCOMPAT_DIRTY)) {
        /* qemu repairs a dirty image when it opens it for writing; vimg
         * does it before the first write, so that check -r sees the image
         * as it is */
        s->needs_repair = true;
    }
    if ((flags & VIMG_OPEN_RDWR) && (s->autoclear & ~QCOW2_AUTOCLEAR_MASK)) {
        s->autoclear &= QCOW2_AUTOCLEAR_MASK;
        ret = qcow2_write_header(img, err);
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

/* The close path frees everything; open failures must too. */
static int qcow2_open_wrap(struct vimg_image *img, unsigned flags, struct vimg_error *err)
{
    int ret = qcow2_open(img, flags, err);
    if (ret < 0) {
        struct qcow2_state *s = qcow2_s(img);
        if (strncmp(err->msg, "Could not open '", 16)) {
            vimg_error_prefix(err, "Could not open '%s': ", img->filename);
        }
        free(s->l1);
        s->l1 = NULL;   /* no flush on this close */
        qcow2_close(img);
    }
    return ret;
}

static size_t qcow2_ext_put(uint8_t *buf, size_t room, uint32_t type, const void *data,
                            size_t len)
{
    size_t need = 8 + ((len + 7) & ~(size_t)7);
    if (need > room) {
        return SIZE_MAX;
    }
    memset(buf, 0, need);
    vimg_st_be32(buf, type);
    vimg_st_be32(buf + 4, (uint32_t)len);
    if (len) {
        memcpy(buf + 8, data, len);
    }
    return need;
}

int qcow2_build_header(struct qcow2_state *s, uint8_t *buf, struct vimg_error *err)
{
    static const char *const feat_names[8] = {
        "dirty bit", "corrupt bit", "external data file", "compression type",
        "extended L2 entries", "lazy refcounts", "bitmaps", "raw external data",
    };
    static const uint8_t feat_type[8] = { 0, 0, 0, 0, 0, 1, 2, 2 };
    static const uint8_t feat_bit[8] = { 0, 1, 2, 3, 4, 0, 0, 1 };
    size_t room = s->cluster_size, pos, n;
    uint32_t hlen = 112 + s->unknown_header_len;

    memset(buf, 0, s->cluster_size);
    vimg_st_be32(buf, QCOW2_MAGIC);
    vimg_st_be32(buf + 4, s->version);
    vimg_st_be32(buf + 20, s->cluster_bits);
    vimg_st_be64(buf + 24, s->header_size);
    vimg_st_be32(buf + 32, s->crypt_method);
    vimg_st_be32(buf + 36, s->l1_size);
    vimg_st_be64(buf + 40, s->l1_offset);
    vimg_st_be64(buf + 48, s->rt_offset);
    vimg_st_be32(buf + 56, s->rt_clusters);
    vimg_st_be32(buf + 60, s->nb_snapshots);
    vimg_st_be64(buf + 64, s->snapshots_offset);
    if (2 == s->version) {
        pos = 72;
    } else {
        vimg_st_be64(buf + 72, s->incompat);
        vimg_st_be64(buf + 80, s->compat);
        vimg_st_be64(buf + 88, s->autoclear);
        vimg_st_be32(buf + 96, s->refcount_order);
        vimg_st_be32(buf + 100, hlen);
        buf[104] = (uint8_t)s->compression_type;
        pos = 112;
        if (s->unknown_header_len) {
            if (hlen > room) {
                goto nospc;
            }
            memcpy(buf + 112, s->unknown_header, s->unknown_header_len);
            pos = hlen;
        }
    }
    if (s->backing_name && s->backing_fmt) {
        n = qcow2_ext_put(buf + pos, room - pos, QCOW2_EXT_BACKFMT, s->backing_fmt,
                          strlen(s->backing_fmt));
        if (SIZE_MAX == n) {
            goto nospc;
        }
        pos += n;
    }
    if ((s->incompat & QCOW2_INCOMPAT_DATAFILE) && s->data_file_name) {
        n = qcow2_ext_put(buf + pos, room - pos, QCOW2_EXT_DATAFILE, s->data_file_name,
                          strlen(s->data_file_name));
        if (SIZE_MAX == n) {
            goto nospc;
        }
        pos += n;
    }
    if (s->has_crypto_ext) {
        n = qcow2_ext_put(buf + pos, room - pos, QCOW2_EXT_CRYPTO, s->crypto_ext, 16);
        if (SIZE_MAX == n) {
            goto nospc;
        }
        pos += n;
    }
    if (s->version >= 3 && s->cluster_size > 4096) {
        uint8_t ft[8 * 48];
        memset(ft, 0, sizeof(ft));
        for (int i = 0; i < 8; i++) {
            ft[i * 48] = feat_type[i];
            ft[i * 48 + 1] = feat_bit[i];
            memcpy(ft + i * 48 + 2, feat_names[i], strlen(feat_names[i]));
        }
        n = qcow2_ext_put(buf + pos, room - pos, QCOW2_EXT_FEATURES, ft, sizeof(ft));
        if (SIZE_MAX == n) {
            goto nospc;
        }
        pos += n;
    }
    if (s->has_bitmaps_ext) {
        n = qcow2_ext_put(buf + pos, room - pos, QCOW2_EXT_BITMAPS, s->bitmaps_ext, 24);
        if (SIZE_MAX == n) {
            goto nospc;
        }
        pos += n;
    }
    /* qemu keeps unknown extensions on a LIFO list: they come back reversed */
    for (uint32_t i = s->n_unknown_ext; i-- > 0;) {
        n = qcow2_ext_put(buf + pos, room - pos, s->unknown_ext[i].type,
                          s->unknown_ext[i].data, s->unknown_ext[i].len);
        if (SIZE_MAX == n) {
            goto nospc;
        }
        pos += n;
    }
    n = qcow2_ext_put(buf + pos, room - pos, QCOW2_EXT_END, NULL, 0);
    if (SIZE_MAX == n) {
        goto nospc;
    }
    pos += n;
    if (s->backing_name) {
        size_t bl = strlen(s->backing_name);
        if (bl > room - pos) {
            goto nospc;
        }
        memcpy(buf + pos, s->backing_name, bl);
        vimg_st_be64(buf + 8, pos);
        vimg_st_be32(buf + 16, (uint32_t)bl);
    }
    return 0;
nospc:
    vimg_error_set(err, ENOSPC, "%s", strerror(ENOSPC));
    return -ENOSPC;
}

int qcow2_write_header(struct vimg_image *img, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint8_t *buf = malloc(s->cluster_size);
    int ret;

    if (!buf) {
        return qcow2_fail(err, ENOMEM, "out of memory");
    }
    ret = qcow2_build_header(s, buf, err);
    if (0 == ret) {
        ret = vimg_file_pwrite(img->file, buf, s->cluster_size, 0);
        if (ret < 0) {
            qcow2_io_error(img, ret, "Could not update qcow2 header", err);
        }
    }
    free(buf);
    return ret;
}

int qcow2_update_incompat(struct vimg_image *img, uint64_t incompat, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint8_t b[8];
    int ret;

    if (s->version < 3 || incompat == s->incompat) {
        return 0;
    }
    if (incompat & ~s->incompat & ~QCOW2_INCOMPAT_DIRTY) {
        vimg_error_set(err, EINVAL, "'%s': unexpected feature change", img->filename);
        return -EINVAL;
    }
    if (s->incompat & ~incompat) {
        /* clearing bits: qemu rewrites the whole header (mark_clean) */
        uint64_t old = s->incompat;
        s->incompat = incompat;
        ret = qcow2_write_header(img, err);
        if (ret < 0) {
            s->incompat = old;
            return ret;
        }
        ret = vimg_file_sync(img->file);
        return ret < 0 ? qcow2_io_error(img, ret, "Could not flush qcow2 header", err) : 0;
    }
    vimg_st_be64(b, incompat);
    ret = vimg_file_pwrite(img->file, b, 8, 72);
    if (ret < 0) {
        return qcow2_io_error(img, ret, "Could not update qcow2 header", err);
    }
    ret = vimg_file_sync(img->file);
    if (ret < 0) {
        return qcow2_io_error(img, ret, "Could not flush qcow2 header", err);
    }
    s->incompat = incompat;
    return 0;
}

/* The bitmap directory as qemu's Qcow2BitmapInfo list, or NULL. */
static struct vimg_qobj *qcow2_bitmap_list(struct vimg_image *img)
{
    struct qcow2_state *s = qcow2_s(img);
    int64_t fsize = vimg_file_size(img->file);
    uint64_t size, off;
    struct vimg_qobj *l;
    uint8_t *dir;

    if (!s->has_bitmaps_ext || s->version < 3 || fsize < 0) {
        return NULL;
    }
    size = vimg_ld_be64(s->bitmaps_ext + 8);
    off = vimg_ld_be64(s->bitmaps_ext + 16);
    if (!size || off > (uint64_t)fsize || size > (uint64_t)fsize - off) {
        return NULL;
    }
    dir = malloc(size);
    if (!dir || vimg_file_pread(img->file, dir, size, off) < 0) {
        free(dir);
        return NULL;
    }
    l = vimg_q_list();
    for (uint64_t p = 0, n = 0; l && p + 24 <= size && n < vimg_ld_be32(s->bitmaps_ext); n++) {
        uint32_t flags = vimg_ld_be32(dir + p + 12);
        uint32_t gbits = dir[p + 17];
        uint32_t name_len = vimg_ld_be16(dir + p + 18);
        uint32_t extra = vimg_ld_be32(dir + p + 20);
        struct vimg_qobj *b, *fl;
        char *name;
        if (p + 24 + extra + name_len > size || gbits > 63) {
            break;
        }
        name = strndup((const char *)dir + p + 24 + extra, name_len);
        b = vimg_q_dict();
        fl = vimg_q_list();
        if (flags & 1) {
            vimg_q_append(fl, vimg_q_str("in-use"));
        }
        if (flags & 2) {
            vimg_q_append(fl, vimg_q_str("auto"));
        }
        vimg_q_put(b, "name", vimg_q_str(name ? name : ""));
        vimg_q_put(b, "granularity", vimg_q_int((int64_t)(1ull << gbits)));
        vimg_q_put(b, "flags", fl);
        vimg_q_append(l, b);
        free(name);
        p += (24 + (uint64_t)extra + name_len + 7) & ~7ull;
    }
    free(dir);
    if (l && !vimg_q_count(l)) {
        vimg_q_free(l);
        l = NULL;
    }
    return l;
}

uint64_t qcow2_bitmaps_size(struct vimg_image *img, uint64_t cs)
{
    struct vimg_qobj *l = qcow2_bitmap_list(img);
    uint64_t total = 0, dir = 0;

    for (size_t i = 0; l && i < vimg_q_count(l); i++) {
        struct vimg_qobj *b = vimg_q_index(l, i);
        uint64_t g = (uint64_t)vimg_q_get_int(vimg_q_get(b, "granularity"));
        uint64_t bytes = vimg_div_round_up(vimg_div_round_up(img->size, g), 8);
        uint64_t clusters = vimg_div_round_up(bytes, cs), t = 0;
        total += clusters * cs;
        vimg_round_up(clusters * 8, cs, &t);
        total += t;
        dir += (24 + strlen(vimg_q_get_str(vimg_q_get(b, "name"))) + 7) & ~7ull;
    }
    vimg_q_free(l);
    vimg_round_up(dir, cs, &dir);
    return total + dir;
}

static int qcow2_info(struct vimg_image *img, struct vimg_qobj **out, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    struct vimg_qobj *d = vimg_q_dict();

    if (!d) {
        return qcow2_fail(err, ENOMEM, "out of memory");
    }
    if (2 == s->version) {
        vimg_q_put(d, "compat", vimg_q_str("0.10"));
        vimg_q_put(d, "compression-type",
                   vimg_q_str(s->compression_type ? "zstd" : "zlib"));
        vimg_q_put(d, "refcount-bits", vimg_q_int(s->refcount_bits));
    } else {
        vimg_q_put(d, "compat", vimg_q_str("1.1"));
        vimg_q_put(d, "compression-type",
                   vimg_q_str(s->compression_type ? "zstd" : "zlib"));
        vimg_q_put(d, "lazy-refcounts", vimg_q_bool(!!(s->compat & QCOW2_COMPAT_LAZY)));
        {
            struct vimg_qobj *bm = qcow2_bitmap_list(img);
            if (bm) {
                vimg_q_put(d, "bitmaps", bm);
            }
        }
        vimg_q_put(d, "refcount-bits", vimg_q_int(s->refcount_bits));
        if (s->data_file_name) {
            vimg_q_put(d, "data-file", vimg_q_str(s->data_file_name));
        }
        if (s->crypt_method) {
            struct vimg_qobj *e = vimg_q_dict();
            vimg_q_put(e, "format", vimg_q_str(1 == s->crypt_method ? "aes" : "luks"));
            vimg_q_put(d, "encrypt", e);
        }
        if (s->incompat & QCOW2_INCOMPAT_DATAFILE) {
            vimg_q_put(d, "data-file-raw", vimg_q_bool(!!(s->autoclear & QCOW2_AUTOCLEAR_RAW)));
        }
        vimg_q_put(d, "corrupt", vimg_q_bool(!!(s->incompat & QCOW2_INCOMPAT_CORRUPT)));
        vimg_q_put(d, "extended-l2", vimg_q_bool(s->ext_l2));
    }
    if (2 == s->version && s->crypt_method) {
        struct vimg_qobj *e = vimg_q_dict();
        vimg_q_put(e, "format", vimg_q_str(1 == s->crypt_method ? "aes" : "luks"));
        vimg_q_put(d, "encrypt", e);
    }
    *out = d;
    return 0;
}

int qcow2_snapshot_list(struct vimg_image *img, struct vimg_qobj **out,
                        struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    struct vimg_qobj *l;

    *out = NULL;
    if (!s->nb_snapshots || !s->snapshots) {
        return 0;
    }
    l = vimg_q_list();
    if (!l) {
        return qcow2_fail(err, ENOMEM, "out of memory");
    }
    for (uint32_t i = 0; i < s->nb_snapshots; i++) {
        struct qcow2_snapshot *sn = &s->snapshots[i];
        struct vimg_qobj *d = vimg_q_dict();
        vimg_q_put(d, "id", vimg_q_str(sn->id));
        vimg_q_put(d, "name", vimg_q_str(sn->name));
        vimg_q_put(d, "vm-state-size", vimg_q_int((int64_t)sn->vm_state_size));
        vimg_q_put(d, "date-sec", vimg_q_int(sn->date_sec));
        vimg_q_put(d, "date-nsec", vimg_q_int(sn->date_nsec));
        vimg_q_put(d, "vm-clock-sec", vimg_q_int((int64_t)(sn->vm_clock_nsec / 1000000000)));
        vimg_q_put(d, "vm-clock-nsec", vimg_q_int((int64_t)(sn->vm_clock_nsec % 1000000000)));
        if (-1 != sn->icount) {
            vimg_q_put(d, "icount", vimg_q_int(sn->icount));
        }
        vimg_q_append(l, d);
    }
    *out = l;
    return 0;
}

static int qcow2_image_info(struct vimg_image *img, bool *dirty, bool *encrypted,
                            struct vimg_qobj **snapshots, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    *dirty = !!(s->incompat & QCOW2_INCOMPAT_DIRTY);
    *encrypted = 0 != s->crypt_method;
    return qcow2_snapshot_list(img, snapshots, err);
}

static bool qcow2_has_zero_init(struct vimg_image *img)
{
    struct qcow2_state *s = qcow2_s(img);
    return !(s->incompat & QCOW2_INCOMPAT_DATAFILE) || (s->autoclear & QCOW2_AUTOCLEAR_RAW);
}

/* convert -l: the snapshot's L1 table replaces the active one in this
 * read-only open image (qemu's qcow2_snapshot_load_tmp: the virtual size
 * stays the image's). */
static int qcow2_snapshot_load_tmp(struct vimg_image *img, const char *id, const char *name,
                                   struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    const struct qcow2_snapshot *sn = NULL;
    uint64_t *l1;
    int ret;

    if (img->flags & VIMG_OPEN_RDWR) {
        vimg_error_set(err, EINVAL, "Device is not readonly");
        return -EINVAL;
    }
    for (uint32_t i = 0; i < s->nb_snapshots && !sn; i++) {
        const struct qcow2_snapshot *c = &s->snapshots[i];
        if ((id || name) && (!id || 0 == strcmp(c->id, id)) &&
            (!name || 0 == strcmp(c->name, name))) {
            sn = c;
        }
    }
    if (!sn) {
        vimg_error_set(err, ENOENT, "Can't find snapshot");
        return -ENOENT;
    }
    ret = qcow2_validate_table(s, sn->l1_offset, sn->l1_size, 8, QCOW2_MAX_L1_SIZE,
                               "Snapshot L1 table", err);
    if (ret >= 0) {
        ret = qcow2_table_in_file(img, sn->l1_offset, (uint64_t)sn->l1_size * 8,
                                  "Snapshot L1 table", err);
    }
    if (ret < 0) {
        return ret;
    }
    l1 = malloc(sn->l1_size ? (size_t)sn->l1_size * 8 : 1);
    if (!l1) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    ret = vimg_file_pread(img->file, l1, (size_t)sn->l1_size * 8, sn->l1_offset);
    if (ret < 0) {
        free(l1);
        vimg_error_set(err, -ret, "Failed to read l1 table for snapshot");
        return ret;
    }
    for (uint32_t i = 0; i < sn->l1_size; i++) {
        l1[i] = vimg_ld_be64((const uint8_t *)&l1[i]);
    }
    free(s->l1);
    s->l1 = l1;
    s->l1_size = sn->l1_size;
    s->l1_offset = sn->l1_offset;
    /* anything cached by guest offset belongs to the other state */
    s->cbuf_guest = UINT64_MAX;
    return 0;
}

const struct vimg_driver vimg_driver_qcow2 = {
    .abi_version = VIMG_DRIVER_ABI_VERSION,
    .name = "qcow2",
    .instance_size = sizeof(struct qcow2_state),
    .probe = qcow2_probe,
    .create_opts = qcow2_create_opts,
    .open = qcow2_open_wrap,
    .close = qcow2_close,
    .create = qcow2_create,
    .block_status = qcow2_block_status,
    .read_special = qcow2_read_special,
    .write = qcow2_write,
    .write_zeroes = qcow2_write_zeroes,
    .discard = qcow2_discard,
    .flush = qcow2_flush,
    .truncate = qcow2_truncate,
    .info = qcow2_info,
    .check = qcow2_check,
    .measure = qcow2_measure,
    .has_zero_init = qcow2_has_zero_init,
    .write_compressed = qcow2_write_compressed,
    .image_info = qcow2_image_info,
    .compress_cluster = qcow2_compress_cluster,
    .write_compressed_data = qcow2_write_compressed_data,
    .alloc_data = qcow2_alloc_data,
    .preallocate = qcow2_preallocate,
    .snapshot_load_tmp = qcow2_snapshot_load_tmp,
};

/*
 * qcow2 create.  The steps are qemu's, in qemu's order, so that the file
 * comes out byte for byte the same: header, a one-cluster refcount table and
 * an empty refcount block; then, through the driver, the first three
 * clusters are refcounted, the full header is written, the image is grown
 * to its size (which places the L1 table), and the backing file is set.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/opts.h"
#include "formats/qcow2/qcow2.h"
#include "util/util.h"

const struct vimg_opt_desc qcow2_create_opts[] = {
    { "encryption", VIMG_OPT_BOOL,
      "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
      NULL },
    { "encrypt.format", VIMG_OPT_STRING, "Encrypt the image, format choices: 'aes', 'luks'",
      NULL },
    { "encrypt.key-secret", VIMG_OPT_STRING,
      "ID of secret providing qcow AES key or LUKS passphrase", NULL },
    { "encrypt.cipher-alg", VIMG_OPT_STRING, "Name of encryption cipher algorithm", NULL },
    { "encrypt.cipher-mode", VIMG_OPT_STRING, "Name of encryption cipher mode", NULL },
    { "encrypt.ivgen-alg", VIMG_OPT_STRING, "Name of IV generator algorithm", NULL },
    { "encrypt.ivgen-hash-alg", VIMG_OPT_STRING, "Name of IV generator hash algorithm", NULL },
    { "encrypt.hash-alg", VIMG_OPT_STRING, "Name of encryption hash algorithm", NULL },
    { "encrypt.iter-time", VIMG_OPT_NUMBER, "Time to spend in PBKDF in milliseconds", NULL },
    { "cluster_size", VIMG_OPT_SIZE, "qcow2 cluster size", "65536" },
    { "extended_l2", VIMG_OPT_BOOL, "Extended L2 tables", "off" },
    { "preallocation", VIMG_OPT_STRING,
      "Preallocation mode (allowed values: off, metadata, falloc, full)", NULL },
    { "compression_type", VIMG_OPT_STRING,
      "Compression method used for image cluster compression", "zlib" },
    { "size", VIMG_OPT_SIZE, "Virtual disk size", NULL },
    { "compat", VIMG_OPT_STRING, "Compatibility level (v2 [0.10] or v3 [1.1])", NULL },
    { "backing_file", VIMG_OPT_STRING, "File name of a base image", NULL },
    { "backing_fmt", VIMG_OPT_STRING, "Image format of the base image", NULL },
    { "data_file", VIMG_OPT_STRING, "File name of an external data file", NULL },
    { "data_file_raw", VIMG_OPT_BOOL, "The external data file must stay valid as a raw image",
      NULL },
    { "lazy_refcounts", VIMG_OPT_BOOL, "Postpone refcount updates", "off" },
    { "refcount_bits", VIMG_OPT_NUMBER, "Width of a reference count entry in bits", "16" },
    { NULL },
};

/* The block drivers qemu 7.2 knows (for backing_fmt's enum check). */
static bool qcow2_known_fmt(const char *f)
{
    static const char *const names[] = {
        "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop",
        "compress", "copy-before-write", "copy-on-read", "dmg", "file", "snapshot-access",
        "ftp", "ftps", "gluster", "host_cdrom", "host_device", "http", "https", "io_uring",
        "iscsi", "luks", "nbd", "nfs", "null-aio", "null-co", "nvme", "nvme-io_uring",
        "parallels", "preallocate", "qcow", "qcow2", "qed", "quorum", "raw", "rbd",
        "replication", "ssh", "throttle", "vdi", "vhdx", "virtio-blk-vfio-pci",
        "virtio-blk-vhost-user", "virtio-blk-vhost-vdpa", "vmdk", "vpc", "vvfat",
    };
    for (size_t i = 0; i < VIMG_ARRAY_SIZE(names); i++) {
        if (0 == strcmp(f, names[i])) {
            return true;
        }
    }
    return false;
}

/* qemu's metadata preallocation: per L2 table, the table first and then
 * its data clusters in one contiguous run, entries NORMAL|COPIED. */
int qcow2_prealloc_metadata(struct vimg_image *img, uint64_t from, uint64_t to,
                            struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    bool data_file = !!(s->incompat & QCOW2_INCOMPAT_DATAFILE);
    uint64_t gc = qcow2_start_of_cluster(s, from), last_end = 0;
    int ret;

    while (gc < to) {
        uint64_t l1_idx = gc >> (s->cluster_bits + s->l2_bits);
        uint64_t idx = (gc >> s->cluster_bits) & (s->l2_entries - 1);
        uint64_t n = VIMG_MIN(s->l2_entries - idx,
                              vimg_div_round_up(to - gc, s->cluster_size));
        uint64_t host, l2_off;
        uint8_t *l2;

        if (!(s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK)) {
            ret = qcow2_alloc_clusters(img, 1, &l2_off, err);
            if (ret < 0) {
                return ret;
            }
            ret = qcow2_cache_get(img, &s->l2_cache, l2_off, false, &l2, err);
            if (ret < 0) {
                return ret;
            }
            ret = vimg_file_pwrite(img->file, l2, s->cluster_size, l2_off);
            if (ret < 0) {
                return qcow2_io_error(img, ret, "Could not write L2 table", err);
            }
            s->l1[l1_idx] = l2_off | QCOW2_OFLAG_COPIED;
            {
                uint8_t b[8];
                vimg_st_be64(b, s->l1[l1_idx]);
                ret = vimg_file_pwrite(img->file, b, 8, s->l1_offset + l1_idx * 8);
                if (ret < 0) {
                    return qcow2_io_error(img, ret, "Could not write L1 table", err);
                }
            }
        }
        l2_off = s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK;
        if (data_file) {
            host = gc;
        } else {
            ret = qcow2_alloc_clusters(img, n, &host, err);
            if (ret < 0) {
                return ret;
            }
        }
        ret = qcow2_read_l2(img, l2_off, &l2, err);
        if (ret < 0) {
            return ret;
        }
        for (uint64_t i = 0; i < n; i++) {
            vimg_st_be64(l2 + (idx + i) * s->l2_entry_size,
                         (host + i * s->cluster_size) | QCOW2_OFLAG_COPIED);
            if (s->ext_l2) {
                vimg_st_be64(l2 + (idx + i) * 16 + 8, 0);
            }
        }
        ret = vimg_file_pwrite(img->file, l2 + idx * s->l2_entry_size,
                               n * s->l2_entry_size, l2_off + idx * s->l2_entry_size);
        if (ret < 0) {
            return qcow2_io_error(img, ret, "Could not write L2 table", err);
        }
        last_end = host + n * s->cluster_size;
        gc += n * s->cluster_size;
    }
    if (last_end) {
        int64_t fsize = vimg_file_size(s->data_file);
        if (fsize >= 0 && (uint64_t)fsize < last_end) {
            ret = s->data_file->ops->truncate(s->data_file, last_end);
            if (ret < 0) {
                return qcow2_io_error(img, ret, "Could not resize image", err);
            }
        }
    }
    return 0;
}

static int qcow2_do_create(const char *filename, struct vimg_file *f, uint64_t size,
                           int version, uint64_t cluster_size, unsigned refcount_order,
                           bool ext_l2, bool lazy, int ctype, enum vimg_prealloc prealloc,
                           const char *backing, const char *backing_fmt,
                           const char *data_file, struct vimg_file *df, bool data_raw,
                           struct vimg_error *err)
{
    uint8_t *buf = calloc(3, cluster_size);
    struct vimg_image *img;
    struct qcow2_state *s;
    uint64_t off;
    bool inline_prealloc;
    int ret;

    if (!buf) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    vimg_st_be32(buf, QCOW2_MAGIC);
    vimg_st_be32(buf + 4, (uint32_t)version);
    vimg_st_be32(buf + 20, (uint32_t)__builtin_ctzll(cluster_size));
    vimg_st_be64(buf + 48, cluster_size);
    vimg_st_be32(buf + 56, 1);
    vimg_st_be64(buf + 72, (ctype ? QCOW2_INCOMPAT_COMPRESS : 0) |
                           (ext_l2 ? QCOW2_INCOMPAT_EXTL2 : 0));
    vimg_st_be64(buf + 80, lazy ? QCOW2_COMPAT_LAZY : 0);
    vimg_st_be32(buf + 96, refcount_order);
    vimg_st_be32(buf + 100, 112);
    buf[104] = (uint8_t)ctype;
    vimg_st_be64(buf + cluster_size, 2 * cluster_size);
    ret = vimg_file_pwrite(f, buf, 3 * cluster_size, 0);
    free(buf);
    if (ret < 0) {
        vimg_error_set(err, -ret, "Could not write qcow2 header: %s", strerror(-ret));
        vimg_file_close(f);
        return ret;
    }
    ret = vimg_internal_open_file(&img, f, "qcow2", VIMG_OPEN_RDWR, err);
    if (ret < 0) {
        if (df) {
            vimg_file_close(df);
        }
        return ret;
    }
    s = qcow2_s(img);
    s->creating = true;
    ret = qcow2_alloc_clusters(img, 3, &off, err);
    s->creating = false;
    if (ret < 0) {
        goto out;
    }
    if (data_file) {
        s->incompat |= QCOW2_INCOMPAT_DATAFILE;
        if (data_raw) {
            s->autoclear |= QCOW2_AUTOCLEAR_RAW;
        }
        s->data_file_name = strdup(data_file);
        s->data_file = df;
        s->own_data_file = true;
        df = NULL;
    }
    ret = qcow2_write_header(img, err);
    if (ret < 0) {
        goto out;
    }
    /* falloc/full into the image file: qemu's truncate lays the image out
     * itself (a new refcount area past the L1 table, then the data) */
    inline_prealloc = !data_file && (VIMG_PREALLOC_FALLOC == prealloc ||
                                     VIMG_PREALLOC_FULL == prealloc);
    ret = qcow2_truncate(img, size, inline_prealloc ? prealloc : VIMG_PREALLOC_OFF, err);
    if (ret < 0) {
        vimg_error_prefix(err, "Could not resize image: ");
        goto out;
    }
    if (data_file) {
        static const uint8_t zeros[4096];
        if (VIMG_PREALLOC_OFF == prealloc) {
            ret = s->data_file->ops->truncate(s->data_file, size);
            if (ret < 0) {
                qcow2_io_error(img, ret, "Could not resize image", err);
                goto out;
            }
        }
        if (size) {
            /* qemu's file layer writes the first block of a new file while
             * probing its alignment: same allocation map */
            vimg_file_pwrite(s->data_file, zeros, size < sizeof(zeros) ? 512 : sizeof(zeros),
                             0);
        }
    }
    if (VIMG_PREALLOC_OFF != prealloc && !inline_prealloc) {
        ret = qcow2_prealloc_metadata(img, 0, size, err);
        if (ret < 0) {
            goto out;
        }
        if (VIMG_PREALLOC_FALLOC == prealloc || VIMG_PREALLOC_FULL == prealloc) {
            /* only an external data file comes here */
            int64_t len = vimg_file_size(s->data_file);
            if (len > 0) {
                ret = s->data_file->ops->allocate(s->data_file, 0, (uint64_t)len,
                                                  VIMG_PREALLOC_FULL == prealloc
                                                      ? VIMG_ALLOC_FULL : VIMG_ALLOC_FALLOC);
                if (ret < 0 && -ENOTSUP != ret) {
                    qcow2_io_error(img, ret, "Could not preallocate data", err);
                    goto out;
                }
                ret = 0;
            }
        }
    }
    if (backing) {
        s->backing_name = strdup(backing);
        s->backing_fmt = backing_fmt ? strdup(backing_fmt) : NULL;
        struct vimg_error e2 = { 0 };
        ret = qcow2_write_header(img, &e2);
        if (ret < 0) {
            vimg_error_set(err, -ret, "Could not assign backing file '%s' with format "
                           "'%s': %s", backing, backing_fmt ? backing_fmt : "(null)",
                           strerror(-ret));
            goto out;
        }
    }
    ret = qcow2_flush(img, err);
out:
    if (df) {
        vimg_file_close(df);
    }
    vimg_close(img);
    return ret;
}

int qcow2_create(const char *filename, const struct vimg_opts *opts, struct vimg_error *err)
{
    uint64_t size = vimg_internal_opt_size(opts, "size", 0);
    uint64_t cluster_size = vimg_internal_opt_size(opts, "cluster_size", 65536);
    const char *compat = vimg_internal_opt_str(opts, "compat", NULL);
    const char *pstr = vimg_internal_opt_str(opts, "preallocation", NULL);
    const char *ctype_s = vimg_internal_opt_str(opts, "compression_type", NULL);
    const char *backing = vimg_internal_opt_str(opts, "backing_file", NULL);
    const char *backing_fmt = vimg_internal_opt_str(opts, "backing_fmt", NULL);
    const char *data_file = vimg_internal_opt_str(opts, "data_file", NULL);
    bool data_raw = vimg_internal_opt_bool(opts, "data_file_raw", false);
    bool ext_l2 = vimg_internal_opt_bool(opts, "extended_l2", false);
    bool lazy = vimg_internal_opt_bool(opts, "lazy_refcounts", false);
    const char *rbits_s = vimg_internal_opt_str(opts, "refcount_bits", NULL);
    const char *enc = vimg_internal_opt_str(opts, "encryption", NULL);
    const char *encf = vimg_internal_opt_str(opts, "encrypt.format", NULL);
    enum vimg_prealloc prealloc = VIMG_PREALLOC_OFF;
    uint64_t refcount_bits = 16;
    struct vimg_file *f = NULL, *df = NULL;
    int version = 3, ctype = 0;
    int ret;

    /* The checks the QAPI visitor makes, in its field order. */
    if (compat && strcmp(compat, "0.10") && strcmp(compat, "1.1") &&
        strcmp(compat, "v2") && strcmp(compat, "v3")) {
        vimg_error_set(err, EINVAL, "Parameter 'version' does not accept value '%s'", compat);
        return -EINVAL;
    }
    if (compat && (0 == strcmp(compat, "0.10") || 0 == strcmp(compat, "v2"))) {
        version = 2;
    }
    if (backing_fmt && !qcow2_known_fmt(backing_fmt)) {
        vimg_error_set(err, EINVAL, "Parameter 'backing-fmt' does not accept value '%s'",
                       backing_fmt);
        return -EINVAL;
    }
    if (pstr && vimg_prealloc_parse(pstr, &prealloc) < 0) {
        vimg_error_set(err, EINVAL, "Parameter 'preallocation' does not accept value '%s'",
                       pstr);
        return -EINVAL;
    }
    if (ctype_s) {
        if (0 == strcmp(ctype_s, "zlib")) {
            ctype = 0;
        } else if (0 == strcmp(ctype_s, "zstd")) {
            ctype = 1;
        } else {
            vimg_error_set(err, EINVAL, "Parameter 'compression-type' does not accept value "
                           "'%s'", ctype_s);
            return -EINVAL;
        }
    }
    if (rbits_s) {
        char *end;
        refcount_bits = strtoull(rbits_s, &end, 0);
    }
    if ((enc && 0 == strcmp(enc, "on")) || encf) {
        vimg_error_set(err, ENOTSUP, "encrypted qcow2 images are not supported");
        return -ENOTSUP;
    }
    vimg_round_up(size, 512, &size);

    /* qemu creates the file first and deletes it again on failure */
    ret = vimg_file_open_posix(&f, filename, VIMG_FILE_RDWR | VIMG_FILE_CREATE);
    if (ret < 0) {
        vimg_error_set(err, -ret, "Could not create '%s': %s", filename, strerror(-ret));
        return ret;
    }
    ret = vimg_internal_lock_file(f, VIMG_PERM_WRITE | VIMG_PERM_RESIZE, VIMG_PERM_RESIZE,
                                  err);
    if (ret < 0) {
        vimg_file_close(f);
        return ret;
    }
    ret = f->ops->truncate(f, 0);
    if (ret < 0) {
        vimg_error_set(err, -ret, "Could not clear the file: %s", strerror(-ret));
        goto fail_file;
    }
    if (data_file) {
        ret = vimg_file_open_posix(&df, data_file, VIMG_FILE_RDWR | VIMG_FILE_CREATE);
        if (ret < 0) {
            vimg_error_set(err, -ret, "Could not create '%s': %s", data_file, strerror(-ret));
            goto fail_file;
        }
        ret = df->ops->truncate(df, 0);
        if (ret < 0) {
            vimg_error_set(err, -ret, "Could not clear the file: %s", strerror(-ret));
            goto fail_file;
        }
    }
    ret = -EINVAL;
    if (ext_l2 && version < 3) {
        vimg_error_set(err, EINVAL, "Extended L2 entries are only supported with "
                       "compatibility level 1.1 and above (use version=v3 or greater)");
        goto fail_file;
    }
    if (!vimg_is_pow2(cluster_size) || cluster_size < 512 || cluster_size > (2u << 20)) {
        vimg_error_set(err, EINVAL, "Cluster size must be a power of two between 512 and "
                       "2048k");
        goto fail_file;
    }
    if (ext_l2 && cluster_size < 16384) {
        vimg_error_set(err, EINVAL, "Extended L2 entries are only supported with cluster "
                       "sizes of at least 16384 bytes");
        goto fail_file;
    }
    if (backing && VIMG_PREALLOC_OFF != prealloc && !ext_l2) {
        vimg_error_set(err, EINVAL, "Backing file and preallocation can only be used at the "
                       "same time if extended_l2 is on");
        goto fail_file;
    }
    if (backing_fmt && !backing) {
        vimg_error_set(err, EINVAL, "Backing format cannot be used without backing file");
        goto fail_file;
    }
    if (version < 3 && lazy) {
        vimg_error_set(err, EINVAL, "Lazy refcounts only supported with compatibility level "
                       "1.1 and above (use version=v3 or greater)");
        goto fail_file;
    }
    if (refcount_bits > 64 || !vimg_is_pow2(refcount_bits)) {
        vimg_error_set(err, EINVAL, "Refcount width must be a power of two and may not "
                       "exceed 64 bits");
        goto fail_file;
    }
    if (version < 3 && 16 != refcount_bits) {
        vimg_error_set(err, EINVAL, "Different refcount widths than 16 bits require "
                       "compatibility level 1.1 or above (use version=v3 or greater)");
        goto fail_file;
    }
    if (data_raw && !data_file) {
        vimg_error_set(err, EINVAL, "data-file-raw requires data-file");
        goto fail_file;
    }
    if (data_raw && backing) {
        vimg_error_set(err, EINVAL, "Backing file and data-file-raw cannot be used at the "
                       "same time");
        goto fail_file;
    }
    if (data_raw && VIMG_PREALLOC_OFF == prealloc) {
        prealloc = VIMG_PREALLOC_METADATA;
    }
    if (data_file && version < 3) {
        vimg_error_set(err, EINVAL, "External data files are only supported with "
                       "compatibility level 1.1 and above (use version=v3 or greater)");
        goto fail_file;
    }
    if (ctype && version < 3) {
        vimg_error_set(err, EINVAL, "Non-zlib compression type is only supported with "
                       "compatibility level 1.1 and above (use version=v3 or greater)");
        goto fail_file;
    }
#if !HAVE_ZSTD
    if (ctype) {
        vimg_error_set(err, EINVAL, "Unknown compression type");
        goto fail_file;
    }
#endif
    {
        /* the L1 table must fit in 32 MiB */
        uint64_t l2_entries = cluster_size / (ext_l2 ? 16 : 8);
        uint64_t span = l2_entries * cluster_size;
        if (vimg_div_round_up(size, span) > QCOW2_MAX_L1_SIZE / 8) {
            vimg_error_set(err, EFBIG, "Could not resize image: The image size is too large "
                           "for file format 'qcow2' (try using a larger cluster size)");
            ret = -EFBIG;
            goto fail_file;
        }
    }
    ret = qcow2_do_create(filename, f, size, version, cluster_size,
                          (unsigned)__builtin_ctzll(refcount_bits), ext_l2, lazy, ctype,
                          prealloc, backing, backing_fmt, data_file, df, data_raw, err);
    f = NULL;
    df = NULL;
    if (ret < 0) {
        unlink(filename);
        if (data_file) {
            unlink(data_file);
        }
    }
    return ret;
fail_file:
    if (df) {
        vimg_file_close(df);
        unlink(data_file);
    }
    vimg_file_close(f);
    unlink(filename);
    return ret;
}

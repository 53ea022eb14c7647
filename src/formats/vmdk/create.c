/*
 * qemu-img create -f vmdk: the same files, names and descriptor text as
 * qemu-img 7.2 (only the random CID differs), except streamOptimized, which
 * vimg writes in VMware's stream layout (GD at the end, markers, footer)
 * so that grains can be appended in one pass.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/image.h"
#include "core/opts.h"
#include "formats/vmdk/vmdk.h"
#include "util/util.h"

const struct vimg_opt_desc vmdk_create_opts[] = {
    { "size", VIMG_OPT_SIZE, "Virtual disk size", NULL },
    { "adapter_type", VIMG_OPT_STRING, "Virtual adapter type, can be one of ide (default), "
      "lsilogic, buslogic or legacyESX", NULL },
    { "backing_file", VIMG_OPT_STRING, "File name of a base image", NULL },
    { "backing_fmt", VIMG_OPT_STRING, "Must be 'vmdk' if present", NULL },
    { "compat6", VIMG_OPT_BOOL, "VMDK version 6 image", "off" },
    { "hwversion", VIMG_OPT_STRING, "VMDK hardware version", "undefined" },
    { "toolsversion", VIMG_OPT_STRING, "VMware guest tools version", NULL },
    { "subformat", VIMG_OPT_STRING, "VMDK flat extent format, can be one of {monolithicSparse "
      "(default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | "
      "streamOptimized} ", NULL },
    { "zeroed_grain", VIMG_OPT_BOOL, "Enable efficient zero writes using the zeroed-grain "
      "GTE feature", NULL },
    { NULL },
};

enum vmdk_subfmt {
    VMDK_SUB_MONO_SPARSE,
    VMDK_SUB_MONO_FLAT,
    VMDK_SUB_2G_SPARSE,
    VMDK_SUB_2G_FLAT,
    VMDK_SUB_STREAM,
};

static const char *const vmdk_subfmt_names[] = {
    "monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
    "streamOptimized",
};

static const char *const vmdk_adapter_names[] = { "ide", "buslogic", "lsilogic", "legacyESX" };

#define VMDK_SPLIT_SIZE 0x80000000ull

static int vmdk_create_file(const char *name, struct vimg_file **out, struct vimg_error *err)
{
    int ret = vimg_file_open_posix(out, name, VIMG_FILE_RDWR | VIMG_FILE_CREATE |
                                   VIMG_FILE_TRUNC);
    if (ret < 0) {
        vimg_error_set(err, -ret, "Could not create '%s': %s", name, strerror(-ret));
        return ret;
    }
    ret = vimg_internal_lock_file(*out, VIMG_PERM_WRITE | VIMG_PERM_RESIZE,
                                  VIMG_PERM_RESIZE, err);
    if (ret < 0) {
        vimg_file_close(*out);
        *out = NULL;
    }
    return ret;
}

static int vmdk_cio(struct vimg_error *err, int ret, const char *name)
{
    vimg_error_set(err, -ret, "Could not write '%s': %s", name, strerror(-ret));
    return ret;
}

/* A hosted sparse extent as qemu lays it out: header, redundant GD and
 * GTs, GD and GTs, grains from overHead on. */
static int vmdk_init_sparse(struct vimg_file *f, uint64_t size, bool zeroed,
                            struct vimg_error *err)
{
    struct vmdk4_header h = { 0 };
    struct vmdk_layout l;
    uint8_t hb[512];
    uint8_t *gd;
    int ret;

    h.version = zeroed ? 2 : 1;
    h.flags = VMDK4_FLAG_RGD | VMDK4_FLAG_NL_DETECT | (zeroed ? VMDK4_FLAG_ZERO_GRAIN : 0);
    h.capacity = size / VMDK_SECTOR;
    h.grain = 128;
    h.gtes = 512;
    vmdk_layout(h.capacity, h.grain, h.gtes, &l);
    if (l.gt_count > UINT32_MAX / 4 || l.overhead > VMDK_MAX_ALLOC_SECTOR) {
        vimg_error_set(err, EFBIG, "The image size is too large for file format 'vmdk'");
        return -EFBIG;
    }
    h.desc_off = 1;
    h.desc_size = 20;
    h.rgd_off = l.rgd;
    h.gd_off = l.gd;
    h.overhead = l.overhead;
    vmdk4_header_encode(&h, hb);
    if ((ret = vimg_file_pwrite(f, hb, sizeof(hb), 0)) < 0) {
        return vmdk_cio(err, ret, f->name);
    }
    if ((ret = f->ops->truncate(f, l.overhead * VMDK_SECTOR)) < 0) {
        return vmdk_cio(err, ret, f->name);
    }
    gd = calloc(1, l.gd_sectors * VMDK_SECTOR + 1);
    if (!gd) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    for (int copy = 0; copy < 2 && 0 == ret; copy++) {
        uint64_t base = 0 == copy ? l.rgd : l.gd;
        for (uint64_t i = 0; i < l.gt_count; i++) {
            vimg_st_le32(gd + i * 4, (uint32_t)(base + l.gd_sectors + i * l.gt_sectors));
        }
        ret = vimg_file_pwrite(f, gd, l.gd_sectors * VMDK_SECTOR, base * VMDK_SECTOR);
        if (ret < 0) {
            vmdk_cio(err, ret, f->name);
        }
    }
    free(gd);
    return ret;
}

/* An empty stream: header (GD at end), descriptor area, then GD marker,
 * an all-zero GD, footer marker, footer and end-of-stream marker. */
static int vmdk_init_stream(struct vimg_file *f, uint64_t size, struct vimg_error *err)
{
    struct vmdk4_header h = { 0 };
    uint64_t l1, gd_secs, at, bytes;
    uint8_t *b;
    int ret;

    h.version = 3;
    h.flags = VMDK4_FLAG_NL_DETECT | VMDK4_FLAG_COMPRESS | VMDK4_FLAG_MARKER;
    h.capacity = size / VMDK_SECTOR;
    h.grain = 128;
    h.gtes = 512;
    h.desc_off = 1;
    h.desc_size = 20;
    h.gd_off = VMDK_GD_AT_END;
    h.overhead = 128;
    h.compress = 1;
    l1 = vimg_div_round_up(h.capacity, h.grain * h.gtes);
    if (l1 > VMDK_MAX_L1) {
        vimg_error_set(err, EFBIG, "The image size is too large for file format 'vmdk'");
        return -EFBIG;
    }
    gd_secs = vimg_div_round_up(l1 * 4, VMDK_SECTOR);
    at = h.overhead * VMDK_SECTOR;
    bytes = at + (1 + gd_secs + 3) * VMDK_SECTOR;
    b = calloc(1, bytes);
    if (!b) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    vmdk4_header_encode(&h, b);
    vimg_st_le64(b + at, gd_secs);
    vimg_st_le32(b + at + 12, VMDK_MARKER_GD);
    at += (1 + gd_secs) * VMDK_SECTOR;
    vimg_st_le64(b + at, 1);
    vimg_st_le32(b + at + 12, VMDK_MARKER_FOOTER);
    h.gd_off = h.overhead + 1;
    vmdk4_header_encode(&h, b + at + VMDK_SECTOR);
    ret = vimg_file_pwrite(f, b, bytes, 0);
    free(b);
    return ret < 0 ? vmdk_cio(err, ret, f->name) : 0;
}

/* qemu's split of a name into folder, stem and suffix. */
static int vmdk_decompose(const char *filename, char **path, char **prefix, char **postfix,
                          struct vimg_error *err)
{
    const char *p, *q;

    if (!filename || !filename[0]) {
        vimg_error_set(err, EINVAL, "No filename provided");
        return -EINVAL;
    }
    p = strrchr(filename, '/');
    if (!p) {
        p = strrchr(filename, '\\');
    }
    if (!p) {
        p = strrchr(filename, ':');
    }
    p = p ? p + 1 : filename;
    q = strrchr(p, '.');
    *path = strndup(filename, (size_t)(p - filename));
    *prefix = strndup(p, q ? (size_t)(q - p) : strlen(p));
    *postfix = strdup(q ? q : "");
    if (!*path || !*prefix || !*postfix) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    return 0;
}

static int vmdk_enum(const char *v, const char *const *names, size_t n, int def,
                     struct vimg_error *err)
{
    if (!v) {
        return def;
    }
    for (size_t i = 0; i < n; i++) {
        if (0 == strcmp(v, names[i])) {
            return (int)i;
        }
    }
    vimg_error_set(err, EINVAL, "invalid parameter value: %s", v);
    return -EINVAL;
}

/* The parent's CID, read through a normal open of the backing image. */
static int vmdk_parent_cid(const char *filename, const char *backing, uint32_t *cid,
                           struct vimg_error *err)
{
    const char *slash = strrchr(filename, '/');
    struct vimg_image *b;
    char *full;
    int ret;

    if ('/' == backing[0] || !slash) {
        full = strdup(backing);
    } else if (asprintf(&full, "%.*s/%s", (int)(slash - filename), filename, backing) < 0) {
        full = NULL;
    }
    if (!full) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    ret = vimg_open(&b, full, NULL, VIMG_OPEN_NO_BACKING, NULL, err);
    free(full);
    if (ret < 0) {
        return ret;
    }
    if (b->drv != &vimg_driver_vmdk) {
        vimg_error_set(err, EINVAL, "Invalid backing file format: %s. Must be vmdk",
                       b->drv->name);
        vimg_close(b);
        return -EINVAL;
    }
    *cid = ((struct vmdk_state *)b->opaque)->cid;
    vimg_close(b);
    return 0;
}

static char *vmdk_basename(const char *name)
{
    const char *s = strrchr(name, '/');
    return (char *)(s ? s + 1 : name);
}

/* The name a monolithic image's own extent line gives: convert writes a
 * new single-file target as ".NAME.vimg-XXXXXX" and renames it to NAME
 * afterwards, and the embedded descriptor must name the final file. */
static char *vmdk_self_name(const char *filename)
{
    const char *b = vmdk_basename(filename);
    size_t n = strlen(b);
    if (n > 13 && '.' == b[0] && 0 == strncmp(b + n - 12, ".vimg-", 6)) {
        return strndup(b + 1, n - 13);
    }
    return strdup(b);
}

int vmdk_create(const char *filename, const struct vimg_opts *opts, struct vimg_error *err)
{
    const char *backing_fmt = vimg_internal_opt_str(opts, "backing_fmt", NULL);
    const char *backing = vimg_internal_opt_str(opts, "backing_file", NULL);
    const char *hw = vimg_internal_opt_str(opts, "hwversion", NULL);
    const char *tools = vimg_internal_opt_str(opts, "toolsversion", NULL);
    bool compat6 = vimg_internal_opt_bool(opts, "compat6", false);
    bool zeroed = vimg_internal_opt_bool(opts, "zeroed_grain", false);
    char *path = NULL, *prefix = NULL, *postfix = NULL, *lines = NULL, *desc = NULL;
    char *hint_line = NULL;
    size_t lines_len = 0;
    struct vimg_file *df = NULL;
    uint64_t size, created = 0;
    uint32_t parent_cid = 0xffffffff, heads = 16;
    int adapter, sub, ret;
    bool flat, split, compress;

    if (backing_fmt && 0 != strcmp(backing_fmt, "vmdk")) {
        vimg_error_set(err, EINVAL, "backing_file must be a vmdk image");
        return -EINVAL;
    }
    if ((ret = vmdk_decompose(filename, &path, &prefix, &postfix, err)) < 0) {
        goto out;
    }
    if (!vimg_round_up(vimg_internal_opt_size(opts, "size", 0), VMDK_SECTOR, &size) ||
        size > INT64_MAX) {
        vimg_error_set(err, EFBIG, "The image size is too large for file format 'vmdk'");
        ret = -EFBIG;
        goto out;
    }
    if (hw && 0 == strcmp(hw, "undefined")) {
        hw = NULL;
    }
    adapter = vmdk_enum(vimg_internal_opt_str(opts, "adapter_type", NULL), vmdk_adapter_names,
                        VIMG_ARRAY_SIZE(vmdk_adapter_names), 0, err);
    if ((ret = adapter) < 0) {
        goto out;
    }
    sub = vmdk_enum(vimg_internal_opt_str(opts, "subformat", NULL), vmdk_subfmt_names,
                    VIMG_ARRAY_SIZE(vmdk_subfmt_names), VMDK_SUB_MONO_SPARSE, err);
    if ((ret = sub) < 0) {
        goto out;
    }
    if (compat6) {
        if (hw) {
            vimg_error_set(err, EINVAL, "compat6 cannot be enabled with hwversion set");
            ret = -EINVAL;
            goto out;
        }
        hw = "6";
    }
    hw = hw ? hw : "4";
    tools = tools ? tools : "2147483647";
    if (0 != adapter) {
        heads = 255;
    }
    split = VMDK_SUB_2G_FLAT == sub || VMDK_SUB_2G_SPARSE == sub;
    flat = VMDK_SUB_MONO_FLAT == sub || VMDK_SUB_2G_FLAT == sub;
    compress = VMDK_SUB_STREAM == sub;
    if (flat && backing) {
        vimg_error_set(err, ENOTSUP, "Flat image can't have backing file");
        ret = -ENOTSUP;
        goto out;
    }
    if (flat && zeroed) {
        vimg_error_set(err, ENOTSUP, "Flat image can't enable zeroed grain");
        ret = -ENOTSUP;
        goto out;
    }
    if (compress && (uint64_t)size / VMDK_SECTOR / 128 > UINT32_MAX) {
        vimg_error_set(err, EFBIG, "The image size is too large for file format 'vmdk'");
        ret = -EFBIG;
        goto out;
    }

    /* the descriptor file (the whole image when monolithic and sparse) */
    if ((ret = vmdk_create_file(filename, &df, err)) < 0) {
        goto out;
    }
    if (!split && !flat) {
        ret = compress ? vmdk_init_stream(df, size, err) : vmdk_init_sparse(df, size, zeroed, err);
        if (ret < 0) {
            goto out;
        }
        created = size;
        char *self = vmdk_self_name(filename);
        if (!self || asprintf(&lines, "RW %" PRIu64 " SPARSE \"%s\"\n", size / VMDK_SECTOR,
                              self) < 0) {
            free(self);
            lines = NULL;
            ret = -ENOMEM;
            vimg_error_set(err, ENOMEM, "out of memory");
            goto out;
        }
        free(self);
        lines_len = strlen(lines);
    }
    if (backing) {
        if ((ret = vmdk_parent_cid(filename, backing, &parent_cid, err)) < 0) {
            goto out;
        }
        if (asprintf(&hint_line, "parentFileNameHint=\"%s\"", backing) < 0) {
            hint_line = NULL;
            ret = -ENOMEM;
            vimg_error_set(err, ENOMEM, "out of memory");
            goto out;
        }
    }
    for (unsigned idx = 1; created < size; idx++) {
        uint64_t cur = VIMG_MIN(size - created, split ? VMDK_SPLIT_SIZE : size);
        struct vimg_file *xf;
        char *name, *line, *nl;
        int r2;

        if (split) {
            r2 = asprintf(&name, "%s%s-%c%03u%s", path, prefix, flat ? 'f' : 's', idx,
                          postfix);
        } else {
            r2 = asprintf(&name, "%s%s-flat%s", path, prefix, postfix);
        }
        if (r2 < 0) {
            vimg_error_set(err, ENOMEM, "out of memory");
            ret = -ENOMEM;
            goto out;
        }
        ret = vmdk_create_file(name, &xf, err);
        if (0 == ret) {
            if (flat) {
                static const char zeros[4096];
                ret = xf->ops->truncate(xf, cur);
                if (ret < 0) {
                    vmdk_cio(err, ret, name);
                } else if (cur) {
                    /* qemu's file layer writes the first block of a fresh
                     * file; mirror it so allocation (disk size) agrees */
                    vimg_file_pwrite(xf, zeros, cur < sizeof(zeros) ? 512 : sizeof(zeros), 0);
                }
            } else {
                ret = vmdk_init_sparse(xf, cur, zeroed, err);
            }
            vimg_file_close(xf);
        }
        if (ret < 0) {
            free(name);
            goto out;
        }
        r2 = flat ? asprintf(&line, "RW %" PRIu64 " FLAT \"%s\" 0\n", cur / VMDK_SECTOR,
                             vmdk_basename(name))
                  : asprintf(&line, "RW %" PRIu64 " SPARSE \"%s\"\n", cur / VMDK_SECTOR,
                             vmdk_basename(name));
        free(name);
        if (r2 < 0 || !(nl = realloc(lines, lines_len + strlen(line) + 1))) {
            if (r2 >= 0) {
                free(line);
            }
            vimg_error_set(err, ENOMEM, "out of memory");
            ret = -ENOMEM;
            goto out;
        }
        lines = nl;
        memcpy(lines + lines_len, line, strlen(line) + 1);
        lines_len += strlen(line);
        free(line);
        created += cur;
    }

    if (asprintf(&desc,
                 "# Disk DescriptorFile\n"
                 "version=1\n"
                 "CID=%" PRIx32 "\n"
                 "parentCID=%" PRIx32 "\n"
                 "createType=\"%s\"\n"
                 "%s"
                 "\n"
                 "# Extent description\n"
                 "%s"
                 "\n"
                 "# The Disk Data Base\n"
                 "#DDB\n"
                 "\n"
                 "ddb.virtualHWVersion = \"%s\"\n"
                 "ddb.geometry.cylinders = \"%" PRId64 "\"\n"
                 "ddb.geometry.heads = \"%" PRIu32 "\"\n"
                 "ddb.geometry.sectors = \"63\"\n"
                 "ddb.adapterType = \"%s\"\n"
                 "ddb.toolsVersion = \"%s\"\n",
                 vmdk_random_cid(), parent_cid, vmdk_subfmt_names[sub],
                 hint_line ? hint_line : "", lines ? lines : "", hw,
                 (int64_t)size / (int64_t)(63 * heads * VMDK_SECTOR), heads,
                 vmdk_adapter_names[adapter], tools) < 0) {
        desc = NULL;
        vimg_error_set(err, ENOMEM, "out of memory");
        ret = -ENOMEM;
        goto out;
    }
    if (!split && !flat) {
        /* embedded: it must fit the 20 sectors before the tables */
        if (strlen(desc) > 20 * VMDK_SECTOR) {
            vimg_error_set(err, EINVAL, "descriptor too long for an embedded descriptor "
                           "(backing file name too long?)");
            ret = -EINVAL;
            goto out;
        }
        ret = vimg_file_pwrite(df, desc, strlen(desc), 0x200);
    } else {
        ret = vimg_file_pwrite(df, desc, strlen(desc), 0);
        if (0 == ret) {
            ret = df->ops->truncate(df, strlen(desc));
        }
    }
    if (ret < 0) {
        vimg_error_set(err, -ret, "Could not write description: %s", strerror(-ret));
        goto out;
    }
    ret = 0;
out:
    if (df) {
        vimg_file_close(df);
    }
    free(path);
    free(prefix);
    free(postfix);
    free(lines);
    free(desc);
    free(hint_line);
    return ret;
}

/* raw: the guest disk is the host file, byte for byte. */
#include "config.h"

#include <inttypes.h>
#include <errno.h>
#include <string.h>

#include "core/image.h"
#include "core/opts.h"
#include "util/util.h"

/* qemu rounds a raw image's length up to whole 512-byte sectors. */
#define RAW_SECTOR 512

static int raw_probe(const uint8_t *buf, size_t len, const char *filename)
{
    return 1;
}

static int raw_io_error(struct vimg_image *img, int ret, const char *what,
                        uint64_t offset, struct vimg_error *err)
{
    vimg_error_set(err, -ret, "error while %s at byte %" PRIu64 ": %s", what, offset,
                   strerror(-ret));
    return ret;
}

static int raw_update_size(struct vimg_image *img, struct vimg_error *err)
{
    int64_t len = vimg_file_size(img->file);
    uint64_t size;
    if (len < 0) {
        vimg_error_set(err, (int)-len, "Could not get the size of '%s': %s", img->filename,
                       strerror((int)-len));
        return (int)len;
    }
    if (!vimg_round_up((uint64_t)len, RAW_SECTOR, &size)) {
        size = (uint64_t)len;
    }
    img->size = size;
    return 0;
}

static int raw_open(struct vimg_image *img, unsigned flags, struct vimg_error *err)
{
    return raw_update_size(img, err);
}

static int raw_block_status(struct vimg_image *img, uint64_t offset, uint64_t max_len,
                            struct vimg_run *run, struct vimg_error *err)
{
    bool is_data;
    uint64_t n;
    int ret = img->file->ops->extent(img->file, offset, max_len, &is_data, &n);
    if (ret < 0) {
        vimg_error_set(err, -ret, "Could not read file metadata: %s", strerror(-ret));
        return ret;
    }
    run->length = n;
    run->flags = VIMG_RUN_ALLOCATED | VIMG_RUN_HOST_VALID |
                 (is_data ? VIMG_RUN_DATA : VIMG_RUN_ZERO);
    run->host = img->file;
    run->host_off = offset;
    return 0;
}

static int raw_read(struct vimg_image *img, void *buf, size_t len, uint64_t offset,
                    struct vimg_error *err)
{
    int ret = vimg_file_pread(img->file, buf, len, offset);
    return ret < 0 ? raw_io_error(img, ret, "reading", offset, err) : 0;
}

static int raw_write(struct vimg_image *img, const void *buf, size_t len, uint64_t offset,
                     struct vimg_error *err)
{
    int ret = vimg_file_pwrite(img->file, buf, len, offset);
    return ret < 0 ? raw_io_error(img, ret, "writing", offset, err) : 0;
}

static int raw_write_zeroes(struct vimg_image *img, uint64_t offset, uint64_t len,
                            unsigned flags, struct vimg_error *err)
{
    int ret = img->file->ops->zero(img->file, offset, len, flags & VIMG_ZERO_MAY_UNMAP);
    return ret < 0 ? raw_io_error(img, ret, "writing zeroes", offset, err) : 0;
}

static int raw_discard(struct vimg_image *img, uint64_t offset, uint64_t len,
                       struct vimg_error *err)
{
    int ret = img->file->ops->zero(img->file, offset, len, true);
    return ret < 0 ? raw_io_error(img, ret, "discarding", offset, err) : 0;
}

static int raw_flush(struct vimg_image *img, struct vimg_error *err)
{
    int ret = vimg_file_sync(img->file);
    if (ret < 0) {
        vimg_error_set(err, -ret, "Could not flush '%s': %s", img->filename, strerror(-ret));
    }
    return ret;
}

/* Resize the host file as qemu's file layer does, including its habit of
 * writing the first block of a freshly sized empty file (qemu probes the
 * alignment there), so allocation maps come out the same. */
static int raw_resize_file(struct vimg_file *f, uint64_t size, enum vimg_prealloc prealloc,
                           struct vimg_error *err)
{
    static const char zeros[4096];
    int64_t cur = vimg_file_size(f);
    int ret;

    if (cur < 0) {
        vimg_error_set(err, (int)-cur, "Could not stat file: %s", strerror((int)-cur));
        return (int)cur;
    }
    if ((uint64_t)cur > size && VIMG_PREALLOC_OFF != prealloc) {
        vimg_error_set(err, ENOTSUP, "Cannot use preallocation for shrinking files");
        return -ENOTSUP;
    }
    switch (prealloc) {
    case VIMG_PREALLOC_OFF:
        ret = f->ops->truncate(f, size);
        if (ret < 0) {
            vimg_error_set(err, -ret, "Could not resize file: %s", strerror(-ret));
            return ret;
        }
        break;
    case VIMG_PREALLOC_FALLOC:
        if ((uint64_t)cur == size) {
            return 0;
        }
        ret = f->ops->allocate(f, (uint64_t)cur, size - (uint64_t)cur, VIMG_ALLOC_FULL);
        if (ret < 0) {
            vimg_error_set(err, -ret, "Could not preallocate new data: %s", strerror(-ret));
            return ret;
        }
        break;
    case VIMG_PREALLOC_FULL:
        ret = f->ops->truncate(f, size);
        if (ret < 0) {
            vimg_error_set(err, -ret, "Could not resize file: %s", strerror(-ret));
            return ret;
        }
        /* Real zeros, not reserved extents: "full" must allocate blocks. */
        for (uint64_t off = (uint64_t)cur; off < size;) {
            static const char buf[65536];
            size_t n = (size_t)VIMG_MIN(size - off, sizeof(buf));
            ret = vimg_file_pwrite(f, buf, n, off);
            if (ret < 0) {
                vimg_error_set(err, -ret, "Could not write zeros for preallocation: %s",
                               strerror(-ret));
                return ret;
            }
            off += n;
        }
        ret = vimg_file_sync(f);
        if (ret < 0) {
            vimg_error_set(err, -ret, "Could not flush file to disk: %s", strerror(-ret));
            return ret;
        }
        return 0;
    default:
        vimg_error_set(err, ENOTSUP, "Unsupported preallocation mode: %s",
                       vimg_prealloc_name(prealloc));
        return -ENOTSUP;
    }
    if (0 == cur && size > 0) {
        /* failures are harmless: this only mirrors qemu's allocation */
        vimg_file_pwrite(f, zeros, size < sizeof(zeros) ? 512 : sizeof(zeros), 0);
    }
    return 0;
}

static int raw_truncate(struct vimg_image *img, uint64_t size, enum vimg_prealloc prealloc,
                        struct vimg_error *err)
{
    int ret;
    if (VIMG_PREALLOC_METADATA == prealloc) {
        vimg_error_set(err, ENOTSUP, "Unsupported preallocation mode: metadata");
        return -ENOTSUP;
    }
    ret = raw_resize_file(img->file, size, prealloc, err);
    if (ret < 0) {
        return ret;
    }
    return raw_update_size(img, err);
}

static int raw_create(const char *filename, const struct vimg_opts *opts,
                      struct vimg_error *err)
{
    const char *pstr = vimg_internal_opt_str(opts, "preallocation", "off");
    uint64_t size = vimg_internal_opt_size(opts, "size", 0);
    enum vimg_prealloc prealloc;
    struct vimg_file *f;
    int ret;

    if (vimg_prealloc_parse(pstr, &prealloc) < 0) {
        vimg_error_set(err, EINVAL, "invalid parameter value: %s", pstr);
        return -EINVAL;
    }
    if (VIMG_PREALLOC_METADATA == prealloc) {
        vimg_error_set(err, ENOTSUP, "Unsupported preallocation mode: metadata");
        return -ENOTSUP;
    }
    if (size > INT64_MAX - RAW_SECTOR + 1) {
        vimg_error_set(err, EFBIG, "The image size is too large for file format 'raw'");
        return -EFBIG;
    }
    /* qemu creates raw images in whole sectors */
    vimg_round_up(size, RAW_SECTOR, &size);
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
    } else {
        ret = raw_resize_file(f, size, prealloc, err);
    }
    vimg_file_close(f);
    return ret;
}

static int raw_measure(const struct vimg_opts *opts, struct vimg_image *in,
                       struct vimg_measure *out, struct vimg_error *err)
{
    uint64_t size;
    if (in) {
        size = in->size;
    } else if (!vimg_round_up(vimg_internal_opt_size(opts, "size", 0), RAW_SECTOR, &size)) {
        vimg_error_set(err, EFBIG, "Image size too large");
        return -EFBIG;
    }
    out->required = size;
    out->fully_allocated = size;
    return 0;
}

static bool raw_has_zero_init(struct vimg_image *img)
{
    return true;
}

static const struct vimg_opt_desc raw_create_opts[] = {
    { "size", VIMG_OPT_SIZE, "Virtual disk size", NULL },
    { NULL },
};

const struct vimg_driver vimg_driver_raw = {
    .abi_version = VIMG_DRIVER_ABI_VERSION,
    .name = "raw",
    .instance_size = 0,
    .probe = raw_probe,
    .create_opts = raw_create_opts,
    .open = raw_open,
    .create = raw_create,
    .block_status = raw_block_status,
    .read = raw_read,
    .write = raw_write,
    .write_zeroes = raw_write_zeroes,
    .discard = raw_discard,
    .flush = raw_flush,
    .truncate = raw_truncate,
    .measure = raw_measure,
    .has_zero_init = raw_has_zero_init,
    .data_only = true,
};

/* Opening images, the backing chain, and guest I/O through the drivers. */
#include "config.h"

#include <assert.h>
#include <stdarg.h>
#include <stdio.h>
#include <inttypes.h>
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/image.h"
#include "core/opts.h"
#include "util/util.h"

#define PROBE_BYTES 2048

/* The driver contract: a failure always comes with a message. */
#define DRV_CALL(err, call)                                                   \
    ({                                                                        \
        int ret_ = (call);                                                    \
        assert(ret_ >= 0 || (err)->code);                                     \
        ret_;                                                                 \
    })

static const char *open_strerror(int e)
{
    return strerror(e);
}

int vimg_internal_set_backing(struct vimg_image *img, const char *name, const char *fmt)
{
    free(img->backing_name);
    free(img->backing_fmt);
    img->backing_name = name ? strdup(name) : NULL;
    img->backing_fmt = fmt ? strdup(fmt) : NULL;
    if ((name && !img->backing_name) || (fmt && !img->backing_fmt)) {
        return -ENOMEM;
    }
    return 0;
}

void vimg_internal_warn(struct vimg_image *img, const char *fmt, ...)
{
    va_list ap;
    if (img->warning) {
        return;     /* the first warning is the one that matters */
    }
    va_start(ap, fmt);
    if (vasprintf(&img->warning, fmt, ap) < 0) {
        img->warning = NULL;
    }
    va_end(ap);
}

const char *vimg_warning(const struct vimg_image *img)
{
    return img->warning;
}

static void image_free(struct vimg_image *img)
{
    if (!img) {
        return;
    }
    free(img->warning);
    vimg_file_close(img->file);
    free(img->opaque);
    free(img->filename);
    free(img->backing_name);
    free(img->backing_fmt);
    free(img->full_backing_name);
    free(img->tmp_snapshot_id);
    free(img->tmp_snapshot_name);
    free(img);
}

int vimg_internal_snapshot_load_tmp(struct vimg_image *img, const char *id, const char *name,
                                    struct vimg_error *err)
{
    int ret;

    if (!img->drv->snapshot_load_tmp) {
        vimg_error_set(err, ENOTSUP, "Block format '%s' used by device '' does not support "
                       "temporarily loading internal snapshots", img->drv->name);
        return -ENOTSUP;
    }
    ret = img->drv->snapshot_load_tmp(img, id, name, err);
    if (ret < 0) {
        return ret;
    }
    free(img->tmp_snapshot_id);
    free(img->tmp_snapshot_name);
    img->tmp_snapshot_id = id ? strdup(id) : NULL;
    img->tmp_snapshot_name = name ? strdup(name) : NULL;
    if ((id && !img->tmp_snapshot_id) || (name && !img->tmp_snapshot_name)) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    return 0;
}

void vimg_close(struct vimg_image *img)
{
    while (img) {
        struct vimg_image *next = img->backing;
        if (img->drv && img->drv->close) {
            img->drv->close(img);
        }
        image_free(img);
        img = next;
    }
}

/* A name with a protocol prefix ("json:", "nbd:", "fat:" ...) would make
 * qemu open something other than a local file; an image never may. */
static bool has_protocol_prefix(const char *name)
{
    const char *colon = strchr(name, ':');
    const char *slash = strchr(name, '/');
    if (!colon || (slash && slash < colon)) {
        return false;
    }
    for (const char *p = name; p < colon; p++) {
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
              (*p >= '0' && *p <= '9') || '-' == *p || '+' == *p || '.' == *p ||
              '_' == *p)) {
            return false;
        }
    }
    return colon > name;
}

/* Resolve a backing name relative to the folder of the image that names it. */
static char *resolve_relative(const char *image, const char *name)
{
    const char *slash;
    char *out;
    size_t dirlen;

    if ('/' == name[0] || !(slash = strrchr(image, '/'))) {
        return strdup(name);
    }
    dirlen = (size_t)(slash - image) + 1;
    out = malloc(dirlen + strlen(name) + 1);
    if (out) {
        memcpy(out, image, dirlen);
        strcpy(out + dirlen, name);
    }
    return out;
}

int vimg_internal_lock_file(struct vimg_file *f, unsigned held, unsigned unshared,
                            struct vimg_error *err)
{
    const char *perm = NULL;
    bool shared = false;
    int ret = vimg_file_lock(f, held, unshared, &perm, &shared);
    if (ret < 0) {
        vimg_error_set(err, -ret, "Failed to get %s\"%s\" lock\n"
                       "Is another process using the image [%s]?",
                       shared ? "shared " : "", perm, f->name);
    }
    return ret;
}

/* The permissions qemu's block layer asks for on an image's file. */
static int image_lock(struct vimg_image *img, unsigned flags, struct vimg_error *err)
{
    unsigned held = 0, unshared = 0;

    if (!(flags & VIMG_OPEN_NO_IO)) {
        held |= VIMG_PERM_CONSISTENT_READ;
    }
    if (flags & VIMG_OPEN_RDWR) {
        held |= VIMG_PERM_WRITE;
        if ((flags & VIMG_OPEN_RESIZE) || !img->drv->data_only) {
            held |= VIMG_PERM_RESIZE;
        }
    }
    if (!img->drv->data_only || (flags & VIMG_OPEN_NO_SHARE)) {
        unshared = VIMG_PERM_WRITE | VIMG_PERM_RESIZE;
    }
    if (flags & VIMG_OPEN_FORCE_SHARE) {
        unshared = 0;
    }
    return vimg_internal_lock_file(img->file, held, unshared, err);
}

static int image_open_layer(struct vimg_image **out, struct vimg_file *file,
                            const char *filename, const char *format, unsigned flags,
                            struct vimg_error *err)
{
    const struct vimg_driver *drv;
    struct vimg_image *img;
    bool probed = false;
    int ret;

    if (format) {
        drv = vimg_internal_find_driver(format);
        if (!drv) {
            vimg_error_set(err, EINVAL, "Unknown driver '%s'", format);
            vimg_file_close(file);
            return -EINVAL;
        }
    } else {
        uint8_t buf[PROBE_BYTES];
        int64_t fsize = vimg_file_size(file);
        size_t n = fsize < 0 ? 0 : (size_t)VIMG_MIN((uint64_t)fsize, sizeof(buf));
        ret = vimg_file_pread(file, buf, n, 0);
        if (ret < 0) {
            vimg_error_set(err, -ret, "Could not read image for determining its format: %s",
                           strerror(-ret));
            vimg_file_close(file);
            return ret;
        }
        drv = vimg_internal_probe(buf, n, filename);
        probed = true;
    }

    img = calloc(1, sizeof(*img));
    if (!img) {
        vimg_file_close(file);
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    img->file = file;
    img->drv = drv;
    img->flags = flags;
    img->probed = probed;
    img->limits.request_align = 1;
    img->filename = strdup(filename);
    img->opaque = calloc(1, drv->instance_size ? drv->instance_size : 1);
    if (!img->filename || !img->opaque) {
        image_free(img);
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    ret = image_lock(img, flags, err);
    if (ret < 0) {
        image_free(img);
        return ret;
    }
    ret = DRV_CALL(err, drv->open(img, flags, err));
    if (ret < 0) {
        image_free(img);
        return ret;
    }
    *out = img;
    return 0;
}

static int open_host_file(struct vimg_file **file, const char *filename, unsigned flags,
                          struct vimg_error *err)
{
    int ret = vimg_file_open_posix(file, filename,
                                   (flags & VIMG_OPEN_RDWR) ? VIMG_FILE_RDWR : 0);
    if (0 == ret) {
        (*file)->no_sync = !!(flags & VIMG_OPEN_NO_FLUSH);
    }
    if (-EISDIR == ret || -ENOTSUP == ret) {
        vimg_error_set(err, EINVAL, "'file' driver requires '%s' to be a regular file",
                       filename);
    } else if (ret < 0) {
        vimg_error_set(err, -ret, "Could not open '%s': %s", filename,
                       open_strerror(-ret));
    }
    return ret;
}

/* True when path (relative to the folder) climbs out of it through "..". */
static bool climbs_out(const char *path)
{
    int depth = 0;
    const char *p = path;
    while (*p) {
        size_t n = strcspn(p, "/");
        if (2 == n && 0 == strncmp(p, "..", 2)) {
            if (--depth < 0) {
                return true;
            }
        } else if (n && !(1 == n && '.' == *p)) {
            depth++;
        }
        p += n;
        while ('/' == *p) {
            p++;
        }
    }
    return false;
}

char *vimg_internal_resolve_child(struct vimg_image *img, const char *name,
                                  const char *what, struct vimg_error *err)
{
    if (!name[0]) {
        vimg_error_set(err, EINVAL, "'%s': empty %s name", img->filename, what);
        return NULL;
    }
    if (has_protocol_prefix(name)) {
        vimg_error_set(err, EPERM, "'%s': %s name '%s' uses a protocol prefix, which vimg "
                       "does not follow", img->filename, what, name);
        return NULL;
    }
    if (!(img->flags & VIMG_OPEN_ALLOW_OUTSIDE) && ('/' == name[0] || climbs_out(name))) {
        vimg_error_set(err, EPERM, "'%s': %s '%s' lies outside the image's folder "
                       "(refused unless explicitly allowed)", img->filename, what, name);
        return NULL;
    }
    char *path = resolve_relative(img->filename, name);
    if (!path) {
        vimg_error_set(err, ENOMEM, "out of memory");
    }
    return path;
}

int vimg_internal_open_child(struct vimg_image *img, const char *name, const char *what,
                             struct vimg_file **out, struct vimg_error *err)
{
    char *path = vimg_internal_resolve_child(img, name, what, err);
    int ret;
    if (!path) {
        return -err->code;
    }
    ret = open_host_file(out, path, img->flags, err);
    if (0 == ret) {
        unsigned held = (img->flags & VIMG_OPEN_NO_IO) ? 0 : VIMG_PERM_CONSISTENT_READ;
        unsigned unshared = (img->flags & VIMG_OPEN_FORCE_SHARE) ? 0 : VIMG_PERM_RESIZE;
        if (img->flags & VIMG_OPEN_RDWR) {
            held |= VIMG_PERM_WRITE | VIMG_PERM_RESIZE;
        }
        ret = vimg_internal_lock_file(*out, held, unshared, err);
        if (ret < 0) {
            vimg_file_close(*out);
            *out = NULL;
        }
    }
    free(path);
    return ret;
}

struct chain_id {
    dev_t dev;
    ino_t ino;
};

static int open_backing_chain(struct vimg_image *top, unsigned flags,
                              struct vimg_error *err)
{
    struct chain_id seen[VIMG_MAX_CHAIN_DEPTH];
    size_t nseen = 0;
    struct vimg_image *img = top;
    struct stat st;

    if (img->file->fd >= 0 && 0 == fstat(img->file->fd, &st)) {
        seen[nseen++] = (struct chain_id){ st.st_dev, st.st_ino };
    }
    while (img->backing_name && img->backing_name[0]) {
        struct vimg_file *file;
        struct vimg_image *b;
        int ret;

        if (has_protocol_prefix(img->backing_name)) {
            vimg_error_set(err, EPERM,
                           "Could not open backing file: backing file name '%s' of '%s' "
                           "uses a protocol prefix, which vimg does not follow",
                           img->backing_name, img->filename);
            return -EPERM;
        }
        img->full_backing_name = resolve_relative(img->filename, img->backing_name);
        if (!img->full_backing_name) {
            vimg_error_set(err, ENOMEM, "out of memory");
            return -ENOMEM;
        }
        if (nseen == VIMG_MAX_CHAIN_DEPTH) {
            vimg_error_set(err, ELOOP, "Could not open backing file: backing chain of '%s' "
                           "is longer than %d images", top->filename,
                           VIMG_MAX_CHAIN_DEPTH);
            return -ELOOP;
        }
        ret = open_host_file(&file, img->full_backing_name, 0, err);
        if (ret < 0) {
            vimg_error_prefix(err, "Could not open backing file: ");
            return ret;
        }
        if (0 == fstat(file->fd, &st)) {
            for (size_t i = 0; i < nseen; i++) {
                if (seen[i].dev == st.st_dev && seen[i].ino == st.st_ino) {
                    vimg_file_close(file);
                    vimg_error_set(err, ELOOP,
                                   "Could not open backing file: backing chain of '%s' "
                                   "loops back to '%s'", top->filename,
                                   img->full_backing_name);
                    return -ELOOP;
                }
            }
            seen[nseen++] = (struct chain_id){ st.st_dev, st.st_ino };
        }
        /* A backing image opens read-only, and its format is never probed
         * when the image that names it records one. */
        ret = image_open_layer(&b, file, img->full_backing_name, img->backing_fmt,
                               flags & ~VIMG_OPEN_RDWR, err);
        if (ret < 0) {
            vimg_error_prefix(err, "Could not open backing file: ");
            return ret;
        }
        img->backing = b;
        img = b;
    }
    return 0;
}

int vimg_internal_open_file(struct vimg_image **out, struct vimg_file *file,
                            const char *format, unsigned flags, struct vimg_error *err)
{
    return image_open_layer(out, file, file->name, format, flags | VIMG_OPEN_NO_BACKING,
                            err);
}

int vimg_open(struct vimg_image **out, const char *filename, const char *format,
              unsigned flags, int *probed_raw_warning, struct vimg_error *err)
{
    struct vimg_file *file;
    struct vimg_image *img;
    int ret;

    if (format && !vimg_internal_find_driver(format)) {
        vimg_error_set(err, EINVAL, "Could not open '%s': Unknown driver '%s'",
                       filename, format);
        return -EINVAL;
    }
    ret = open_host_file(&file, filename, flags, err);
    if (ret < 0) {
        vimg_error_prefix(err, "Could not open '%s': ", filename);
        return ret;
    }
    ret = image_open_layer(&img, file, filename, format, flags, err);
    if (ret < 0) {
        if (EAGAIN == err->code) {
            vimg_error_prefix(err, "Could not open '%s': ", filename);
        }
        return ret;
    }
    if (!(flags & VIMG_OPEN_NO_BACKING)) {
        ret = open_backing_chain(img, flags, err);
        for (struct vimg_image *l = img; ret >= 0 && l; l = l->backing) {
            if (l->backing && l->drv->backing_opened) {
                ret = DRV_CALL(err, l->drv->backing_opened(l, err));
            }
        }
        if (ret < 0) {
            vimg_error_prefix(err, "Could not open '%s': ", filename);
            vimg_close(img);
            return ret;
        }
    }
    if (probed_raw_warning) {
        *probed_raw_warning = img->probed && (flags & VIMG_OPEN_RDWR) &&
                              0 == strcmp(img->drv->name, "raw");
    }
    *out = img;
    return 0;
}

uint64_t vimg_size(const struct vimg_image *img)
{
    return img->size;
}

const char *vimg_format(const struct vimg_image *img)
{
    return img->drv->name;
}

const char *vimg_filename(const struct vimg_image *img)
{
    return img->filename;
}

struct vimg_image *vimg_backing(const struct vimg_image *img)
{
    return img->backing;
}

int64_t vimg_allocated_size(const struct vimg_image *img)
{
    if (img->drv->allocated_size) {
        return img->drv->allocated_size((struct vimg_image *)img);
    }
    return img->file->ops->allocated(img->file);
}

static int check_range(struct vimg_image *img, uint64_t offset, uint64_t len,
                       const char *what, struct vimg_error *err)
{
    uint64_t end;
    if (!vimg_add_ok(offset, len, &end) || end > img->size) {
        vimg_error_set(err, EINVAL, "'%s': %s of %" PRIu64 " bytes at offset %" PRIu64
                       " lies beyond the end of the image", img->filename, what, len,
                       offset);
        return -EINVAL;
    }
    return 0;
}

int vimg_internal_layer_status(struct vimg_image *img, uint64_t offset, uint64_t max_len,
                               struct vimg_run *run, struct vimg_error *err)
{
    int ret;

    max_len = VIMG_MIN(max_len, img->size - offset);
    memset(run, 0, sizeof(*run));
    ret = DRV_CALL(err, img->drv->block_status(img, offset, max_len, run, err));
    if (ret < 0) {
        return ret;
    }
    if (0 == run->length) {
        vimg_error_set(err, EIO, "'%s': driver returned an empty run at offset %" PRIu64,
                       img->filename, offset);
        return -EIO;
    }
    run->length = VIMG_MIN(run->length, max_len);
    return 0;
}

static int backing_read_fail(struct vimg_image *layer, uint64_t offset,
                             struct vimg_error *err)
{
    vimg_error_set(err, layer->backing_read_err, "error while reading at byte %" PRIu64
                   ": %s", offset, strerror(layer->backing_read_err));
    return -layer->backing_read_err;
}

int vimg_block_status(struct vimg_image *img, uint64_t offset, uint64_t max_len,
                      struct vimg_status *st, struct vimg_error *err)
{
    return vimg_internal_block_status_host(img, offset, max_len, st, NULL, err);
}

int vimg_internal_block_status_host(struct vimg_image *img, uint64_t offset,
                                    uint64_t max_len, struct vimg_status *st,
                                    struct vimg_file **host, struct vimg_error *err)
{
    struct vimg_image *layer = img;
    struct vimg_run run;
    int depth = 0;
    int ret;

    if (host) {
        *host = NULL;
    }

    if (offset >= img->size || 0 == max_len) {
        vimg_error_set(err, EINVAL, "'%s': block status at offset %" PRIu64
                       " past the end of the image", img->filename, offset);
        return -EINVAL;
    }
    max_len = VIMG_MIN(max_len, img->size - offset);
    memset(st, 0, sizeof(*st));
    for (;;) {
        if (offset >= layer->size) {
            /* beyond a shorter backing image: reads as zeros */
            st->length = max_len;
            st->flags = VIMG_STATUS_ZERO;
            st->depth = depth;
            return 0;
        }
        ret = vimg_internal_layer_status(layer, offset, max_len, &run, err);
        if (ret < 0) {
            return ret;
        }
        max_len = run.length;
        if (run.flags & (VIMG_RUN_ALLOCATED | VIMG_RUN_ZERO)) {
            st->length = run.length;
            st->depth = depth;
            st->flags = VIMG_STATUS_ALLOCATED;
            if (run.flags & VIMG_RUN_DATA) {
                st->flags |= VIMG_STATUS_DATA;
            }
            if (run.flags & VIMG_RUN_ZERO) {
                st->flags |= VIMG_STATUS_ZERO;
            }
            if (run.flags & VIMG_RUN_COMPRESSED) {
                st->flags |= VIMG_STATUS_COMPRESSED;
            }
            if ((run.flags & VIMG_RUN_HOST_VALID) && run.host) {
                st->flags |= VIMG_STATUS_HOST_VALID;
                st->host_offset = run.host_off;
                st->host_file = run.host->name;
                if (host) {
                    *host = run.host;
                }
            }
            return 0;
        }
        if (!layer->backing) {
            /* as qemu: unallocated at the bottom of the chain reads as
             * zeros, reported at the bottom layer's depth */
            st->length = run.length;
            st->depth = depth;
            st->flags = VIMG_STATUS_ZERO;
            if ((run.flags & VIMG_RUN_HOST_VALID) && run.host) {
                /* qemu's OFFSET_VALID without data (qcow2 subclusters) */
                st->flags |= VIMG_STATUS_HOST_VALID;
                st->host_offset = run.host_off;
                st->host_file = run.host->name;
            }
            return 0;
        }
        if (offset >= layer->backing->size) {
            /* past the end of a shorter backing file: zeros, reported at
             * this layer's depth and not allocated, as qemu does */
            st->length = run.length;
            st->depth = depth;
            st->flags = VIMG_STATUS_ZERO;
            return 0;
        }
        if (host && layer->backing_read_err) {
            return backing_read_fail(layer, offset, err);
        }
        max_len = VIMG_MIN(max_len, layer->backing->size - offset);
        depth++;
        layer = layer->backing;
    }
}

/* Read one layer's range; unallocated parts come from the backing image. */
static int layer_pread(struct vimg_image *img, void *buf, size_t len, uint64_t offset,
                       struct vimg_error *err)
{
    char *p = buf;
    int ret;

    if (img->drv->read) {
        return DRV_CALL(err, img->drv->read(img, buf, len, offset, err));
    }
    while (len) {
        struct vimg_run run;
        size_t n;

        if (offset >= img->size) {
            memset(p, 0, len);
            return 0;
        }
        ret = vimg_internal_layer_status(img, offset, len, &run, err);
        if (ret < 0) {
            return ret;
        }
        n = (size_t)VIMG_MIN(run.length, len);
        if ((run.flags & VIMG_RUN_ZERO) && !(run.flags & VIMG_RUN_DATA)) {
            memset(p, 0, n);
        } else if ((run.flags & VIMG_RUN_DATA) && (run.flags & VIMG_RUN_HOST_VALID)) {
            ret = vimg_file_pread(run.host, p, n, run.host_off);
            if (ret < 0) {
                vimg_error_set(err, -ret, "error while reading at byte %" PRIu64 ": %s",
                               offset, strerror(-ret));
                return ret;
            }
        } else if (run.flags & VIMG_RUN_DATA) {
            if (!img->drv->read_special) {
                vimg_error_set(err, EIO, "'%s': no way to read data at offset %" PRIu64,
                               img->filename, offset);
                return -EIO;
            }
            ret = DRV_CALL(err, img->drv->read_special(img, p, n, offset, err));
            if (ret < 0) {
                return ret;
            }
        } else if (img->backing) {
            if (img->backing_read_err) {
                return backing_read_fail(img, offset, err);
            }
            ret = layer_pread(img->backing, p, n, offset, err);
            if (ret < 0) {
                return ret;
            }
        } else {
            memset(p, 0, n);
        }
        p += n;
        offset += n;
        len -= n;
    }
    return 0;
}

int vimg_pread(struct vimg_image *img, void *buf, size_t len, uint64_t offset,
               struct vimg_error *err)
{
    int ret = check_range(img, offset, len, "read", err);
    return ret < 0 ? ret : layer_pread(img, buf, len, offset, err);
}

static int check_writable(struct vimg_image *img, struct vimg_error *err)
{
    if (!(img->flags & VIMG_OPEN_RDWR)) {
        vimg_error_set(err, EBADF, "'%s' is opened read-only", img->filename);
        return -EBADF;
    }
    return 0;
}

int vimg_pwrite(struct vimg_image *img, const void *buf, size_t len, uint64_t offset,
                struct vimg_error *err)
{
    int ret = check_writable(img, err);
    if (ret < 0 || (ret = check_range(img, offset, len, "write", err)) < 0) {
        return ret;
    }
    if (!len) {
        return 0;
    }
    if (!img->drv->write) {
        vimg_error_set(err, ENOTSUP, "Driver '%s' does not support writing", img->drv->name);
        return -ENOTSUP;
    }
    return DRV_CALL(err, img->drv->write(img, buf, len, offset, err));
}

int vimg_write_zeroes(struct vimg_image *img, uint64_t offset, uint64_t len,
                      unsigned flags, struct vimg_error *err)
{
    int ret = check_writable(img, err);
    if (ret < 0 || (ret = check_range(img, offset, len, "write", err)) < 0) {
        return ret;
    }
    if (!len) {
        return 0;
    }
    if (img->drv->write_zeroes) {
        ret = img->drv->write_zeroes(img, offset, len, flags, err);
        if (-ENOTSUP != ret) {
            return DRV_CALL(err, ret);
        }
        vimg_error_clear(err);
    }
    /* Emulate with explicit zeros in bounded chunks. */
    static const char zeros[65536];
    while (len) {
        size_t n = (size_t)VIMG_MIN(len, sizeof(zeros));
        ret = vimg_pwrite(img, zeros, n, offset, err);
        if (ret < 0) {
            return ret;
        }
        offset += n;
        len -= n;
    }
    return 0;
}

int vimg_discard(struct vimg_image *img, uint64_t offset, uint64_t len,
                 struct vimg_error *err)
{
    int ret = check_writable(img, err);
    if (ret < 0 || (ret = check_range(img, offset, len, "discard", err)) < 0) {
        return ret;
    }
    if (!img->drv->discard || !len) {
        return 0;   /* discard is advisory */
    }
    return DRV_CALL(err, img->drv->discard(img, offset, len, err));
}

int vimg_flush(struct vimg_image *img, struct vimg_error *err)
{
    if (!(img->flags & VIMG_OPEN_RDWR)) {
        return 0;
    }
    if (img->drv->flush) {
        return DRV_CALL(err, img->drv->flush(img, err));
    }
    int ret = vimg_file_sync(img->file);
    if (ret < 0) {
        vimg_error_set(err, -ret, "'%s': flush failed: %s", img->filename, strerror(-ret));
    }
    return ret;
}

int vimg_prealloc_parse(const char *s, enum vimg_prealloc *out)
{
    static const char *const names[] = { "off", "metadata", "falloc", "full" };
    for (size_t i = 0; i < VIMG_ARRAY_SIZE(names); i++) {
        if (0 == strcmp(s, names[i])) {
            *out = (enum vimg_prealloc)i;
            return 0;
        }
    }
    return -EINVAL;
}

const char *vimg_prealloc_name(enum vimg_prealloc p)
{
    static const char *const names[] = { "off", "metadata", "falloc", "full" };
    return (unsigned)p < VIMG_ARRAY_SIZE(names) ? names[p] : "?";
}

int vimg_truncate(struct vimg_image *img, uint64_t size, enum vimg_prealloc prealloc,
                  int allow_shrink, struct vimg_error *err)
{
    int ret = check_writable(img, err);
    if (ret < 0) {
        return ret;
    }
    if (!img->drv->truncate) {
        vimg_error_set(err, ENOTSUP, "Image format driver does not support resize");
        return -ENOTSUP;
    }
    if (size < img->size && !allow_shrink) {
        vimg_error_set(err, EPERM, "Use the --shrink option to perform a shrink operation.");
        return -EPERM;
    }
    return DRV_CALL(err, img->drv->truncate(img, size, prealloc, err));
}

int vimg_create(const char *filename, const char *format, const struct vimg_opts *opts,
                struct vimg_error *err)
{
    const struct vimg_driver *drv = vimg_internal_find_driver(format);
    int ret;

    if (!drv) {
        vimg_error_set(err, EINVAL, "Unknown file format '%s'", format);
        return -EINVAL;
    }
    if (!drv->create) {
        vimg_error_set(err, ENOTSUP, "Format driver '%s' does not support image creation",
                       format);
        return -ENOTSUP;
    }
    ret = vimg_internal_opts_validate(opts, vimg_internal_create_opts(drv), err);
    if (ret < 0) {
        return ret;
    }
    return DRV_CALL(err, drv->create(filename, opts, err));
}

/* Allocate the holes of [from, to) of f, content unchanged: falloc, or
 * written zeros for full. */
static int fill_file_holes(struct vimg_image *img, struct vimg_file *f, uint64_t from,
                           uint64_t to, enum vimg_prealloc mode, struct vimg_error *err)
{
    int ret;

    for (uint64_t off = from; off < to;) {
        bool is_data;
        uint64_t n;
        ret = f->ops->extent(f, off, to - off, &is_data, &n);
        if (ret < 0) {
            vimg_error_set(err, -ret, "Could not read file metadata: %s", strerror(-ret));
            return ret;
        }
        if (!is_data) {
            ret = f->ops->allocate(f, off, n, VIMG_PREALLOC_FULL == mode
                                                  ? VIMG_ALLOC_FULL : VIMG_ALLOC_FALLOC);
            if (-ENOTSUP == ret || (0 == ret && VIMG_PREALLOC_FULL == mode)) {
                /* "full" wants written zeros: a hole read as zeros already */
                static const char zeros[65536];
                for (uint64_t o = off; o < off + n;) {
                    size_t len = (size_t)VIMG_MIN(off + n - o, sizeof(zeros));
                    ret = vimg_file_pwrite(f, zeros, len, o);
                    if (ret < 0) {
                        break;
                    }
                    o += len;
                }
            }
            if (ret < 0) {
                vimg_error_set(err, -ret, "Could not preallocate '%s': %s", img->filename,
                               strerror(-ret));
                return ret;
            }
        }
        off += n;
    }
    return 0;
}

int vimg_preallocate(struct vimg_image *img, enum vimg_prealloc mode, struct vimg_error *err)
{
    int ret = check_writable(img, err);
    if (ret < 0) {
        return ret;
    }
    struct vimg_file *f = img->file;
    int64_t fsize;
    uint64_t end;

    if (img->drv->preallocate) {
        /* the format gives every guest cluster host space; then the
         * holes of the host file are filled */
        ret = DRV_CALL(err, img->drv->preallocate(img, err));
        if (ret < 0) {
            return ret;
        }
        fsize = vimg_file_size(f);
        if (fsize < 0) {
            vimg_error_set(err, (int)-fsize, "Could not get the size of '%s': %s",
                           img->filename, strerror((int)-fsize));
            return (int)fsize;
        }
        end = (uint64_t)fsize;
    } else if (img->drv->data_only) {
        if (VIMG_PREALLOC_METADATA == mode) {
            vimg_error_set(err, EINVAL, "Invalid preallocation mode 'metadata' for format "
                           "'%s' (expecting falloc or full)", img->drv->name);
            return -EINVAL;
        }
        /* Only holes are touched, so the content stays what it was. */
        fsize = vimg_file_size(f);
        if (fsize < 0) {
            vimg_error_set(err, (int)-fsize, "Could not get the size of '%s': %s",
                           img->filename, strerror((int)-fsize));
            return (int)fsize;
        }
        if ((uint64_t)fsize < img->size) {
            ret = f->ops->truncate(f, img->size);
            if (ret < 0) {
                vimg_error_set(err, -ret, "Could not resize '%s': %s", img->filename,
                               strerror(-ret));
                return ret;
            }
        }
        end = img->size;
    } else {
        vimg_error_set(err, ENOTSUP, "preallocate is not supported for format '%s'",
                       img->drv->name);
        return -ENOTSUP;
    }
    if (VIMG_PREALLOC_METADATA != mode) {
        ret = fill_file_holes(img, f, 0, end, mode, err);
        if (ret < 0) {
            return ret;
        }
    }
    ret = vimg_file_sync(f);
    if (ret < 0) {
        vimg_error_set(err, -ret, "Could not flush '%s': %s", img->filename, strerror(-ret));
    }
    return ret;
}

/* The core's view of an open image: internal to the library and its drivers. */
#ifndef VIMG_CORE_IMAGE_H
#define VIMG_CORE_IMAGE_H

#include "vimg/driver.h"
#include "io/file.h"

#define VIMG_MAX_CHAIN_DEPTH 64

struct vimg_image {
    const struct vimg_driver *drv;
    void *opaque;                 /* drv->instance_size bytes, zeroed */
    struct vimg_file *file;       /* the image's own host file */
    char *filename;
    unsigned flags;               /* VIMG_OPEN_* */
    uint64_t size;                /* virtual size in bytes */
    struct vimg_limits limits;
    bool probed;                  /* the format was probed, not given */

    /* Backing chain: the driver records what the image names; the core
     * resolves and opens it. */
    char *backing_name;           /* as stored in the image */
    char *backing_fmt;            /* as stored, or NULL */
    char *full_backing_name;      /* resolved against the image's folder */
    struct vimg_image *backing;
    char *warning;                /* recorded by the driver, shown by the CLI */
    /* Set by the driver (backing_opened): reads that reach the backing
     * image fail with this errno, as qemu's vmdk fails them when the
     * parent's CID is not the child's parentCID.  Status queries work. */
    int backing_read_err;
    /* The internal snapshot vimg_internal_snapshot_load_tmp made this open
     * image show (id and/or name as asked), so another open of the same
     * file (the copy engine's reader threads) can show it too. */
    char *tmp_snapshot_id, *tmp_snapshot_name;
};

/* convert -l: the driver's snapshot_load_tmp, recorded in the image. */
int vimg_internal_snapshot_load_tmp(struct vimg_image *img, const char *id, const char *name,
                                    struct vimg_error *err);

/* For drivers: record a one-line warning for the caller to show. */
void vimg_internal_warn(struct vimg_image *img, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

extern const struct vimg_driver *const vimg_internal_drivers[];

const struct vimg_driver *vimg_internal_find_driver(const char *name);
/* The best-scoring driver for these first bytes (raw at worst). */
const struct vimg_driver *vimg_internal_probe(const uint8_t *buf, size_t len,
                                              const char *filename);

/* For drivers: record what the image names as its backing file. */
int vimg_internal_set_backing(struct vimg_image *img, const char *name,
                              const char *fmt);
/* Open an image on an existing host file (fuzzers, tests); the image takes
 * the file. */
int vimg_internal_open_file(struct vimg_image **out, struct vimg_file *file,
                            const char *format, unsigned flags,
                            struct vimg_error *err);

/*
 * Open a file that an image names (a vmdk extent, a qcow2 external data
 * file), read-write when the image is.  The safety policy lives here, in one
 * place: the name resolves against the folder of the image that names it;
 * protocol prefixes ("json:", "nbd:" ...) are refused; a name that resolves
 * outside that folder (absolute, or through "..") is refused unless the user
 * opened the image with VIMG_OPEN_ALLOW_OUTSIDE.  what ("extent", "data
 * file") goes into the messages.  The file is locked like the image's own.
 */
int vimg_internal_open_child(struct vimg_image *img, const char *name, const char *what,
                             struct vimg_file **out, struct vimg_error *err);
/* The same resolution without opening: a malloc'ed path, or NULL with err. */
char *vimg_internal_resolve_child(struct vimg_image *img, const char *name,
                                  const char *what, struct vimg_error *err);

/* Take qemu-compatible image locks on f, with qemu's message on conflict. */
int vimg_internal_lock_file(struct vimg_file *f, unsigned held, unsigned unshared,
                            struct vimg_error *err);

/* Layer-local status of one image (no chain), clipped to [offset, size). */
int vimg_internal_layer_status(struct vimg_image *img, uint64_t offset,
                               uint64_t max_len, struct vimg_run *run,
                               struct vimg_error *err);

/* vimg_block_status, also giving the host file of a HOST_VALID run (NULL
 * otherwise), so the copy engine can read plain data straight from it.
 * With host given, the caller means to read: a layer whose backing reads
 * fail (backing_read_err) fails here instead of descending. */
int vimg_internal_block_status_host(struct vimg_image *img, uint64_t offset,
                                    uint64_t max_len, struct vimg_status *st,
                                    struct vimg_file **host, struct vimg_error *err);

#endif

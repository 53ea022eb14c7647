/*
 * The block-driver interface.  One `const struct vimg_driver` per format,
 * named vimg_driver_<fmt>, listed in the registry in src/core/registry.c.
 *
 * This header is the specification of what a driver must do.  The core
 * (src/core/image.c) sits between every caller and the driver and guarantees:
 *  - requests lie inside [0, virtual size) and have length > 0;
 *  - offsets and lengths are multiples of limits.request_align (the core
 *    does read-modify-write for unaligned callers);
 *  - write, write_zeroes, discard and truncate are only called on images
 *    opened with VIMG_OPEN_RDWR;
 *  - err is never NULL inside a driver.
 * A driver guarantees:
 *  - it returns 0 or a negative errno, and a negative return always comes
 *    with err filled (the core asserts this);
 *  - every value read from the image is bounds-checked before use, and no
 *    allocation is sized by an unchecked header field;
 *  - it never prints, never exits, and opens other files only through the
 *    core (vimg_internal_open_backing), which applies the safety policy.
 * A driver lacking an op leaves it NULL; the core then answers "not
 * supported" with qemu-img's message for that command.  Capabilities are
 * derived from which ops exist, never declared a second time.
 */
#ifndef VIMG_DRIVER_H
#define VIMG_DRIVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vimg/vimg.h"

#ifdef __cplusplus
extern "C" {
#endif

#define VIMG_DRIVER_ABI_VERSION 1

struct vimg_file;   /* host file (src/io/file.h) */
struct vimg_qobj;   /* a JSON-like tree (src/core/qobj.h) */

/* ---- block status runs ---------------------------------------------------
 *
 * block_status(img, offset, max_len, run, err) describes the layer's own
 * view of the guest range starting at offset:
 *  - exactly one run, starting at offset;
 *  - run->length > 0, and offset + length <= virtual size;
 *  - max_len is a soft cap: a driver may return a longer run when that costs
 *    nothing, and the core clips it; it must do no extra I/O just to
 *    lengthen a run;
 *  - the run's length is a multiple of request_align, except at the end of
 *    the image;
 *  - "unallocated" is neither ALLOCATED nor ZERO: the core then asks the
 *    backing image (or reads zeros when there is none);
 *  - HOST_VALID says the bytes lie plainly at run->host_off in run->host; the
 *    core reads them there itself.  Every host offset returned has been
 *    validated against the host file's size by the driver;
 *  - COMPRESSED (with DATA) says only the driver can produce the bytes: the
 *    core calls read_special.
 */
enum {
    VIMG_RUN_DATA       = 1u << 0,
    VIMG_RUN_ZERO       = 1u << 1,
    VIMG_RUN_ALLOCATED  = 1u << 2,
    VIMG_RUN_HOST_VALID = 1u << 3,
    VIMG_RUN_COMPRESSED = 1u << 4,
};

struct vimg_run {
    uint64_t length;
    unsigned flags;
    struct vimg_file *host;   /* with VIMG_RUN_HOST_VALID */
    uint64_t host_off;        /* with VIMG_RUN_HOST_VALID */
};

/* Per open image, filled by open (the core sets defaults first:
 * request_align 1, max_transfer 0 = unlimited, cluster_size 0 = none). */
struct vimg_limits {
    uint32_t request_align;
    uint64_t max_transfer;
    uint64_t cluster_size;
    uint64_t zero_granularity;
    uint32_t mem_align;       /* buffer alignment for O_DIRECT */
    bool needs_compressed_writes; /* every write must go through write_compressed
                                     (vmdk streamOptimized) */
};

/* ---- typed create options ------------------------------------------------
 * One table per driver, ending with a zeroed entry.  It drives parsing of
 * `-o`, `-o help`, the "Formatting ..." line (options in table order: the
 * ones set, plus those with def_print), and measure. */
enum vimg_opt_type {
    VIMG_OPT_STRING,
    VIMG_OPT_BOOL,
    VIMG_OPT_NUMBER,
    VIMG_OPT_SIZE,
};

struct vimg_opt_desc {
    const char *name;
    enum vimg_opt_type type;
    const char *help;
    const char *def_print;    /* value shown in "Formatting" when unset, or NULL */
};

/* ---- check ---------------------------------------------------------------- */
struct vimg_check_result {
    int corruptions, leaks, check_errors;
    int corruptions_fixed, leaks_fixed;
    uint64_t image_end_offset;
    uint64_t total_clusters, allocated_clusters, fragmented_clusters,
             compressed_clusters;
    bool has_stats;
};

/* ---- measure -------------------------------------------------------------- */
struct vimg_measure {
    uint64_t required;
    uint64_t fully_allocated;
    bool has_bitmaps;
    uint64_t bitmaps;
};

/* ---- the ops table (append only; never reorder) ---------------------------- */
struct vimg_driver {
    int abi_version;
    const char *name;
    size_t instance_size;     /* the core allocates this much zeroed state */

    /* Score 0..100 from the first bytes of the file (len may be short).
     * raw answers 1; a magic and version match answers 100. */
    int (*probe)(const uint8_t *buf, size_t len, const char *filename);

    const struct vimg_opt_desc *create_opts;

    /* Open: img's host file is open; the driver reads its header, sets the
     * virtual size (vimg_internal_set_size), limits and the backing name,
     * and returns 0.  On failure it releases what it took; close is then
     * not called. */
    int (*open)(struct vimg_image *img, unsigned flags, struct vimg_error *err);
    void (*close)(struct vimg_image *img);
    /* Create a new image.  opts were validated against create_opts. */
    int (*create)(const char *filename, const struct vimg_opts *opts,
                  struct vimg_error *err);

    int (*block_status)(struct vimg_image *img, uint64_t offset, uint64_t max_len,
                        struct vimg_run *run, struct vimg_error *err);
    /* Produce the bytes of a COMPRESSED run. */
    int (*read_special)(struct vimg_image *img, void *buf, size_t len,
                        uint64_t offset, struct vimg_error *err);
    /* Return a host location for new data at offset (append-mode writers). */
    int (*alloc_data)(struct vimg_image *img, uint64_t offset, uint64_t len,
                      struct vimg_run *run, struct vimg_error *err);

    /* Optional: for formats where the mapping does not fit. */
    int (*read)(struct vimg_image *img, void *buf, size_t len, uint64_t offset,
                struct vimg_error *err);
    int (*write)(struct vimg_image *img, const void *buf, size_t len,
                 uint64_t offset, struct vimg_error *err);
    int (*write_zeroes)(struct vimg_image *img, uint64_t offset, uint64_t len,
                        unsigned flags, struct vimg_error *err);
    int (*discard)(struct vimg_image *img, uint64_t offset, uint64_t len,
                   struct vimg_error *err);
    int (*flush)(struct vimg_image *img, struct vimg_error *err);
    /* Grow or shrink to size (the core checked the shrink permission). */
    int (*truncate)(struct vimg_image *img, uint64_t size,
                    enum vimg_prealloc prealloc, struct vimg_error *err);

    /* Format-specific information, as qemu's ImageInfoSpecific data: fill
     * *out with a dict (or leave it NULL when there is none). */
    int (*info)(struct vimg_image *img, struct vimg_qobj **out,
                struct vimg_error *err);
    /* Consistency check; fix is a mask (1 leaks, 2 errors). */
    int (*check)(struct vimg_image *img, struct vimg_check_result *res,
                 int fix, struct vimg_error *err);
    /* Space a new image of this format would need: from opts (size) or the
     * source image (in may be NULL). */
    int (*measure)(const struct vimg_opts *opts, struct vimg_image *in,
                   struct vimg_measure *out, struct vimg_error *err);
    /* Set when a format has no fixed relation of disk size to file size and
     * zero-initialised fresh images (qemu's has_zero_init). */
    bool (*has_zero_init)(struct vimg_image *img);
    /* True when the host file is the guest disk itself (raw): other
     * writers cannot corrupt metadata, so the file is not locked against
     * them unless the caller asks (VIMG_OPEN_NO_SHARE). */
    bool data_only;
    /* Write one whole cluster (or the short last one) compressed, for
     * convert -c: offset is cluster-aligned, len == cluster size except at
     * the end of the image.  NULL: the format cannot compress. */
    int (*write_compressed)(struct vimg_image *img, const void *buf, size_t len,
                            uint64_t offset, struct vimg_error *err);
    /* New ops come here (append only; never reorder). */
};

#ifdef __cplusplus
}
#endif
#endif

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
    /* Per-item lines qemu's driver prints to stderr during the check
     * ("Leaked cluster ...", "ERROR ..."), each ending in '\n'; malloc'ed
     * by the driver, printed and freed by the caller.  NULL: none. */
    char *log;
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
    /*
     * Append-mode writer for convert into a fresh target (optional).  The
     * copy engine asks where the bytes [offset, offset+len) go and writes
     * them there itself, asynchronously, straight into the host file.
     * Contract:
     *  - called only on an image this convert just created (every cluster
     *    unallocated), opened RDWR, from one thread;
     *  - calls come in strictly increasing guest order, each starting at or
     *    after the end of the run the previous call returned: no guest
     *    byte is asked for twice.  offset and len
     *    are multiples of 512 except at the end of the image; they need not
     *    be cluster-aligned (a write may start or end inside a cluster);
     *  - the driver fills run with HOST_VALID, run->host (a file the image
     *    holds open) and run->host_off where guest byte offset goes, and
     *    run->length (0 < length <= len) for which the mapping is
     *    contiguous; the engine calls again for the rest;
     *  - when offset falls inside a cluster allocated by an earlier call,
     *    the driver answers with that cluster's space; a new cluster is
     *    placed at the driver's append point (fresh space past everything
     *    else), so host bytes of the cluster that the engine never writes
     *    read as zeros, and by the time flush returns the host file covers
     *    every cluster handed out;
     *  - the driver records the mapping in memory only; it writes its
     *    metadata (L2 / grain tables, refcounts, L1, header, markers) when
     *    flush or close is called, in an order that leaves a valid image at
     *    every step.  The engine calls flush after all its data writes have
     *    completed, and never calls write or write_zeroes for a range it
     *    got from alloc_data;
     *  - zero runs are not passed here: on a fresh target they stay
     *    unallocated (the engine only writes zeros through write_zeroes
     *    when has_zero_init is false, which a driver with alloc_data should
     *    not report).
     * Returns 0 or a negative errno with err set (e.g. -EFBIG when the
     * host file would pass the format's limit).
     */
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
     * the end of the image.  NULL: the format cannot compress.  convert
     * -c ends with one call with buf NULL and len 0, as qemu-img's "EOF"
     * write: the driver may align its file end (qcow2) or do nothing. */
    int (*write_compressed)(struct vimg_image *img, const void *buf, size_t len,
                            uint64_t offset, struct vimg_error *err);
    /* Top-level ImageInfo facts (qcow2): *dirty (dirty-flag), *encrypted,
     * and *snapshots, a list of qemu SnapshotInfo dicts or NULL when the
     * image has none.  NULL op: not dirty, not encrypted, no snapshots. */
    int (*image_info)(struct vimg_image *img, bool *dirty, bool *encrypted,
                      struct vimg_qobj **snapshots, struct vimg_error *err);
    /*
     * Parallel compression for convert -c (optional: with write_compressed
     * alone the engine compresses serially).  compress_cluster compresses
     * one cluster (len bytes, as write_compressed would receive) into out
     * (out_cap bytes) and returns the compressed length, -ENOSPC when the
     * result would not be smaller than the format accepts (the engine then
     * writes the cluster with the normal write op, as qemu does), or another
     * negative errno with err set.  It must be thread-safe: worker threads
     * call it at the same time for one image, so it may only read state
     * fixed at open (the compression type) and must not do I/O.
     * write_compressed_data then stores one cluster's compressed bytes
     * (cdata, clen) for guest offset (cluster-aligned; len is the
     * uncompressed length, the cluster size except at the end), called
     * from one thread in increasing guest order.  A driver provides both or
     * neither.
     */
    long (*compress_cluster)(struct vimg_image *img, void *out, size_t out_cap,
                             const void *buf, size_t len, struct vimg_error *err);
    int (*write_compressed_data)(struct vimg_image *img, const void *cdata, size_t clen,
                                 size_t len, uint64_t offset, struct vimg_error *err);
    /* Bytes the image occupies on the host when that is more than its own
     * file (vmdk: the descriptor plus every extent file); NULL: the
     * image's file alone.  Returns bytes or a negative errno. */
    int64_t (*allocated_size)(struct vimg_image *img);
    /* convert -l: make this read-only open image show an internal snapshot
     * from now on (reads and block_status of the snapshot's state, as
     * qemu's bdrv_snapshot_load_tmp), found by id and/or name (a NULL one
     * is not compared; both must match when both are given).  Not found:
     * -ENOENT with "Can't find snapshot".  NULL: the format cannot, and
     * convert says so with qemu's message. */
    int (*snapshot_load_tmp)(struct vimg_image *img, const char *id, const char *name,
                             struct vimg_error *err);
    /* Called once the backing chain is open (not with NO_BACKING), so a
     * driver can compare what it recorded with the backing file it got; it
     * may record a warning with vimg_internal_warn.  Failing fails the open. */
    int (*backing_opened)(struct vimg_image *img, struct vimg_error *err);
    /* vimg preallocate: give every guest cluster that has no host space
     * its own, content unchanged (zeros where it reads zeros, a copy of
     * the backing image's data where that shows through).  The core then
     * fills the holes of the host file for falloc/full.  NULL: only a
     * format whose file is the disk (raw) can be preallocated. */
    int (*preallocate)(struct vimg_image *img, struct vimg_error *err);
    /* New ops come here (append only; never reorder). */
};

#ifdef __cplusplus
}
#endif
#endif

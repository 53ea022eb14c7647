/*
 * The copy engine behind convert.  It walks the sources by block status in
 * runs (never the whole disk up front, apart from qemu's progress pre-pass,
 * which only asks for status), never reads holes or zero runs, reads plain
 * data straight from the host file where it lies, keeps reads and writes in
 * flight together on the async interface (src/io/aio.h), splits data at the
 * -S granularity so written zeros stay sparse on the target, and reports
 * progress through a callback (the core never prints).
 *
 * Memory: queue_depth buffers of buf_size bytes plus a fixed table of
 * request slots; nothing grows with the image size.
 */
#ifndef VIMG_CORE_COPY_H
#define VIMG_CORE_COPY_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include "vimg/vimg.h"

struct vimg_copy_opts {
    uint64_t sparse_size;     /* -S in bytes; 0 = write everything */
    bool target_has_zero_init;/* zero runs need not be written */
    uint64_t buf_size;        /* largest request; default 2 MiB (qemu's chunk) */
    void (*progress)(void *opaque, float percent);
    void *progress_opaque;
    /* Optional, called just before progress: the bytes behind the percent
     * (done and total of what the copy reads or writes as data). */
    void (*progress_bytes)(void *opaque, uint64_t done, uint64_t total);

    /* -B: the target has a backing file, so only what each source's own top
     * layer allocates is copied (qemu's block_status_above(src, backing)). */
    bool top_only;
    /* -C: copy data runs inside the kernel (copy_file_range / reflink)
     * where source and target are plain files; no zero detection then. */
    bool copy_range;
    /* The target was created by this convert: append-mode writers
     * (driver op alloc_data) may be used. */
    bool fresh_target;
    /* -c: every cluster goes through the driver's write_compressed. */
    bool compress;
    /* -T none / -t none: O_DIRECT on the host files the engine reads and
     * writes itself (aligned requests only; the rest goes buffered). */
    bool src_direct, dst_direct;
    /* -t unsafe given explicitly: skip the final flush. */
    bool no_flush;
    /* Requests in flight (buffers in the pool); 0 = default. */
    unsigned queue_depth;
    /* Worker threads for compression; 0 = one per core. */
    unsigned threads;
    /* When it becomes nonzero (a signal handler sets it), the copy stops
     * as soon as the requests in flight are done and fails with
     * -ECANCELED. */
    volatile sig_atomic_t *cancel;
};

/* Copy the concatenation of srcs[0..nsrc) to dst from offset 0. */
int vimg_copy(struct vimg_image *const *srcs, int nsrc, struct vimg_image *dst,
              const struct vimg_copy_opts *opts, struct vimg_error *err);

/* Name of the async backend the last vimg_copy in this process used
 * ("uring", "libaio", "threads", or "sync" when nothing was asynchronous);
 * tests use it to prove a forced backend really ran. */
const char *vimg_internal_copy_backend(void);

/* qemu-img's zero split of a data buffer, in 512-byte sectors: the length
 * (*pnum) of the leading run and whether it must be written as data (1) or
 * may stay a hole (0).  min: zero runs shorter than this inside data are
 * written; alignment (a power of two): run ends are moved to multiples of it
 * where possible, counted from sector. */
int vimg_internal_zero_split(const uint8_t *buf, int n, int *pnum, int min,
                             int64_t sector, int alignment);

#endif

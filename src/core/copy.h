/*
 * The copy engine behind convert: walks the sources by block status, never
 * reads holes or zero runs, splits data at the -S granularity so written
 * zeros stay sparse on the target, and reports progress through a callback
 * (the core never prints).
 */
#ifndef VIMG_CORE_COPY_H
#define VIMG_CORE_COPY_H

#include <stdbool.h>
#include <stdint.h>

#include "vimg/vimg.h"

struct vimg_copy_opts {
    uint64_t sparse_size;     /* -S in bytes; 0 = write everything */
    bool target_has_zero_init;/* zero runs need not be written */
    uint64_t buf_size;        /* largest request; default 2 MiB */
    void (*progress)(void *opaque, float percent);
    void *progress_opaque;
};

/* Copy the concatenation of srcs[0..nsrc) to dst from offset 0. */
int vimg_copy(struct vimg_image *const *srcs, int nsrc, struct vimg_image *dst,
              const struct vimg_copy_opts *opts, struct vimg_error *err);

/* qemu-img's zero split of a data buffer, in 512-byte sectors: the length
 * (*pnum) of the leading run and whether it must be written as data (1) or
 * may stay a hole (0).  min: zero runs shorter than this inside data are
 * written; alignment (a power of two): run ends are moved to multiples of it
 * where possible, counted from sector. */
int vimg_internal_zero_split(const uint8_t *buf, int n, int *pnum, int min,
                             int64_t sector, int alignment);

#endif

/*
 * Read-only mappings of host files, for the copy engine: clusters already
 * in the page cache are compressed straight from the cache, without a
 * copy into a buffer first.
 *
 * A mapped file that shrinks under us (another process truncates it) would
 * raise SIGBUS on the next access.  While any mapping is open, a SIGBUS
 * handler puts a page of zeros over the faulting page of a registered
 * mapping and records the fault (vimg_fmap_faulted), so the access
 * completes and the engine fails with an error instead of dying; a fault
 * anywhere else gets the default action.  Mappings are refused when the
 * program has its own SIGBUS handler.
 */
#ifndef VIMG_IO_FMAP_H
#define VIMG_IO_FMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "io/file.h"

struct vimg_fmap {
    struct vimg_file *file;
    const uint8_t *base;
    uint64_t len;
    int slot;               /* index in the SIGBUS registry, -1 none */
};

/* Map all of f read-only: 0, or a negative errno (no fd, empty, a foreign
 * SIGBUS handler, too many mappings, mmap failed). */
int vimg_fmap_open(struct vimg_fmap *m, struct vimg_file *f);
void vimg_fmap_close(struct vimg_fmap *m);
/* Whether every page of [off, off+len) is in the page cache (mincore);
 * false when the range is not inside the mapping. */
bool vimg_fmap_resident(const struct vimg_fmap *m, uint64_t off, uint64_t len);
/* Drop this process's page-table entries of [off, off+len), so resident
 * memory stays bounded; the page cache keeps the data. */
void vimg_fmap_release(const struct vimg_fmap *m, uint64_t off, uint64_t len);
/* Whether a registered mapping faulted (sticky until vimg_fmap_clear). */
bool vimg_fmap_faulted(void);
void vimg_fmap_clear(void);

#endif

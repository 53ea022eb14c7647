/*
 * Host files.  `struct vimg_file` starts with its ops pointer, so tests and
 * fuzzers can put an in-memory file (or a recording file) where a posix file
 * would be.  All calls return 0 / a non-negative value or a negative errno;
 * the io layer sets no error messages: callers know which file and which
 * command, and say so.
 */
#ifndef VIMG_IO_FILE_H
#define VIMG_IO_FILE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct vimg_file;

enum vimg_alloc_mode {
    VIMG_ALLOC_FALLOC,  /* reserve blocks (fallocate), reads stay zero */
    VIMG_ALLOC_FULL,    /* write zeros (or allocate zeroed) */
};

struct vimg_file_ops {
    /* Whole reads: bytes past the end of the file read as zeros. */
    int (*pread)(struct vimg_file *f, void *buf, size_t len, uint64_t off);
    /* Whole writes. */
    int (*pwrite)(struct vimg_file *f, const void *buf, size_t len, uint64_t off);
    int64_t (*size)(struct vimg_file *f);
    /* Bytes allocated on the host (st_blocks * 512). */
    int64_t (*allocated)(struct vimg_file *f);
    int (*truncate)(struct vimg_file *f, uint64_t size);
    /* Allocate [off, off+len) without changing what it reads. */
    int (*allocate)(struct vimg_file *f, uint64_t off, uint64_t len,
                    enum vimg_alloc_mode mode);
    /* Make [off, off+len) read as zeros; may_unmap allows a hole. */
    int (*zero)(struct vimg_file *f, uint64_t off, uint64_t len, bool may_unmap);
    int (*sync)(struct vimg_file *f);
    /* Data/hole status at off: *is_data and the run length up to len.
     * A file system without SEEK_DATA answers "data" for everything. */
    int (*extent)(struct vimg_file *f, uint64_t off, uint64_t len,
                  bool *is_data, uint64_t *run_len);
    void (*close)(struct vimg_file *f);
};

struct vimg_file {
    const struct vimg_file_ops *ops;
    char *name;          /* as the user or the image named it */
    int fd;              /* -1 for files that are not posix files */
    bool writable;
    /* cache=unsafe: flushes are no-ops (qemu's BDRV_O_NO_FLUSH) */
    bool no_sync;
};

enum {
    VIMG_FILE_RDWR   = 1u << 0,
    VIMG_FILE_CREATE = 1u << 1,   /* O_CREAT */
    VIMG_FILE_EXCL   = 1u << 2,   /* O_EXCL */
    VIMG_FILE_TRUNC  = 1u << 3,   /* O_TRUNC */
    VIMG_FILE_DIRECT = 1u << 4,   /* O_DIRECT */
};

/* Open a regular file (a directory or device gives -EISDIR / -EINVAL
 * conventions as listed in file.c). */
int vimg_file_open_posix(struct vimg_file **out, const char *name, unsigned flags);
/* An in-memory file over a copy of data (fuzzers, tests); max_size bounds
 * growth. */
int vimg_file_open_mem(struct vimg_file **out, const char *name, const void *data,
                       size_t len, size_t max_size, bool writable);

static inline int vimg_file_pread(struct vimg_file *f, void *buf, size_t len, uint64_t off)
{
    return f->ops->pread(f, buf, len, off);
}
static inline int vimg_file_pwrite(struct vimg_file *f, const void *buf, size_t len,
                                   uint64_t off)
{
    return f->ops->pwrite(f, buf, len, off);
}
static inline int64_t vimg_file_size(struct vimg_file *f)
{
    return f->ops->size(f);
}
static inline int vimg_file_sync(struct vimg_file *f)
{
    return f->no_sync ? 0 : f->ops->sync(f);
}
/* Grow f to at least size bytes (never shrinks it): 0 or a negative errno.
 * The append-mode writers end with it, so the file covers every cluster
 * they handed out even when the engine left a tail unwritten. */
static inline int vimg_file_cover(struct vimg_file *f, uint64_t size)
{
    int64_t cur = vimg_file_size(f);
    if (cur < 0) {
        return (int)cur;
    }
    return (uint64_t)cur < size ? f->ops->truncate(f, size) : 0;
}
void vimg_file_close(struct vimg_file *f);

/*
 * Image locks, interoperable with QEMU's: OFD read locks on single bytes,
 * 100+i for "I use permission i", 200+i for "I do not let others use it".
 * held and unshared are masks of VIMG_PERM_*.  On a conflict the call
 * returns -EAGAIN with *perm_name set to the permission's name and *shared
 * telling which of qemu's two messages applies; it then holds nothing.
 */
enum {
    VIMG_PERM_CONSISTENT_READ = 1u << 0,
    VIMG_PERM_WRITE           = 1u << 1,
    VIMG_PERM_WRITE_UNCHANGED = 1u << 2,
    VIMG_PERM_RESIZE          = 1u << 3,
};
int vimg_file_lock(struct vimg_file *f, unsigned held, unsigned unshared,
                   const char **perm_name, bool *shared);

/*
 * Copy [src_off, src_off+len) of src to dst_off of dst inside the kernel:
 * a reflink (FICLONERANGE) when try_clone is set, the range is aligned to
 * the file system block and the file system shares extents, else
 * copy_file_range.  Both must be posix files.  Returns 0 when the whole
 * range was copied, -ENOTSUP (also for EXDEV, EINVAL, ENOSYS) when the
 * kernel cannot do it here: the caller then copies through a buffer.  A
 * copy may have been partly done before -ENOTSUP; redoing it is harmless.
 */
int vimg_file_copy_range(struct vimg_file *src, uint64_t src_off, struct vimg_file *dst,
                         uint64_t dst_off, uint64_t len, bool try_clone);

/* One zero-detection function for the whole project. */
bool vimg_is_zero(const void *buf, size_t len);

#endif

/*
 * Internals shared by aio.c and its backends.  Not part of any public API.
 *
 * The generic layer (aio.c) validates requests, enforces the depth bound and
 * keeps the in-flight count; a backend only moves requests to the kernel or
 * its workers and back, and hands each finished request to
 * vimg_aio_complete() on the caller's thread.
 */
#ifndef VIMG_IO_AIO_INT_H
#define VIMG_IO_AIO_INT_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "io/aio.h"

/* Rings and worker queues are sized from depth; more than this only
 * wastes locked memory and file descriptors. */
#define VIMG_AIO_MAX_DEPTH 4096u

/* One read or write syscall / sqe / iocb moves at most this much; the rest
 * goes through the short-I/O requeue path.  It stays below the kernel's
 * MAX_RW_COUNT and is a multiple of any O_DIRECT alignment. */
#define VIMG_AIO_MAX_CHUNK (1u << 30)

/* Size of vimg_aio_zero_buf, the source of ZERO emulated by writes. */
#define VIMG_AIO_ZERO_BUF_SIZE (256u * 1024)

struct vimg_aio;

struct vimg_aio_ops {
    const char *name;
    /* Set aio->priv; aio->depth is already valid.  Negative errno. */
    int (*init)(struct vimg_aio *aio);
    /* Wait until the backend no longer touches any request or buffer,
     * without running callbacks, then free aio->priv. */
    void (*cleanup)(struct vimg_aio *aio);
    /* req is validated, req->done is 0 and a slot is free (the generic
     * layer checked in_flight < depth). */
    int (*submit)(struct vimg_aio *aio, struct vimg_aio_req *req);
    /* Start queued work and complete finished requests; block until at
     * least min_complete callbacks ran (min_complete <= in_flight).
     * Returns the callbacks run, or a negative errno if none ran. */
    int (*reap)(struct vimg_aio *aio, unsigned min_complete);
    int (*poll_fd)(const struct vimg_aio *aio);
};

struct vimg_aio {
    const struct vimg_aio_ops *ops;
    void *priv;
    unsigned depth;
    unsigned in_flight;
    bool in_reap;
};

#if HAVE_LIBURING
extern const struct vimg_aio_ops vimg_aio_uring_ops;
#endif
#if HAVE_LIBAIO
extern const struct vimg_aio_ops vimg_aio_libaio_ops;
#endif
extern const struct vimg_aio_ops vimg_aio_threads_ops;

/* Never written: bss, so its pages are the shared zero page.  Aligned for
 * O_DIRECT writes. */
extern uint8_t vimg_aio_zero_buf[VIMG_AIO_ZERO_BUF_SIZE];

/* Account for req and run its callback.  The backend must have released
 * everything it holds for req first: the callback may submit again. */
void vimg_aio_complete(struct vimg_aio *aio, struct vimg_aio_req *req, int ret);

/*
 * res is the result of reading req at off + done: is that the end of the
 * file?  0 is.  So is -EINVAL after a short read: with O_DIRECT a file
 * whose size is not block aligned ends with a short read, and the requeued
 * read at the now unaligned offset fails with -EINVAL instead of returning 0.
 */
static inline bool vimg_aio_read_at_eof(const struct vimg_aio_req *req, int res)
{
    return res == 0 || (res == -EINVAL && req->done > 0);
}

/* Synchronous helpers for the threads backend and for libaio's inline ops.
 * They loop over EINTR, EAGAIN and short transfers like the async paths. */
int vimg_aio_sync_rw(struct vimg_aio_req *req);
int vimg_aio_sync_zero(int fd, uint64_t off, uint64_t len);
int vimg_aio_sync_flush(int fd);

#endif

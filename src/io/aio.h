/*
 * One asynchronous I/O interface with three backends: io_uring (default),
 * libaio (O_DIRECT files) and a thread pool (always available).  The backend
 * is chosen when the program runs, because a sandbox may refuse io_uring.
 *
 * Requests are submitted on fds; completion is reported through
 * vimg_aio_reap, which calls each request's callback with the result:
 * 0 for a whole read/write/zero/flush, or a negative errno.  Short reads and
 * writes are requeued by the backend until complete (a read past EOF fills
 * the rest with zeros), -EAGAIN is retried.  The struct vimg_aio_req is owned
 * by the caller and must stay alive until its callback has run.
 */
#ifndef VIMG_IO_AIO_H
#define VIMG_IO_AIO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum vimg_aio_op {
    VIMG_AIO_READ,
    VIMG_AIO_WRITE,
    VIMG_AIO_ZERO,    /* make the range read as zeros (may punch a hole) */
    VIMG_AIO_FSYNC,
};

struct vimg_aio_req;
typedef void (*vimg_aio_cb)(struct vimg_aio_req *req, int result);

struct vimg_aio_req {
    enum vimg_aio_op op;
    int fd;
    void *buf;
    size_t len;
    uint64_t off;
    vimg_aio_cb cb;
    void *opaque;
    /* backend state */
    size_t done;
};

enum vimg_aio_backend {
    VIMG_AIO_AUTO,
    VIMG_AIO_URING,
    VIMG_AIO_LIBAIO,
    VIMG_AIO_THREADS,
};

struct vimg_aio;

/* depth: the most requests in flight.  AUTO tries io_uring, then threads
 * (libaio only when asked for).  The environment variable VIMG_AIO=uring|
 * libaio|threads overrides AUTO (tests use it to force each backend).
 * Returns -ENOSYS/-EPERM when a forced backend cannot run here. */
int vimg_aio_new(struct vimg_aio **out, enum vimg_aio_backend backend,
                 unsigned depth);
void vimg_aio_free(struct vimg_aio *aio);
const char *vimg_aio_backend_name(const struct vimg_aio *aio);

/* Queue a request; it may not start before vimg_aio_reap.  -EAGAIN when
 * depth requests are already in flight. */
int vimg_aio_submit(struct vimg_aio *aio, struct vimg_aio_req *req);
/* Start queued requests and run callbacks of completed ones; wait for at
 * least min_complete completions.  Returns how many callbacks ran. */
int vimg_aio_reap(struct vimg_aio *aio, unsigned min_complete);
unsigned vimg_aio_in_flight(const struct vimg_aio *aio);
/* A pollable fd that becomes readable on completion, or -1. */
int vimg_aio_poll_fd(const struct vimg_aio *aio);

#endif

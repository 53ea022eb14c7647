/*
 * Asynchronous I/O: backend choice, request validation, in-flight
 * accounting, and the synchronous helpers the backends share.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/aio.h"
#include "io/aio_int.h"
#include "util/util.h"

uint8_t vimg_aio_zero_buf[VIMG_AIO_ZERO_BUF_SIZE] __attribute__((aligned(4096)));

static int aio_backend_from_env(enum vimg_aio_backend *backend)
{
    const char *s = getenv("VIMG_AIO");

    if (!s || !*s || strcmp(s, "auto") == 0) {
        *backend = VIMG_AIO_AUTO;
    } else if (strcmp(s, "uring") == 0 || strcmp(s, "io_uring") == 0) {
        *backend = VIMG_AIO_URING;
    } else if (strcmp(s, "libaio") == 0) {
        *backend = VIMG_AIO_LIBAIO;
    } else if (strcmp(s, "threads") == 0) {
        *backend = VIMG_AIO_THREADS;
    } else {
        /* A typo must not silently test the wrong backend. */
        return -EINVAL;
    }
    return 0;
}

static int aio_try_backend(struct vimg_aio *aio, enum vimg_aio_backend backend)
{
    int ret;

    switch (backend) {
    case VIMG_AIO_URING:
#if HAVE_LIBURING
        aio->ops = &vimg_aio_uring_ops;
        break;
#else
        return -ENOSYS;
#endif
    case VIMG_AIO_LIBAIO:
#if HAVE_LIBAIO
        aio->ops = &vimg_aio_libaio_ops;
        break;
#else
        return -ENOSYS;
#endif
    case VIMG_AIO_THREADS:
        aio->ops = &vimg_aio_threads_ops;
        break;
    default:
        return -EINVAL;
    }
    ret = aio->ops->init(aio);
    if (ret < 0) {
        aio->ops = NULL;
        aio->priv = NULL;
    }
    return ret;
}

/* Errors that mean "io_uring cannot run here" rather than "something is
 * wrong": seccomp or io_uring_disabled (EPERM), old kernel (ENOSYS), setup
 * flags the kernel does not know (EINVAL), RLIMIT_MEMLOCK on kernels that
 * charge rings to it (ENOMEM). */
static bool aio_uring_unavailable(int err)
{
    return err == -EPERM || err == -ENOSYS || err == -EINVAL || err == -ENOMEM;
}

int vimg_aio_new(struct vimg_aio **out, enum vimg_aio_backend backend,
                 unsigned depth)
{
    struct vimg_aio *aio;
    int ret;

    *out = NULL;
    if (depth == 0) {
        return -EINVAL;
    }
    if (backend == VIMG_AIO_AUTO) {
        ret = aio_backend_from_env(&backend);
        if (ret < 0) {
            return ret;
        }
    }

    aio = calloc(1, sizeof(*aio));
    if (!aio) {
        return -ENOMEM;
    }
    aio->depth = VIMG_MIN(depth, VIMG_AIO_MAX_DEPTH);

    if (backend == VIMG_AIO_AUTO) {
        ret = -ENOSYS;
#if HAVE_LIBURING
        ret = aio_try_backend(aio, VIMG_AIO_URING);
#endif
        if (ret < 0 && aio_uring_unavailable(ret)) {
            ret = aio_try_backend(aio, VIMG_AIO_THREADS);
        }
    } else {
        ret = aio_try_backend(aio, backend);
    }
    if (ret < 0) {
        free(aio);
        return ret;
    }
    *out = aio;
    return 0;
}

void vimg_aio_free(struct vimg_aio *aio)
{
    if (!aio) {
        return;
    }
    aio->ops->cleanup(aio);
    free(aio);
}

const char *vimg_aio_backend_name(const struct vimg_aio *aio)
{
    return aio->ops->name;
}

int vimg_aio_submit(struct vimg_aio *aio, struct vimg_aio_req *req)
{
    int ret;

    if (!req || !req->cb) {
        return -EINVAL;
    }
    switch (req->op) {
    case VIMG_AIO_READ:
    case VIMG_AIO_WRITE:
        if (!req->buf && req->len) {
            return -EINVAL;
        }
        break;
    case VIMG_AIO_ZERO:
    case VIMG_AIO_FSYNC:
        break;
    default:
        return -EINVAL;
    }
    /* Offsets end up in off_t and in the kernel's loff_t. */
    if (req->off > INT64_MAX || req->len > INT64_MAX - req->off) {
        return -EINVAL;
    }
    if (aio->in_flight >= aio->depth) {
        return -EAGAIN;
    }

    req->done = 0;
    ret = aio->ops->submit(aio, req);
    if (ret < 0) {
        return ret;
    }
    aio->in_flight++;
    return 0;
}

int vimg_aio_reap(struct vimg_aio *aio, unsigned min_complete)
{
    int ret;

    /* A nested reap would run callbacks inside a callback and, in the
     * backends, iterate completion state that the outer reap holds. */
    if (aio->in_reap) {
        return -EBUSY;
    }
    /* Waiting for more than can ever complete would block forever. */
    min_complete = VIMG_MIN(min_complete, aio->in_flight);
    aio->in_reap = true;
    ret = aio->ops->reap(aio, min_complete);
    aio->in_reap = false;
    return ret;
}

unsigned vimg_aio_in_flight(const struct vimg_aio *aio)
{
    return aio->in_flight;
}

int vimg_aio_poll_fd(const struct vimg_aio *aio)
{
    return aio->ops->poll_fd(aio);
}

void vimg_aio_complete(struct vimg_aio *aio, struct vimg_aio_req *req, int ret)
{
    aio->in_flight--;
    req->cb(req, ret);
}

int vimg_aio_sync_rw(struct vimg_aio_req *req)
{
    uint8_t *buf = req->buf;

    while (req->done < req->len) {
        size_t chunk = VIMG_MIN(req->len - req->done, (size_t)VIMG_AIO_MAX_CHUNK);
        off_t pos = (off_t)(req->off + req->done);
        ssize_t n;

        if (req->op == VIMG_AIO_READ) {
            n = pread(req->fd, buf + req->done, chunk, pos);
        } else {
            n = pwrite(req->fd, buf + req->done, chunk, pos);
        }
        if (n < 0) {
            int err = -errno;

            if (err == -EINTR || err == -EAGAIN) {
                continue;
            }
            if (req->op == VIMG_AIO_READ && vimg_aio_read_at_eof(req, err)) {
                break;
            }
            return err;
        }
        if (n == 0) {
            if (req->op == VIMG_AIO_READ) {
                break;
            }
            /* No progress and no error: retrying would spin forever. */
            return -EIO;
        }
        req->done += (size_t)n;
    }
    if (req->done < req->len) {
        memset(buf + req->done, 0, req->len - req->done);
        req->done = req->len;
    }
    return 0;
}

int vimg_aio_sync_zero(int fd, uint64_t off, uint64_t len)
{
    uint64_t done = 0;

    if (len == 0) {
        return 0;
    }
    for (;;) {
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      (off_t)off, (off_t)len) == 0) {
            return 0;
        }
        if (errno != EINTR) {
            break;
        }
    }
    /* Only "cannot punch here" falls back; EBADF, EIO etc. are answers. */
    if (errno != EOPNOTSUPP && errno != ENOSYS) {
        return -errno;
    }

    while (done < len) {
        size_t chunk = (size_t)VIMG_MIN(len - done, (uint64_t)VIMG_AIO_ZERO_BUF_SIZE);
        ssize_t n = pwrite(fd, vimg_aio_zero_buf, chunk, (off_t)(off + done));

        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                continue;
            }
            return -errno;
        }
        if (n == 0) {
            return -EIO;
        }
        done += (uint64_t)n;
    }
    return 0;
}

int vimg_aio_sync_flush(int fd)
{
    while (fdatasync(fd) < 0) {
        if (errno != EINTR) {
            return -errno;
        }
    }
    return 0;
}

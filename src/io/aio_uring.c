/*
 * io_uring backend.  Each request owns one slot, reached from its sqe and
 * cqe through user_data; a slot has at most one sqe in the kernel, so with
 * depth slots the SQ never fills and the CQ never overflows.  Submission
 * only prepares sqes: vimg_aio_reap hands them to the kernel in one batch.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include "io/aio.h"
#include "io/aio_int.h"
#include "util/util.h"

struct uring_slot {
    struct vimg_aio_req *req;
    struct uring_slot *next;    /* free list */
    struct iovec iov;           /* for READV/WRITEV on kernels before 5.6 */
    bool zero_emul;             /* ZERO done by writing zeros */
};

struct uring_state {
    struct io_uring ring;
    struct uring_slot *slots;
    struct uring_slot *free_list;
    unsigned in_kernel;         /* sqes prepared whose cqe is not yet seen */
    bool have_rw;               /* IORING_OP_READ / IORING_OP_WRITE */
    bool have_fallocate;
};

static void uring_probe(struct uring_state *st)
{
    struct io_uring_probe *probe = io_uring_get_probe_ring(&st->ring);

    /* No probe means a kernel before 5.6, which has neither opcode. */
    if (!probe) {
        return;
    }
    st->have_rw = io_uring_opcode_supported(probe, IORING_OP_READ) &&
                  io_uring_opcode_supported(probe, IORING_OP_WRITE);
    st->have_fallocate = io_uring_opcode_supported(probe, IORING_OP_FALLOCATE);
    io_uring_free_probe(probe);
}

static int uring_init(struct vimg_aio *aio)
{
    struct uring_state *st;
    unsigned i;
    int ret;

    st = calloc(1, sizeof(*st));
    if (!st) {
        return -ENOMEM;
    }
    st->slots = calloc(aio->depth, sizeof(*st->slots));
    if (!st->slots) {
        free(st);
        return -ENOMEM;
    }
    for (i = aio->depth; i > 0; i--) {
        st->slots[i - 1].next = st->free_list;
        st->free_list = &st->slots[i - 1];
    }

    ret = io_uring_queue_init(aio->depth, &st->ring, 0);
    if (ret < 0) {
        free(st->slots);
        free(st);
        return ret;
    }
    uring_probe(st);

    aio->priv = st;
    return 0;
}

/* Hand every prepared sqe to the kernel. */
static int uring_flush(struct uring_state *st)
{
    while (io_uring_sq_ready(&st->ring) > 0) {
        int ret = io_uring_submit(&st->ring);

        if (ret == -EINTR) {
            continue;
        }
        if (ret < 0) {
            return ret;
        }
        /* The kernel stops at an sqe it rejects (after posting its cqe);
         * the loop submits the rest.  Zero would mean no progress at all. */
        if (ret == 0) {
            return -EAGAIN;
        }
    }
    return 0;
}

static void uring_cleanup(struct vimg_aio *aio)
{
    struct uring_state *st = aio->priv;

    /* The kernel may still be reading or writing caller buffers, and
     * closing the ring does not wait for that: wait for every cqe. */
    uring_flush(st);
    while (st->in_kernel > io_uring_sq_ready(&st->ring)) {
        struct io_uring_cqe *cqe;
        int ret = io_uring_wait_cqe(&st->ring, &cqe);

        if (ret == -EINTR) {
            continue;
        }
        if (ret < 0) {
            break;
        }
        io_uring_cqe_seen(&st->ring, cqe);
        st->in_kernel--;
    }
    io_uring_queue_exit(&st->ring);
    free(st->slots);
    free(st);
    aio->priv = NULL;
}

static void uring_prep_rw(struct uring_state *st, struct uring_slot *slot,
                          struct io_uring_sqe *sqe, bool is_read,
                          void *buf, size_t len, uint64_t pos)
{
    int fd = slot->req->fd;

    if (st->have_rw) {
        if (is_read) {
            io_uring_prep_read(sqe, fd, buf, (unsigned)len, pos);
        } else {
            io_uring_prep_write(sqe, fd, buf, (unsigned)len, pos);
        }
        return;
    }
    slot->iov.iov_base = buf;
    slot->iov.iov_len = len;
    if (is_read) {
        io_uring_prep_readv(sqe, fd, &slot->iov, 1, pos);
    } else {
        io_uring_prep_writev(sqe, fd, &slot->iov, 1, pos);
    }
}

/* Queue the next (or first) sqe of the slot's request. */
static int uring_prep(struct uring_state *st, struct uring_slot *slot)
{
    struct vimg_aio_req *req = slot->req;
    size_t remaining = req->len - req->done;
    uint64_t pos = req->off + req->done;
    struct io_uring_sqe *sqe;

    sqe = io_uring_get_sqe(&st->ring);
    if (!sqe) {
        /* Cannot happen while slots <= SQ entries; be safe anyway. */
        uring_flush(st);
        sqe = io_uring_get_sqe(&st->ring);
        if (!sqe) {
            return -EBUSY;
        }
    }

    switch (req->op) {
    case VIMG_AIO_READ:
    case VIMG_AIO_WRITE:
        if (remaining == 0) {
            /* Empty request: still complete it through the ring, in order,
             * and never form a pointer from a NULL buf. */
            io_uring_prep_nop(sqe);
            break;
        }
        uring_prep_rw(st, slot, sqe, req->op == VIMG_AIO_READ,
                      (uint8_t *)req->buf + req->done,
                      VIMG_MIN(remaining, (size_t)VIMG_AIO_MAX_CHUNK), pos);
        break;
    case VIMG_AIO_ZERO:
        if (remaining == 0) {
            /* fallocate rejects len 0 with EINVAL. */
            io_uring_prep_nop(sqe);
        } else if (slot->zero_emul) {
            uring_prep_rw(st, slot, sqe, false, vimg_aio_zero_buf,
                          VIMG_MIN(remaining, (size_t)VIMG_AIO_ZERO_BUF_SIZE), pos);
        } else {
            io_uring_prep_fallocate(sqe, req->fd,
                                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                    (off_t)pos, (off_t)remaining);
        }
        break;
    case VIMG_AIO_FSYNC:
        io_uring_prep_fsync(sqe, req->fd, IORING_FSYNC_DATASYNC);
        break;
    }
    io_uring_sqe_set_data(sqe, slot);
    st->in_kernel++;
    return 0;
}

static int uring_submit(struct vimg_aio *aio, struct vimg_aio_req *req)
{
    struct uring_state *st = aio->priv;
    struct uring_slot *slot = st->free_list;
    int ret;

    if (!slot) {
        return -EAGAIN;
    }
    slot->req = req;
    slot->zero_emul = req->op == VIMG_AIO_ZERO && !st->have_fallocate;
    ret = uring_prep(st, slot);
    if (ret < 0) {
        slot->req = NULL;
        return ret;
    }
    st->free_list = slot->next;
    return 0;
}

/* Release the slot, then run the callback: it may reuse the slot. */
static int uring_finish(struct vimg_aio *aio, struct uring_slot *slot, int ret)
{
    struct uring_state *st = aio->priv;
    struct vimg_aio_req *req = slot->req;

    slot->req = NULL;
    slot->next = st->free_list;
    st->free_list = slot;
    vimg_aio_complete(aio, req, ret);
    return 1;
}

static int uring_requeue(struct vimg_aio *aio, struct uring_slot *slot)
{
    int ret = uring_prep(aio->priv, slot);

    if (ret < 0) {
        return uring_finish(aio, slot, ret);
    }
    return 0;
}

/* A write (or a write of zeros) moved res bytes. */
static int uring_write_done(struct vimg_aio *aio, struct uring_slot *slot, int res)
{
    struct vimg_aio_req *req = slot->req;

    if (res < 0) {
        return uring_finish(aio, slot, res);
    }
    if (res == 0 && req->done < req->len) {
        /* No progress and no error: requeueing would spin forever. */
        return uring_finish(aio, slot, -EIO);
    }
    req->done += (size_t)res;
    if (req->done < req->len) {
        return uring_requeue(aio, slot);
    }
    return uring_finish(aio, slot, 0);
}

/* Returns the callbacks run (0 or 1). */
static int uring_handle_cqe(struct vimg_aio *aio, struct uring_slot *slot, int res)
{
    struct uring_state *st = aio->priv;
    struct vimg_aio_req *req = slot->req;

    st->in_kernel--;
    if (res == -EINTR || res == -EAGAIN) {
        return uring_requeue(aio, slot);
    }

    switch (req->op) {
    case VIMG_AIO_READ:
        if (vimg_aio_read_at_eof(req, res)) {
            if (req->done < req->len) {
                memset((uint8_t *)req->buf + req->done, 0, req->len - req->done);
                req->done = req->len;
            }
            return uring_finish(aio, slot, 0);
        }
        if (res < 0) {
            return uring_finish(aio, slot, res);
        }
        req->done += (size_t)res;
        if (req->done < req->len) {
            return uring_requeue(aio, slot);
        }
        return uring_finish(aio, slot, 0);
    case VIMG_AIO_WRITE:
        return uring_write_done(aio, slot, res);
    case VIMG_AIO_ZERO:
        if (slot->zero_emul) {
            return uring_write_done(aio, slot, res);
        }
        if (res == -EOPNOTSUPP && req->done < req->len) {
            /* The opcode exists but this file cannot punch holes. */
            slot->zero_emul = true;
            return uring_requeue(aio, slot);
        }
        return uring_finish(aio, slot, res < 0 ? res : 0);
    case VIMG_AIO_FSYNC:
        return uring_finish(aio, slot, res < 0 ? res : 0);
    }
    return uring_finish(aio, slot, -EINVAL);
}

static int uring_reap(struct vimg_aio *aio, unsigned min_complete)
{
    struct uring_state *st = aio->priv;
    unsigned count = 0;
    int ret = 0;

    for (;;) {
        struct io_uring_cqe *cqe;

        /* This terminates: what callbacks and requeues prepare is not
         * submitted before the flush below. */
        while (io_uring_peek_cqe(&st->ring, &cqe) == 0) {
            struct uring_slot *slot = io_uring_cqe_get_data(cqe);
            int res = cqe->res;

            io_uring_cqe_seen(&st->ring, cqe);
            count += (unsigned)uring_handle_cqe(aio, slot, res);
        }
        if (count >= min_complete) {
            ret = uring_flush(st);
            break;
        }
        if (st->in_kernel == 0) {
            /* min_complete <= in_flight makes this unreachable; waiting
             * here would never return. */
            break;
        }
        ret = io_uring_submit_and_wait(&st->ring, 1);
        if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) {
            break;
        }
        ret = 0;
    }
    /* Report an error only when it is the whole answer; a later reap sees
     * it again if it persists. */
    if (ret < 0 && count == 0) {
        return ret;
    }
    return (int)count;
}

static int uring_poll_fd(const struct vimg_aio *aio)
{
    const struct uring_state *st = aio->priv;

    /* The ring fd polls readable exactly while the CQ holds entries. */
    return st->ring.ring_fd;
}

const struct vimg_aio_ops vimg_aio_uring_ops = {
    .name = "io_uring",
    .init = uring_init,
    .cleanup = uring_cleanup,
    .submit = uring_submit,
    .reap = uring_reap,
    .poll_fd = uring_poll_fd,
};

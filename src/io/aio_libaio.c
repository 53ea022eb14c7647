/*
 * Linux native AIO backend, for O_DIRECT files (on buffered files io_submit
 * blocks until the I/O is done).  Reads and writes go to the kernel in one
 * io_submit batch per reap.  ZERO and FSYNC have no portable iocb, so they
 * run synchronously inside reap and complete like the others.
 */
#include "config.h"

#include <errno.h>
#include <libaio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "io/aio.h"
#include "io/aio_int.h"
#include "util/util.h"

struct laio_slot {
    struct iocb iocb;
    struct vimg_aio_req *req;
    struct laio_slot *next;     /* free, pending or done list */
    int ret;                    /* result of a synchronous op */
};

struct laio_list {
    struct laio_slot *head, *tail;
};

struct laio_state {
    io_context_t ctx;
    struct laio_slot *slots;
    struct laio_slot *free_list;
    struct laio_list pending;   /* submitted or requeued, not started */
    struct laio_list done;      /* finished synchronously, callback due */
    struct iocb **batch;
    struct io_event *events;
    unsigned in_kernel;
    int efd;
};

static void laio_list_append(struct laio_list *list, struct laio_slot *slot)
{
    slot->next = NULL;
    if (list->tail) {
        list->tail->next = slot;
    } else {
        list->head = slot;
    }
    list->tail = slot;
}

static struct laio_slot *laio_list_pop(struct laio_list *list)
{
    struct laio_slot *slot = list->head;

    if (slot) {
        list->head = slot->next;
        if (!list->head) {
            list->tail = NULL;
        }
    }
    return slot;
}

static void laio_free_state(struct laio_state *st)
{
    if (st->efd >= 0) {
        close(st->efd);
    }
    free(st->events);
    free(st->batch);
    free(st->slots);
    free(st);
}

static int laio_init(struct vimg_aio *aio)
{
    struct laio_state *st;
    unsigned i;
    int ret;

    st = calloc(1, sizeof(*st));
    if (!st) {
        return -ENOMEM;
    }
    st->efd = -1;
    st->slots = calloc(aio->depth, sizeof(*st->slots));
    st->batch = calloc(aio->depth, sizeof(*st->batch));
    st->events = calloc(aio->depth, sizeof(*st->events));
    if (!st->slots || !st->batch || !st->events) {
        laio_free_state(st);
        return -ENOMEM;
    }
    for (i = aio->depth; i > 0; i--) {
        st->slots[i - 1].next = st->free_list;
        st->free_list = &st->slots[i - 1];
    }

    st->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (st->efd < 0) {
        ret = -errno;
        laio_free_state(st);
        return ret;
    }
    /* libaio returns negative errno itself. */
    ret = io_setup((int)aio->depth, &st->ctx);
    if (ret < 0) {
        laio_free_state(st);
        return ret;
    }

    aio->priv = st;
    return 0;
}

static void laio_cleanup(struct vimg_aio *aio)
{
    struct laio_state *st = aio->priv;

    /* Caller buffers must be left alone before we return. */
    while (st->in_kernel > 0) {
        int n = io_getevents(st->ctx, 1, (long)aio->depth, st->events, NULL);

        if (n == -EINTR) {
            continue;
        }
        if (n < 0) {
            break;
        }
        st->in_kernel -= (unsigned)n;
    }
    io_destroy(st->ctx);
    laio_free_state(st);
    aio->priv = NULL;
}

static int laio_submit(struct vimg_aio *aio, struct vimg_aio_req *req)
{
    struct laio_state *st = aio->priv;
    struct laio_slot *slot = st->free_list;

    if (!slot) {
        return -EAGAIN;
    }
    st->free_list = slot->next;
    slot->req = req;
    slot->ret = 0;
    laio_list_append(&st->pending, slot);
    return 0;
}

static void laio_signal_efd(struct laio_state *st)
{
    uint64_t one = 1;

    /* EAGAIN: the counter is saturated, i.e. already readable. */
    while (write(st->efd, &one, sizeof(one)) < 0 && errno == EINTR) {
        continue;
    }
}

static void laio_drain_efd(struct laio_state *st)
{
    uint64_t val;

    while (read(st->efd, &val, sizeof(val)) < 0 && errno == EINTR) {
        continue;
    }
}

/* A read stopped at the end of the file: the rest reads as zeros. */
static void laio_zero_tail(struct vimg_aio_req *req)
{
    if (req->done < req->len) {
        memset((uint8_t *)req->buf + req->done, 0, req->len - req->done);
        req->done = req->len;
    }
}

static void laio_prep(struct laio_state *st, struct laio_slot *slot)
{
    struct vimg_aio_req *req = slot->req;
    size_t chunk = VIMG_MIN(req->len - req->done, (size_t)VIMG_AIO_MAX_CHUNK);
    uint8_t *buf = (uint8_t *)req->buf + req->done;
    long long pos = (long long)(req->off + req->done);

    if (req->op == VIMG_AIO_READ) {
        io_prep_pread(&slot->iocb, req->fd, buf, chunk, pos);
    } else {
        io_prep_pwrite(&slot->iocb, req->fd, buf, chunk, pos);
    }
    slot->iocb.data = slot;
    io_set_eventfd(&slot->iocb, st->efd);
}

/*
 * Start everything pending: reads and writes in one io_submit batch, then
 * the synchronous ops, so that on buffered files (where io_submit does the
 * I/O) a flush queued after a write also follows it.  Returns true when
 * the kernel refused some for lack of resources (they stay pending).
 */
static bool laio_start(struct vimg_aio *aio)
{
    struct laio_state *st = aio->priv;
    struct laio_list sync_ops = { NULL, NULL };
    struct laio_slot *slot;
    unsigned n = 0, i = 0;
    bool stalled = false;

    while ((slot = laio_list_pop(&st->pending))) {
        struct vimg_aio_req *req = slot->req;

        if (req->op == VIMG_AIO_ZERO || req->op == VIMG_AIO_FSYNC ||
            req->done == req->len) {
            laio_list_append(&sync_ops, slot);
            continue;
        }
        laio_prep(st, slot);
        st->batch[n++] = &slot->iocb;
    }

    while (i < n) {
        int ret = io_submit(st->ctx, (long)(n - i), &st->batch[i]);

        if (ret == -EINTR) {
            continue;
        }
        if (ret == -EAGAIN && st->in_kernel > 0) {
            /* Out of kernel resources: retry once something completes. */
            for (; i < n; i++) {
                laio_list_append(&st->pending, st->batch[i]->data);
            }
            stalled = true;
            break;
        }
        if (ret < 0) {
            /* io_submit fails for the first iocb it cannot queue (EBADF,
             * EINVAL for misaligned O_DIRECT...): that one request fails,
             * the rest of the batch still goes. */
            slot = st->batch[i]->data;
            slot->ret = ret;
            if (slot->req->op == VIMG_AIO_READ &&
                vimg_aio_read_at_eof(slot->req, ret)) {
                laio_zero_tail(slot->req);
                slot->ret = 0;
            }
            laio_list_append(&st->done, slot);
            laio_signal_efd(st);
            i++;
            continue;
        }
        st->in_kernel += (unsigned)ret;
        i += (unsigned)ret;
    }

    while ((slot = laio_list_pop(&sync_ops))) {
        struct vimg_aio_req *req = slot->req;

        if (req->op == VIMG_AIO_ZERO) {
            slot->ret = vimg_aio_sync_zero(req->fd, req->off, req->len);
        } else if (req->op == VIMG_AIO_FSYNC) {
            slot->ret = vimg_aio_sync_flush(req->fd);
        } else {
            slot->ret = 0;   /* empty read or write */
        }
        laio_list_append(&st->done, slot);
        laio_signal_efd(st);
    }
    return stalled;
}

/* Release the slot, then run the callback: it may reuse the slot. */
static unsigned laio_finish(struct vimg_aio *aio, struct laio_slot *slot, int ret)
{
    struct laio_state *st = aio->priv;
    struct vimg_aio_req *req = slot->req;

    slot->req = NULL;
    slot->next = st->free_list;
    st->free_list = slot;
    vimg_aio_complete(aio, req, ret);
    return 1;
}

static unsigned laio_requeue(struct vimg_aio *aio, struct laio_slot *slot)
{
    struct laio_state *st = aio->priv;

    laio_list_append(&st->pending, slot);
    return 0;
}

static unsigned laio_run_done(struct vimg_aio *aio)
{
    struct laio_state *st = aio->priv;
    struct laio_list done = st->done;
    struct laio_slot *slot;
    unsigned count = 0;

    /* Detach first: callbacks may submit, and only laio_start (not a
     * callback) can add to the done list. */
    st->done.head = NULL;
    st->done.tail = NULL;
    while ((slot = laio_list_pop(&done))) {
        count += laio_finish(aio, slot, slot->ret);
    }
    return count;
}

/* Returns the callbacks run (0 or 1). */
static unsigned laio_handle_event(struct vimg_aio *aio, struct io_event *ev)
{
    struct laio_state *st = aio->priv;
    struct laio_slot *slot = ev->data;
    struct vimg_aio_req *req = slot->req;
    /* res is the byte count (at most VIMG_AIO_MAX_CHUNK) or -errno. */
    int res = (int)(long)ev->res;

    st->in_kernel--;
    if (res == -EINTR || res == -EAGAIN) {
        return laio_requeue(aio, slot);
    }
    if (req->op == VIMG_AIO_READ && vimg_aio_read_at_eof(req, res)) {
        laio_zero_tail(req);
        return laio_finish(aio, slot, 0);
    }
    if (res < 0) {
        return laio_finish(aio, slot, res);
    }
    if (res == 0) {
        /* A write without progress or error: requeueing would spin. */
        return laio_finish(aio, slot, -EIO);
    }
    req->done += (size_t)res;
    if (req->done < req->len) {
        return laio_requeue(aio, slot);
    }
    return laio_finish(aio, slot, 0);
}

/* Collect kernel completions, waiting for at least min_nr. */
static int laio_get_events(struct vimg_aio *aio, long min_nr)
{
    struct laio_state *st = aio->priv;
    struct timespec zero = { 0, 0 };
    unsigned count = 0;
    int n, i;

    if (st->in_kernel == 0) {
        return 0;
    }
    do {
        n = io_getevents(st->ctx, min_nr, (long)st->in_kernel, st->events,
                         min_nr ? NULL : &zero);
    } while (n == -EINTR);
    if (n < 0) {
        return n;
    }
    for (i = 0; i < n; i++) {
        count += laio_handle_event(aio, &st->events[i]);
    }
    return (int)count;
}

static int laio_reap(struct vimg_aio *aio, unsigned min_complete)
{
    struct laio_state *st = aio->priv;
    unsigned count = 0;
    int ret = 0;

    laio_drain_efd(st);
    for (;;) {
        bool stalled = laio_start(aio);

        count += laio_run_done(aio);
        ret = laio_get_events(aio, 0);
        if (ret < 0) {
            break;
        }
        count += (unsigned)ret;
        if (count >= min_complete) {
            /* Requeues and what callbacks submitted start now; their
             * synchronous parts complete on the next reap (the eventfd
             * tells poll users). */
            laio_start(aio);
            ret = 0;
            break;
        }
        if (st->done.head) {
            continue;
        }
        /* Requeued reads and writes start before we block; what the
         * kernel refused waits for a completion, unless none can come. */
        if (st->pending.head && (!stalled || st->in_kernel == 0)) {
            continue;
        }
        if (st->in_kernel == 0) {
            /* min_complete <= in_flight makes this unreachable. */
            break;
        }
        ret = laio_get_events(aio, 1);
        if (ret < 0) {
            break;
        }
        count += (unsigned)ret;
    }
    if (ret < 0 && count == 0) {
        return ret;
    }
    return (int)count;
}

static int laio_poll_fd(const struct vimg_aio *aio)
{
    const struct laio_state *st = aio->priv;

    return st->efd;
}

const struct vimg_aio_ops vimg_aio_libaio_ops = {
    .name = "libaio",
    .init = laio_init,
    .cleanup = laio_cleanup,
    .submit = laio_submit,
    .reap = laio_reap,
    .poll_fd = laio_poll_fd,
};

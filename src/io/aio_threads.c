/*
 * Thread-pool backend: always available, and the fallback where io_uring
 * is refused.  A few workers run the blocking syscalls; finished requests
 * go back on a list that only vimg_aio_reap empties, so callbacks always
 * run on the caller's thread.
 */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "io/aio.h"
#include "io/aio_int.h"
#include "util/util.h"

#define THR_MIN_WORKERS 2u
#define THR_MAX_WORKERS 4u

struct thr_slot {
    struct vimg_aio_req *req;
    struct thr_slot *next;
    int ret;
};

struct thr_state {
    pthread_mutex_t lock;
    pthread_cond_t work_cond;   /* work list became non-empty, or stop */
    pthread_cond_t done_cond;   /* done list became non-empty */
    struct thr_slot *slots;
    /* Only the caller's thread touches the free list. */
    struct thr_slot *free_list;
    /* Under lock. */
    struct thr_slot *work_head, *work_tail;
    struct thr_slot *done_head, *done_tail;
    bool stop;
    pthread_t workers[THR_MAX_WORKERS];
    unsigned nworkers;
    int efd;
};

static void thr_list_append(struct thr_slot **head, struct thr_slot **tail,
                            struct thr_slot *slot)
{
    slot->next = NULL;
    if (*tail) {
        (*tail)->next = slot;
    } else {
        *head = slot;
    }
    *tail = slot;
}

static int thr_run(struct vimg_aio_req *req)
{
    switch (req->op) {
    case VIMG_AIO_READ:
    case VIMG_AIO_WRITE:
        return vimg_aio_sync_rw(req);
    case VIMG_AIO_ZERO:
        return vimg_aio_sync_zero(req->fd, req->off, req->len);
    case VIMG_AIO_FSYNC:
        return vimg_aio_sync_flush(req->fd);
    }
    return -EINVAL;
}

static void thr_signal_efd(int efd)
{
    uint64_t one = 1;

    /* EAGAIN means the counter is saturated, i.e. already readable. */
    while (write(efd, &one, sizeof(one)) < 0 && errno == EINTR) {
        continue;
    }
}

static void *thr_worker(void *opaque)
{
    struct thr_state *st = opaque;

    pthread_mutex_lock(&st->lock);
    for (;;) {
        struct thr_slot *slot;
        bool was_empty;

        while (!st->stop && !st->work_head) {
            pthread_cond_wait(&st->work_cond, &st->lock);
        }
        /* Stop drops queued work: vimg_aio_free promises no callbacks. */
        if (st->stop) {
            break;
        }
        slot = st->work_head;
        st->work_head = slot->next;
        if (!st->work_head) {
            st->work_tail = NULL;
        }
        pthread_mutex_unlock(&st->lock);

        slot->ret = thr_run(slot->req);

        pthread_mutex_lock(&st->lock);
        was_empty = !st->done_head;
        thr_list_append(&st->done_head, &st->done_tail, slot);
        pthread_cond_signal(&st->done_cond);
        /* Only the empty -> non-empty edge needs a wakeup: reap drains the
         * eventfd before it empties the list, so a non-empty list always
         * has the eventfd readable. */
        if (was_empty) {
            thr_signal_efd(st->efd);
        }
    }
    pthread_mutex_unlock(&st->lock);
    return NULL;
}

static void thr_stop_workers(struct thr_state *st)
{
    unsigned i;

    pthread_mutex_lock(&st->lock);
    st->stop = true;
    pthread_cond_broadcast(&st->work_cond);
    pthread_mutex_unlock(&st->lock);
    for (i = 0; i < st->nworkers; i++) {
        pthread_join(st->workers[i], NULL);
    }
    st->nworkers = 0;
}

static void thr_destroy(struct thr_state *st)
{
    pthread_cond_destroy(&st->done_cond);
    pthread_cond_destroy(&st->work_cond);
    pthread_mutex_destroy(&st->lock);
    if (st->efd >= 0) {
        close(st->efd);
    }
    free(st->slots);
    free(st);
}

static int thr_init(struct vimg_aio *aio)
{
    struct thr_state *st;
    unsigned n = VIMG_MAX(VIMG_MIN(aio->depth, THR_MAX_WORKERS), THR_MIN_WORKERS);
    sigset_t all, old;
    unsigned i;
    int ret = 0;

    st = calloc(1, sizeof(*st));
    if (!st) {
        return -ENOMEM;
    }
    st->efd = -1;
    pthread_mutex_init(&st->lock, NULL);
    pthread_cond_init(&st->work_cond, NULL);
    pthread_cond_init(&st->done_cond, NULL);

    st->slots = calloc(aio->depth, sizeof(*st->slots));
    if (!st->slots) {
        thr_destroy(st);
        return -ENOMEM;
    }
    for (i = aio->depth; i > 0; i--) {
        st->slots[i - 1].next = st->free_list;
        st->free_list = &st->slots[i - 1];
    }

    st->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (st->efd < 0) {
        ret = -errno;
        thr_destroy(st);
        return ret;
    }

    /* Workers inherit this mask: signals meant for the program must reach
     * its own threads, not interrupt a worker's syscall. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (i = 0; i < n; i++) {
        ret = -pthread_create(&st->workers[i], NULL, thr_worker, st);
        if (ret < 0) {
            break;
        }
        st->nworkers++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (ret < 0) {
        thr_stop_workers(st);
        thr_destroy(st);
        return ret;
    }

    aio->priv = st;
    return 0;
}

static void thr_cleanup(struct vimg_aio *aio)
{
    struct thr_state *st = aio->priv;

    thr_stop_workers(st);
    thr_destroy(st);
    aio->priv = NULL;
}

static int thr_submit(struct vimg_aio *aio, struct vimg_aio_req *req)
{
    struct thr_state *st = aio->priv;
    struct thr_slot *slot = st->free_list;

    if (!slot) {
        return -EAGAIN;
    }
    st->free_list = slot->next;
    slot->req = req;
    slot->ret = 0;

    /* Workers start at once; waiting for reap would only add latency. */
    pthread_mutex_lock(&st->lock);
    thr_list_append(&st->work_head, &st->work_tail, slot);
    pthread_cond_signal(&st->work_cond);
    pthread_mutex_unlock(&st->lock);
    return 0;
}

static void thr_drain_efd(int efd)
{
    uint64_t val;

    while (read(efd, &val, sizeof(val)) < 0 && errno == EINTR) {
        continue;
    }
}

static int thr_reap(struct vimg_aio *aio, unsigned min_complete)
{
    struct thr_state *st = aio->priv;
    unsigned count = 0;

    thr_drain_efd(st->efd);
    pthread_mutex_lock(&st->lock);
    for (;;) {
        struct thr_slot *slot = st->done_head;

        if (!slot) {
            if (count >= min_complete) {
                break;
            }
            pthread_cond_wait(&st->done_cond, &st->lock);
            continue;
        }
        st->done_head = NULL;
        st->done_tail = NULL;
        pthread_mutex_unlock(&st->lock);

        /* Callbacks run unlocked: they may submit. */
        while (slot) {
            struct thr_slot *next = slot->next;
            struct vimg_aio_req *req = slot->req;
            int ret = slot->ret;

            slot->req = NULL;
            slot->next = st->free_list;
            st->free_list = slot;
            vimg_aio_complete(aio, req, ret);
            count++;
            slot = next;
        }

        pthread_mutex_lock(&st->lock);
        /* Later completions wait for the next reap (the eventfd says so):
         * callbacks that keep submitting must not keep us here forever. */
        if (count >= min_complete) {
            break;
        }
    }
    pthread_mutex_unlock(&st->lock);
    return (int)count;
}

static int thr_poll_fd(const struct vimg_aio *aio)
{
    const struct thr_state *st = aio->priv;

    return st->efd;
}

const struct vimg_aio_ops vimg_aio_threads_ops = {
    .name = "threads",
    .init = thr_init,
    .cleanup = thr_cleanup,
    .submit = thr_submit,
    .reap = thr_reap,
    .poll_fd = thr_poll_fd,
};

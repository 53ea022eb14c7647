#include "config.h"

#include <inttypes.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/copy.h"
#include "core/image.h"
#include "io/aio.h"
#include "io/file.h"
#include "io/fmap.h"
#include "util/util.h"

#define SECTOR 512
#define DEFAULT_BUF (2 * 1024 * 1024)

/* One homogeneous run: all zero or all data, with its end moved to an
 * alignment boundary the way qemu does to avoid read-modify-write. */
static int split_once(const uint8_t *buf, int n, int *pnum, int64_t sector, int alignment)
{
    bool zero;
    int i, tail;

    if (n <= 0) {
        *pnum = 0;
        return 0;
    }
    zero = vimg_is_zero(buf, SECTOR);
    for (i = 1; i < n; i++) {
        if (zero != vimg_is_zero(buf + (size_t)i * SECTOR, SECTOR)) {
            break;
        }
    }
    if (i == n) {
        *pnum = i;
        return !zero;
    }
    tail = (int)((sector + i) & (alignment - 1));
    if (tail) {
        if (zero && i <= tail) {
            /* data follows inside this block anyway: write it as data */
            zero = false;
        }
        if (!zero) {
            i = VIMG_MIN(i + alignment - tail, n);
        } else {
            i -= tail;
        }
    }
    *pnum = i;
    return !zero;
}

int vimg_internal_zero_split(const uint8_t *buf, int n, int *pnum, int min,
                             int64_t sector, int alignment)
{
    int used, checked, ret;

    if (n < min) {
        min = n;
    }
    ret = split_once(buf, n, pnum, sector, alignment);
    if (!ret) {
        return 0;
    }
    used = checked = *pnum;
    buf += (size_t)*pnum * SECTOR;
    n -= *pnum;
    sector += *pnum;
    /* Inside data, absorb short zero runs so writes stay large. */
    while (n > 0) {
        ret = split_once(buf, n, pnum, sector, alignment);
        buf += (size_t)*pnum * SECTOR;
        n -= *pnum;
        sector += *pnum;
        checked += *pnum;
        if (ret) {
            used = checked;
        } else if (*pnum >= min) {
            break;
        }
    }
    *pnum = used;
    return 1;
}

/* ---- the engine ------------------------------------------------------------
 *
 * One thread runs a loop over a ring of work items in guest order.  The
 * walker turns block-status runs into items: zero runs, runs left to the
 * target's backing file, and data chunks of at most buf_size (cut from the
 * start of each run, as qemu cuts them, so the zero split and the progress
 * steps come out the same).  Data that lies plainly in a host file is read
 * from it asynchronously as soon as a buffer is free; everything else
 * (compressed clusters, drivers with their own read, files that are not
 * posix files) is read through the image when its item reaches the head.
 * Items are finished strictly in order at the head of the ring: that keeps
 * qemu's progress text and lets append-mode writers hand out host space in
 * guest order, while reads and writes of later items stay in flight.
 */

/* Measured (docs/performance.md): a few 2 MiB requests in flight keep the
 * buffers hot in the CPU caches; 16 was slower on every raw workload. */
#define DEFAULT_DEPTH 4
#define MAX_DEPTH 256
#define WREQ_PER_SLOT 4
#define DIRECT_ALIGN 4096
#define NDIRECT 8

enum item_kind {
    ITEM_READ_AIO,      /* plain data at a host offset: async read */
    ITEM_READ_SYNC,     /* read through the image at the head */
    ITEM_READ_WORKER,   /* compressed: a reader thread decompresses it */
    ITEM_COPY_RANGE,    /* in-kernel copy to the raw target */
    ITEM_ZERO_DATA,     /* reads as zeros, handled as data (-S 0, no backing) */
    ITEM_ZERO,          /* zero run: write zeroes unless the target is zero */
    ITEM_SKIP,          /* left to the target's backing file */
};

enum dst_mode {
    DST_SYNC,           /* through the driver (vimg_pwrite) */
    DST_RAW_AIO,        /* the host file is the disk: async writes to it */
    DST_ALLOC,          /* append-mode writer: alloc_data + async writes */
};

struct copy_job;

struct slot {
    uint8_t *buf;
    unsigned refs;              /* the item's reference + writes in flight */
    struct vimg_aio_req req;    /* the read */
    struct copy_job *job;
    struct item *item;
};

struct item {
    enum item_kind kind;
    struct vimg_image *src;
    uint64_t src_off, dst_off, len;
    struct vimg_file *host;
    uint64_t host_off;
    struct slot *slot;
    bool read_done;
    int read_ret;
    bool counts;                /* moves the progress */
    int src_idx;
    struct vimg_error rerr;     /* a reader thread's failure */
};

struct wreq {
    struct vimg_aio_req req;
    struct slot *slot;
    struct copy_job *job;
    struct wreq *next_free;
};

struct direct_fd {
    struct vimg_file *file;
    int fd;
    bool write;
};

struct copy_job {
    const struct vimg_copy_opts *o;
    struct vimg_image *const *srcs;
    int nsrc;
    struct vimg_image *dst;
    enum dst_mode mode;
    struct vimg_error *err;
    int ret;                    /* first failure (sticky) */
    uint64_t zero_off, zero_len; /* a zero run held back to join the next */
    int cw_idx;                 /* the compressed walk's last status run */
    uint64_t cw_off, cw_end;
    unsigned cw_flags;
    struct vimg_file *cw_host;  /* its plain data's host file, or NULL */
    uint64_t cw_host_off;
    const struct vimg_fmap *res_map;  /* a range of it known to be cached */
    uint64_t res_off, res_end;

    uint64_t buf_size;
    unsigned depth;
    struct vimg_aio *aio;
    struct slot *slots;
    struct slot **free_slots;
    unsigned nfree_slots;
    struct wreq *wreqs;
    struct wreq *free_wreqs;
    uint8_t *zero_buf;          /* buf_size zeros, for -S 0 */

    struct item *ring;
    unsigned ring_cap, ring_head, ring_count;

    /* walker */
    int w_idx;
    uint64_t w_off, w_run_start, w_run_end, w_dst_base, w_host_off;
    unsigned w_flags;
    struct vimg_file *w_host;
    bool w_done;
    bool have_next;
    struct item next;

    bool use_copy_range;
    bool early_writeback;
    unsigned nreaders;          /* reader threads for compressed data */
    struct rpool *readers;
    struct direct_fd direct[NDIRECT];
    unsigned ndirect;
    struct vimg_fmap maps[NDIRECT];   /* source host files mapped for reading */
    unsigned nmaps;
    bool no_map;

    uint64_t allocated_total, allocated_done;
};

static const char *copy_backend_used = "sync";

const char *vimg_internal_copy_backend(void)
{
    return copy_backend_used;
}

static int job_fail(struct copy_job *j, int ret)
{
    if (j->ret >= 0) {
        j->ret = ret;
    }
    return ret;
}

static int job_io_error(struct copy_job *j, int ret, const char *what, uint64_t off)
{
    vimg_error_set(j->err, -ret, "error while %s at byte %" PRIu64 ": %s", what, off,
                   strerror(-ret));
    return job_fail(j, ret);
}

static void job_progress(struct copy_job *j, uint64_t n)
{
    j->allocated_done += n;
    if (j->o->progress_bytes) {
        j->o->progress_bytes(j->o->progress_opaque, j->allocated_done, j->allocated_total);
    }
    if (j->o->progress) {
        j->o->progress(j->o->progress_opaque,
                       (float)(100.0 * (double)j->allocated_done /
                               (double)j->allocated_total));
    }
}

/* Status of one source at off, by the chain (or its top layer with -B),
 * as VIMG_STATUS_* flags plus the host file of plainly stored data. */
static int job_status(struct copy_job *j, struct vimg_image *src, uint64_t off,
                      uint64_t max, unsigned *flags, uint64_t *len,
                      struct vimg_file **host, uint64_t *host_off)
{
    int ret;

    *host = NULL;
    *host_off = 0;
    if (j->o->top_only) {
        struct vimg_run run;
        ret = vimg_internal_layer_status(src, off, max, &run, j->err);
        if (ret < 0) {
            return job_fail(j, ret);
        }
        *flags = 0;
        if (run.flags & (VIMG_RUN_ALLOCATED | VIMG_RUN_ZERO)) {
            *flags |= VIMG_STATUS_ALLOCATED;
        }
        if (run.flags & VIMG_RUN_DATA) {
            *flags |= VIMG_STATUS_DATA;
        }
        if (run.flags & VIMG_RUN_ZERO) {
            *flags |= VIMG_STATUS_ZERO;
        }
        if (run.flags & VIMG_RUN_COMPRESSED) {
            *flags |= VIMG_STATUS_COMPRESSED;
        }
        if ((run.flags & VIMG_RUN_HOST_VALID) && run.host) {
            *flags |= VIMG_STATUS_HOST_VALID;
            *host = run.host;
            *host_off = run.host_off;
        }
        *len = run.length;
        return 0;
    }
    struct vimg_status st;
    ret = vimg_internal_block_status_host(src, off, max, &st, host, j->err);
    if (ret < 0) {
        return job_fail(j, ret);
    }
    *flags = st.flags;
    *len = st.length;
    if (*host) {
        *host_off = st.host_offset;
    }
    return 0;
}

/* Whether a run of these flags counts in qemu's progress denominator. */
static bool job_counts(struct copy_job *j, unsigned flags)
{
    if (j->o->top_only && !(flags & VIMG_STATUS_ALLOCATED)) {
        return false;
    }
    return !(flags & VIMG_STATUS_ZERO) || 0 == j->o->sparse_size;
}

static bool item_needs_slot(const struct item *it)
{
    return ITEM_READ_AIO == it->kind || ITEM_READ_SYNC == it->kind ||
           ITEM_READ_WORKER == it->kind || ITEM_COPY_RANGE == it->kind;
}

/* The next item in guest order; false when the sources are done. */
static int walk_next(struct copy_job *j, struct item *it, bool *have)
{
    *have = false;
    while (!j->w_done) {
        if (j->w_idx >= j->nsrc) {
            j->w_done = true;
            break;
        }
        struct vimg_image *src = j->srcs[j->w_idx];
        uint64_t size = vimg_size(src);
        if (j->w_off >= size) {
            j->w_dst_base += size;
            j->w_idx++;
            j->w_off = j->w_run_end = 0;
            continue;
        }
        if (j->w_off >= j->w_run_end) {
            uint64_t len;
            int ret = job_status(j, src, j->w_off, size - j->w_off, &j->w_flags, &len,
                                 &j->w_host, &j->w_host_off);
            if (ret < 0) {
                return ret;
            }
            j->w_run_start = j->w_off;
            j->w_run_end = j->w_off + len;
        }
        unsigned f = j->w_flags;
        uint64_t rem = j->w_run_end - j->w_off;
        memset(it, 0, sizeof(*it));
        it->src = src;
        it->src_off = j->w_off;
        it->dst_off = j->w_dst_base + j->w_off;
        it->counts = job_counts(j, f);
        if ((f & VIMG_STATUS_ZERO) && j->o->sparse_size) {
            it->kind = ITEM_ZERO;
            it->len = rem;
        } else if (j->o->top_only && !(f & VIMG_STATUS_ALLOCATED)) {
            it->kind = ITEM_SKIP;
            it->len = rem;
        } else {
            it->len = VIMG_MIN(rem, j->buf_size);
            if ((f & VIMG_STATUS_ZERO) || !(f & (VIMG_STATUS_DATA | VIMG_STATUS_ALLOCATED))) {
                it->kind = ITEM_ZERO_DATA;
            } else if ((f & VIMG_STATUS_DATA) && (f & VIMG_STATUS_HOST_VALID) &&
                       !(f & VIMG_STATUS_COMPRESSED) && j->w_host) {
                it->host = j->w_host;
                it->host_off = j->w_host_off + (j->w_off - j->w_run_start);
                if (j->use_copy_range) {
                    it->kind = ITEM_COPY_RANGE;
                } else if (j->w_host->fd >= 0) {
                    it->kind = ITEM_READ_AIO;
                } else {
                    it->kind = ITEM_READ_SYNC;
                }
            } else if ((f & VIMG_STATUS_COMPRESSED) && j->nreaders > 1 &&
                       src->file->fd >= 0) {
                it->kind = ITEM_READ_WORKER;
                it->src_idx = j->w_idx;
            } else {
                it->kind = ITEM_READ_SYNC;
            }
        }
        j->w_off += it->len;
        *have = true;
        return 0;
    }
    return 0;
}

/* An O_DIRECT descriptor of f for -t none / -T none, or -1. */
static int job_direct_fd(struct copy_job *j, struct vimg_file *f, bool write)
{
    for (unsigned i = 0; i < j->ndirect; i++) {
        if (j->direct[i].file == f && j->direct[i].write == write) {
            return j->direct[i].fd;
        }
    }
    if (j->ndirect == NDIRECT || f->fd < 0) {
        return -1;
    }
    int fd = open(f->name, (write ? O_WRONLY : O_RDONLY) | O_DIRECT | O_CLOEXEC);
    j->direct[j->ndirect++] = (struct direct_fd){ f, fd, write };
    return fd;
}

static int job_pick_fd(struct copy_job *j, struct vimg_file *f, bool write, uint64_t off,
                       uint64_t len, const void *buf)
{
    bool want = write ? j->o->dst_direct : j->o->src_direct;
    if (want && 0 == off % DIRECT_ALIGN && 0 == len % DIRECT_ALIGN &&
        0 == (uintptr_t)buf % DIRECT_ALIGN) {
        int fd = job_direct_fd(j, f, write);
        if (fd >= 0) {
            return fd;
        }
    }
    return f->fd;
}

static void slot_put(struct copy_job *j, struct slot *s)
{
    if (0 == --s->refs) {
        s->item = NULL;
        j->free_slots[j->nfree_slots++] = s;
    }
}

static void wreq_done(struct vimg_aio_req *req, int result)
{
    struct wreq *w = req->opaque;
    struct copy_job *j = w->job;

    if (result < 0) {
        job_io_error(j, result, VIMG_AIO_ZERO == req->op ? "writing zeroes" : "writing",
                     req->off);
    } else if (j->early_writeback && VIMG_AIO_WRITE == req->op) {
        /* Start writing back what is done, so the flush at the end does not
         * wait for the whole image: the copy and the disk overlap.  Only a
         * hint: failures show up in the flush. */
        sync_file_range(req->fd, (off64_t)req->off, (off64_t)req->len,
                        SYNC_FILE_RANGE_WRITE);
    }
    if (w->slot) {
        slot_put(j, w->slot);
    }
    w->slot = NULL;
    w->next_free = j->free_wreqs;
    j->free_wreqs = w;
}

static int job_reap(struct copy_job *j, unsigned min)
{
    int ret = vimg_aio_reap(j->aio, min);
    if (ret < 0 && -EBUSY != ret) {
        vimg_error_set(j->err, -ret, "asynchronous I/O failed: %s", strerror(-ret));
        return job_fail(j, ret);
    }
    return 0;
}

static int job_submit(struct copy_job *j, struct vimg_aio_req *req)
{
    for (;;) {
        int ret = vimg_aio_submit(j->aio, req);
        if (-EAGAIN != ret) {
            if (ret < 0) {
                vimg_error_set(j->err, -ret, "could not submit I/O: %s", strerror(-ret));
                return job_fail(j, ret);
            }
            return 0;
        }
        ret = job_reap(j, 1);
        if (ret < 0) {
            return ret;
        }
    }
}

/* Queue a write or zero on a host fd; the slot stays alive until it is done. */
static int job_host_write(struct copy_job *j, enum vimg_aio_op op, int fd, const void *buf,
                          uint64_t len, uint64_t host_off, struct slot *s)
{
    while (!j->free_wreqs) {
        int ret = job_reap(j, 1);
        if (ret < 0) {
            return ret;
        }
    }
    struct wreq *w = j->free_wreqs;
    j->free_wreqs = w->next_free;
    memset(&w->req, 0, sizeof(w->req));
    w->req.op = op;
    w->req.fd = fd;
    w->req.buf = (void *)buf;
    w->req.len = (size_t)len;
    w->req.off = host_off;
    w->req.cb = wreq_done;
    w->req.opaque = w;
    w->job = j;
    w->slot = s;
    if (s) {
        s->refs++;
    }
    int ret = job_submit(j, &w->req);
    if (ret < 0) {
        if (s) {
            s->refs--;
        }
        w->slot = NULL;
        w->next_free = j->free_wreqs;
        j->free_wreqs = w;
    }
    return ret;
}

static int job_zero_flush(struct copy_job *j);

static int job_write(struct copy_job *j, const uint8_t *buf, uint64_t len, uint64_t off,
                     struct slot *s)
{
    struct vimg_image *dst = j->dst;
    int ret;

    if (j->zero_len && (ret = job_zero_flush(j)) < 0) {
        return ret;
    }

    switch (j->mode) {
    case DST_RAW_AIO:
        return job_host_write(j, VIMG_AIO_WRITE,
                              job_pick_fd(j, dst->file, true, off, len, buf),
                              buf, len, off, s);
    case DST_ALLOC:
        while (len) {
            struct vimg_run run = { 0 };
            ret = dst->drv->alloc_data(dst, off, len, &run, j->err);
            if (-ENOTSUP == ret) {
                /* the driver cannot place data for this image (a backing
                 * file, preallocated metadata ...): plain writes from here */
                vimg_error_clear(j->err);
                j->mode = DST_SYNC;
                return job_write(j, buf, len, off, s);
            }
            if (ret < 0) {
                return job_fail(j, ret);
            }
            if (0 == run.length || run.length > len || !run.host) {
                vimg_error_set(j->err, EIO, "'%s': driver returned a bad host run for "
                               "offset %" PRIu64, dst->filename, off);
                return job_fail(j, -EIO);
            }
            if (run.host->fd >= 0) {
                ret = job_host_write(j, VIMG_AIO_WRITE,
                                     job_pick_fd(j, run.host, true, run.host_off,
                                                 run.length, buf),
                                     buf, run.length, run.host_off, s);
            } else {
                ret = vimg_file_pwrite(run.host, buf, (size_t)run.length, run.host_off);
                if (ret < 0) {
                    job_io_error(j, ret, "writing", off);
                }
            }
            if (ret < 0) {
                return ret;
            }
            buf += run.length;
            off += run.length;
            len -= run.length;
        }
        return 0;
    case DST_SYNC:
    default:
        ret = vimg_pwrite(dst, buf, (size_t)len, off, j->err);
        return ret < 0 ? job_fail(j, ret) : 0;
    }
}

/* Issue the zero run held back by job_zero. */
static int job_zero_flush(struct copy_job *j)
{
    uint64_t off = j->zero_off, len = j->zero_len;
    int ret;

    if (!len) {
        return 0;
    }
    j->zero_len = 0;
    ret = vimg_write_zeroes(j->dst, off, len, VIMG_ZERO_MAY_UNMAP, j->err);
    return ret < 0 ? job_fail(j, ret) : 0;
}

static int job_zero(struct copy_job *j, uint64_t off, uint64_t len)
{
    int ret;

    if (j->o->target_has_zero_init) {
        return 0;
    }
    if (DST_RAW_AIO == j->mode) {
        return job_host_write(j, VIMG_AIO_ZERO, j->dst->file->fd, NULL, len, off, NULL);
    }
    /* Adjacent zero runs (a zeroed data extent, then a hole) go out as
     * one request, as qemu-img sends them: a driver can then turn whole
     * clusters into zero clusters instead of copying a partly zeroed
     * cluster up from the backing file. */
    if (j->zero_len && j->zero_off + j->zero_len == off) {
        j->zero_len += len;
        return 0;
    }
    ret = job_zero_flush(j);
    j->zero_off = off;
    j->zero_len = len;
    return ret;
}

/* Write a chunk of data, split at the -S granularity. */
static int job_write_data(struct copy_job *j, const uint8_t *buf, uint64_t len,
                          uint64_t dst_off, struct slot *s)
{
    if (0 == j->o->sparse_size) {
        return job_write(j, buf, len, dst_off, s);
    }
    int min = (int)(j->o->sparse_size / SECTOR);
    int alignment = 1;
    while (alignment * 2 <= min) {
        alignment *= 2;
    }
    uint64_t done = 0;
    while (done < len) {
        uint64_t rem = len - done;
        int n = (int)vimg_div_round_up(rem, SECTOR);
        int pnum, ret;
        int is_data = vimg_internal_zero_split(buf + done, n, &pnum, min,
                                               (int64_t)((dst_off + done) / SECTOR),
                                               alignment);
        uint64_t bytes = VIMG_MIN((uint64_t)pnum * SECTOR, rem);
        if (is_data) {
            ret = job_write(j, buf + done, bytes, dst_off + done, s);
        } else {
            ret = job_zero(j, dst_off + done, bytes);
        }
        if (ret < 0) {
            return ret;
        }
        done += bytes;
    }
    return 0;
}

static void read_done(struct vimg_aio_req *req, int result)
{
    struct slot *s = req->opaque;
    s->item->read_done = true;
    s->item->read_ret = result;
}

/*
 * Reader threads for compressed data (the decompression workers).  Each
 * thread opens its own instance of the sources by name, so drivers need no
 * locking: nothing of one image instance is shared between threads.  The
 * main thread still finishes items in order; it only waits for a reader
 * when the head item is one of theirs.
 */
struct rpool {
    struct copy_job *job;
    pthread_mutex_t lock;
    pthread_cond_t work, done;
    pthread_t threads[16];
    unsigned nthreads;
    struct item **queue;
    unsigned qcap, qhead, qcount;
    bool stop;
};

static void *rpool_worker(void *opaque)
{
    struct rpool *p = opaque;
    struct copy_job *j = p->job;
    struct vimg_image **inst = calloc((size_t)j->nsrc, sizeof(*inst));

    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (!p->stop && !p->qcount) {
            pthread_cond_wait(&p->work, &p->lock);
        }
        if (p->stop) {
            break;
        }
        struct item *it = p->queue[p->qhead];
        p->qhead = (p->qhead + 1) % p->qcap;
        p->qcount--;
        pthread_mutex_unlock(&p->lock);

        struct vimg_image *src = j->srcs[it->src_idx];
        int ret = 0;
        if (!inst) {
            vimg_error_set(&it->rerr, ENOMEM, "out of memory");
            ret = -ENOMEM;
        } else if (!inst[it->src_idx]) {
            unsigned flags = (src->flags & (VIMG_OPEN_ALLOW_OUTSIDE | VIMG_OPEN_NO_BACKING)) |
                             VIMG_OPEN_FORCE_SHARE;
            ret = vimg_open(&inst[it->src_idx], src->filename, src->drv->name, flags, NULL,
                            &it->rerr);
            if (0 == ret && (src->tmp_snapshot_id || src->tmp_snapshot_name)) {
                /* convert -l: this instance shows the same snapshot */
                ret = vimg_internal_snapshot_load_tmp(inst[it->src_idx], src->tmp_snapshot_id,
                                                      src->tmp_snapshot_name, &it->rerr);
            }
            if (0 == ret && vimg_size(inst[it->src_idx]) != vimg_size(src)) {
                vimg_error_set(&it->rerr, EIO, "'%s' changed during the copy", src->filename);
                ret = -EIO;
            }
        }
        if (0 == ret) {
            ret = vimg_pread(inst[it->src_idx], it->slot->buf, (size_t)it->len, it->src_off,
                             &it->rerr);
        }
        pthread_mutex_lock(&p->lock);
        it->read_ret = ret;
        it->read_done = true;
        pthread_cond_broadcast(&p->done);
    }
    pthread_mutex_unlock(&p->lock);
    for (int i = 0; inst && i < j->nsrc; i++) {
        vimg_close(inst[i]);
    }
    free(inst);
    return NULL;
}

static int rpool_start(struct copy_job *j)
{
    struct rpool *p = calloc(1, sizeof(*p));
    if (!p) {
        return -ENOMEM;
    }
    p->job = j;
    p->qcap = j->ring_cap;
    p->queue = calloc(p->qcap, sizeof(*p->queue));
    if (!p->queue) {
        free(p);
        return -ENOMEM;
    }
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->done, NULL);
    for (unsigned i = 0; i < VIMG_MIN(j->nreaders, 16u); i++) {
        if (pthread_create(&p->threads[p->nthreads], NULL, rpool_worker, p)) {
            break;
        }
        p->nthreads++;
    }
    j->readers = p;
    return 0;
}

static void rpool_stop(struct copy_job *j)
{
    struct rpool *p = j->readers;
    if (!p) {
        return;
    }
    pthread_mutex_lock(&p->lock);
    p->stop = true;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->lock);
    for (unsigned i = 0; i < p->nthreads; i++) {
        pthread_join(p->threads[i], NULL);
    }
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->work);
    pthread_cond_destroy(&p->done);
    free(p->queue);
    free(p);
    j->readers = NULL;
}

static int rpool_submit(struct copy_job *j, struct item *it)
{
    if (!j->readers) {
        int ret = rpool_start(j);
        if (ret < 0 || !j->readers->nthreads) {
            /* no threads: read it at the head */
            it->kind = ITEM_READ_SYNC;
            return 0;
        }
    }
    struct rpool *p = j->readers;
    pthread_mutex_lock(&p->lock);
    p->queue[(p->qhead + p->qcount) % p->qcap] = it;
    p->qcount++;
    pthread_cond_signal(&p->work);
    pthread_mutex_unlock(&p->lock);
    return 0;
}

static bool rpool_item_done(struct copy_job *j, struct item *it, bool wait)
{
    struct rpool *p = j->readers;
    bool done;
    pthread_mutex_lock(&p->lock);
    while (wait && !it->read_done) {
        pthread_cond_wait(&p->done, &p->lock);
    }
    done = it->read_done;
    pthread_mutex_unlock(&p->lock);
    return done;
}

/*
 * Compressed output: a cluster that lies plainly in the page cache is not
 * read into the ring; the workers compress it straight from a read-only
 * mapping of the host file (one copy fewer per byte: 15 % less wall time
 * on the bench's zstd row).  Not for plain copies: there the mapping's
 * page faults and page-table updates, in the one thread that checks for
 * zeros, cost as much as the copy they save (measured on raw -> qcow2,
 * qcow2 -> raw and a qcow2 chain), while reads spread over the I/O threads.
 */
static struct vimg_fmap *job_map_range(struct copy_job *j, struct vimg_file *host,
                                       uint64_t off, uint64_t len)
{
    struct vimg_fmap *m = NULL;

    if (j->no_map || j->o->src_direct || !host) {
        return NULL;
    }
    for (unsigned i = 0; i < j->nmaps; i++) {
        if (j->maps[i].file == host) {
            m = &j->maps[i];
            break;
        }
    }
    if (!m) {
        if (j->nmaps == NDIRECT) {
            return NULL;
        }
        m = &j->maps[j->nmaps];
        if (vimg_fmap_open(m, host) < 0) {
            /* -EBUSY: the program handles SIGBUS itself; stop trying */
            j->no_map = j->no_map || 0 == j->nmaps;
            return NULL;
        }
        j->nmaps++;
    }
    if (m == j->res_map && off >= j->res_off && off + len <= j->res_end) {
        return m;
    }
    /* one mincore for the next 2 MiB, so cluster-sized requests (the
     * compressed walk) do not each ask */
    uint64_t ahead = VIMG_MIN(VIMG_MAX(len, (uint64_t)DEFAULT_BUF), m->len - VIMG_MIN(off, m->len));
    if (ahead > len && vimg_fmap_resident(m, off, ahead)) {
        j->res_map = m;
        j->res_off = off;
        j->res_end = off + ahead;
        return m;
    }
    return vimg_fmap_resident(m, off, len) ? m : NULL;
}

/* Start an item: take its buffer and queue its read. */
static int job_start(struct copy_job *j, struct item *it)
{
    if (!item_needs_slot(it)) {
        return 0;
    }
    struct slot *s = j->free_slots[--j->nfree_slots];
    s->refs = 1;
    s->item = it;
    it->slot = s;
    if (ITEM_READ_WORKER == it->kind) {
        return rpool_submit(j, it);
    }
    if (ITEM_READ_AIO != it->kind) {
        return 0;
    }
    memset(&s->req, 0, sizeof(s->req));
    s->req.op = VIMG_AIO_READ;
    s->req.fd = job_pick_fd(j, it->host, false, it->host_off, it->len, s->buf);
    s->req.buf = s->buf;
    s->req.len = (size_t)it->len;
    s->req.off = it->host_off;
    s->req.cb = read_done;
    s->req.opaque = s;
    return job_submit(j, &s->req);
}

static int job_fill(struct copy_job *j)
{
    while (j->ring_count < j->ring_cap && j->ret >= 0) {
        if (!j->have_next) {
            int ret = walk_next(j, &j->next, &j->have_next);
            if (ret < 0) {
                return ret;
            }
            if (!j->have_next) {
                break;
            }
        }
        if (item_needs_slot(&j->next) && 0 == j->nfree_slots) {
            break;
        }
        struct item *it = &j->ring[(j->ring_head + j->ring_count) % j->ring_cap];
        *it = j->next;
        j->have_next = false;
        j->ring_count++;
        int ret = job_start(j, it);
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

/* Finish the item at the head of the ring.  *busy: it waits for its read. */
static int job_finish_head(struct copy_job *j, bool *busy)
{
    struct item *it = &j->ring[j->ring_head];
    struct slot *s = it->slot;
    int ret = 0;

    *busy = false;
    switch (it->kind) {
    case ITEM_SKIP:
        break;
    case ITEM_ZERO:
        ret = job_zero(j, it->dst_off, it->len);
        break;
    case ITEM_ZERO_DATA:
        if (j->o->sparse_size) {
            ret = job_zero(j, it->dst_off, it->len);
        } else {
            ret = job_write(j, j->zero_buf, it->len, it->dst_off, NULL);
        }
        break;
    case ITEM_COPY_RANGE:
        ret = vimg_file_copy_range(it->host, it->host_off, j->dst->file, it->dst_off,
                                   it->len, true);
        if (0 == ret) {
            break;
        }
        if (-ENOTSUP != ret) {
            job_io_error(j, ret, "copying", it->src_off);
            break;
        }
        /* The kernel cannot: copy through the buffer from now on. */
        j->use_copy_range = false;
        ret = vimg_file_pread(it->host, s->buf, (size_t)it->len, it->host_off);
        if (ret < 0) {
            job_io_error(j, ret, "reading", it->src_off);
            break;
        }
        ret = job_write(j, s->buf, it->len, it->dst_off, s);
        break;
    case ITEM_READ_AIO:
        if (!it->read_done) {
            *busy = true;
            return 0;
        }
        if (it->read_ret < 0) {
            ret = job_io_error(j, it->read_ret, "reading", it->src_off);
            break;
        }
        ret = job_write_data(j, s->buf, it->len, it->dst_off, s);
        break;
    case ITEM_READ_WORKER:
        if (!rpool_item_done(j, it, false)) {
            *busy = true;
            return 0;
        }
        if (it->read_ret < 0) {
            vimg_error_set(j->err, it->rerr.code ? it->rerr.code : -it->read_ret,
                           "error while reading at byte %" PRIu64 ": %s", it->src_off,
                           it->rerr.code ? it->rerr.msg : strerror(-it->read_ret));
            ret = job_fail(j, it->read_ret);
            break;
        }
        ret = job_write_data(j, s->buf, it->len, it->dst_off, s);
        break;
    case ITEM_READ_SYNC:
        ret = vimg_pread(it->src, s->buf, (size_t)it->len, it->src_off, j->err);
        if (ret < 0) {
            vimg_error_prefix(j->err, "error while reading at byte %" PRIu64 ": ",
                              it->src_off);
            job_fail(j, ret);
            break;
        }
        ret = job_write_data(j, s->buf, it->len, it->dst_off, s);
        break;
    }
    if (s) {
        slot_put(j, s);
    }
    j->ring_head = (j->ring_head + 1) % j->ring_cap;
    j->ring_count--;
    if (ret >= 0 && j->ret >= 0 && it->counts) {
        job_progress(j, it->len);
    }
    return ret < 0 ? job_fail(j, ret) : 0;
}

static int job_prepass(struct copy_job *j)
{
    for (int i = 0; i < j->nsrc; i++) {
        uint64_t size = vimg_size(j->srcs[i]);
        for (uint64_t off = 0; off < size;) {
            unsigned flags;
            uint64_t len, host_off;
            struct vimg_file *host;
            int ret = job_status(j, j->srcs[i], off, size - off, &flags, &len, &host,
                                 &host_off);
            if (ret < 0) {
                return ret;
            }
            if (job_counts(j, flags)) {
                j->allocated_total += len;
            }
            off += len;
            if (j->o->cancel && *j->o->cancel) {
                return 0;
            }
        }
    }
    return 0;
}

static bool job_cancelled(struct copy_job *j)
{
    if (j->o->cancel && *j->o->cancel) {
        vimg_error_set(j->err, ECANCELED, "interrupted");
        job_fail(j, -ECANCELED);
        return true;
    }
    return false;
}

static int job_setup(struct copy_job *j)
{
    struct vimg_image *dst = j->dst;
    const struct vimg_copy_opts *o = j->o;
    int ret;

    j->buf_size = o->buf_size ? o->buf_size : DEFAULT_BUF;

    j->buf_size = VIMG_MAX(vimg_align_down(j->buf_size, DIRECT_ALIGN), DIRECT_ALIGN);
    j->depth = o->queue_depth ? VIMG_MIN(o->queue_depth, MAX_DEPTH) : DEFAULT_DEPTH;
    /* VIMG_COPY_DEPTH overrides the queue depth (for benchmarking) */
    const char *depth_env = getenv("VIMG_COPY_DEPTH");
    if (depth_env && atoi(depth_env) > 0) {
        j->depth = VIMG_MIN((unsigned)atoi(depth_env), MAX_DEPTH);
    }

    if (dst->drv->data_only && dst->file->fd >= 0) {
        j->mode = DST_RAW_AIO;
    } else if (o->fresh_target && dst->drv->alloc_data) {
        j->mode = DST_ALLOC;
    } else {
        j->mode = DST_SYNC;
    }
    if (!getenv("VIMG_COPY_NO_READERS")) {
        long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
        j->nreaders = o->threads ? o->threads : (ncpu > 0 ? (unsigned)VIMG_MIN(ncpu, 16) : 1);
    }
    /* VIMG_COPY_NO_MAP: read plain data into buffers even when it is
     * cached (for benchmarking) */
    j->no_map = NULL != getenv("VIMG_COPY_NO_MAP");
    vimg_fmap_clear();
    j->early_writeback = !o->no_flush && !o->dst_direct && !getenv("VIMG_COPY_NO_WRITEBACK");
    j->use_copy_range = DST_RAW_AIO == j->mode && !o->dst_direct && !o->src_direct &&
                        (o->copy_range || 0 == o->sparse_size);

    j->slots = calloc(j->depth, sizeof(*j->slots));
    j->free_slots = calloc(j->depth, sizeof(*j->free_slots));
    j->wreqs = calloc((size_t)j->depth * WREQ_PER_SLOT, sizeof(*j->wreqs));
    j->ring_cap = 2 * j->depth;
    j->ring = calloc(j->ring_cap, sizeof(*j->ring));
    if (!j->slots || !j->free_slots || !j->wreqs || !j->ring) {
        goto nomem;
    }
    for (unsigned i = 0; i < j->depth; i++) {
        void *p;
        if (posix_memalign(&p, DIRECT_ALIGN, (size_t)j->buf_size)) {
            goto nomem;
        }
        j->slots[i].buf = p;
        j->slots[i].job = j;
        j->free_slots[j->nfree_slots++] = &j->slots[i];
    }
    for (unsigned i = 0; i < j->depth * WREQ_PER_SLOT; i++) {
        j->wreqs[i].next_free = j->free_wreqs;
        j->free_wreqs = &j->wreqs[i];
    }
    if (0 == o->sparse_size) {
        void *p;
        if (posix_memalign(&p, DIRECT_ALIGN, (size_t)j->buf_size)) {
            goto nomem;
        }
        memset(p, 0, (size_t)j->buf_size);
        j->zero_buf = p;
    }

    unsigned aio_depth = j->depth * (1 + WREQ_PER_SLOT);
    /* Measured (docs/performance.md): with buffered files io_uring runs
     * most requests inline in this thread, so the copy uses one core; the
     * thread pool spreads the page-cache copies over all of them and was
     * faster on every buffered workload.  O_DIRECT goes to libaio.
     * VIMG_AIO=... still forces any backend. */
    ret = -ENOSYS;
    if (!getenv("VIMG_AIO")) {
        ret = vimg_aio_new(&j->aio, (o->src_direct || o->dst_direct) ? VIMG_AIO_LIBAIO
                                                                      : VIMG_AIO_THREADS,
                           aio_depth);
    }
    if (ret < 0) {
        ret = vimg_aio_new(&j->aio, VIMG_AIO_AUTO, aio_depth);
    }
    if (ret < 0) {
        vimg_error_set(j->err, -ret, "could not set up asynchronous I/O (VIMG_AIO=%s): %s",
                       getenv("VIMG_AIO") ? getenv("VIMG_AIO") : "", strerror(-ret));
        return job_fail(j, ret);
    }
    copy_backend_used = vimg_aio_backend_name(j->aio);
    return 0;
nomem:
    vimg_error_set(j->err, ENOMEM, "out of memory");
    return job_fail(j, -ENOMEM);
}

static void job_cleanup(struct copy_job *j)
{
    rpool_stop(j);
    if (j->aio) {
        while (vimg_aio_in_flight(j->aio)) {
            if (vimg_aio_reap(j->aio, vimg_aio_in_flight(j->aio)) < 0) {
                break;
            }
        }
        vimg_aio_free(j->aio);
    }
    for (unsigned i = 0; j->slots && i < j->depth; i++) {
        free(j->slots[i].buf);
    }
    for (unsigned i = 0; i < j->nmaps; i++) {
        vimg_fmap_close(&j->maps[i]);
    }
    for (unsigned i = 0; i < j->ndirect; i++) {
        if (j->direct[i].fd >= 0) {
            close(j->direct[i].fd);
        }
    }
    free(j->slots);
    free(j->free_slots);
    free(j->wreqs);
    free(j->ring);
    free(j->zero_buf);
}

/* ---- compressed output ------------------------------------------------------
 *
 * Every cluster that is not all zeros goes through the driver's
 * write_compressed, in guest order.  Chunks are cluster-aligned in the
 * target; a chunk may span the end of one source and the start of the next.
 */
static int job_read_concat(struct copy_job *j, uint8_t *buf, uint64_t len, uint64_t off)
{
    uint64_t base = 0;
    for (int i = 0; i < j->nsrc && len; i++) {
        uint64_t size = vimg_size(j->srcs[i]);
        if (off < base + size) {
            uint64_t n = VIMG_MIN(len, base + size - off);
            int ret = vimg_pread(j->srcs[i], buf, (size_t)n, off - base, j->err);
            if (ret < 0) {
                vimg_error_prefix(j->err, "error while reading at byte %" PRIu64 ": ", off);
                return job_fail(j, ret);
            }
            buf += n;
            off += n;
            len -= n;
        }
        base += size;
    }
    memset(buf, 0, (size_t)len);
    return 0;
}

/*
 * Parallel compression as a pipeline: the main thread reads clusters into a
 * ring of slots in guest order, worker threads (and the main thread when it
 * has nothing else to do) compress them through the driver's thread-safe
 * compress_cluster, and the main thread writes the results in guest order
 * through write_compressed_data as soon as the slot at the head is done.
 * Reading, compressing and writing overlap, so no core waits for a batch to
 * fill or drain.
 */
#define COMPRESS_RING_MAX (32 * 1024 * 1024)

enum cslot_state { CS_FREE, CS_READY, CS_BUSY, CS_DONE };

struct cslot {
    enum cslot_state state;
    long res;                   /* length, 0 all zero / nothing, -errno */
};

struct cpool {
    struct copy_job *job;
    pthread_mutex_t lock;
    pthread_cond_t work;        /* a slot became READY, or stop */
    pthread_cond_t done;        /* a slot became DONE */
    pthread_t *threads;
    unsigned nthreads;
    bool stop;
    uint8_t *in, *out;
    struct cslot *slots;
    uint64_t nslots;
    uint64_t cluster, out_stride;
    bool skip_zero;
    uint64_t taken;             /* sequence number of the next slot to compress */
    uint64_t filled;            /* sequence number of the next slot to fill */
    uint64_t *lens;             /* per slot: bytes to compress, 0 none */
    const uint8_t **inp;        /* per slot: its bytes, in `in` or a mapping */
    const struct vimg_fmap **inmap;  /* per slot: that mapping, or NULL */
};

/* Compress the slot of sequence number seq; called without the lock. */
static long cpool_compress(struct cpool *p, uint64_t seq)
{
    struct vimg_image *dst = p->job->dst;
    uint64_t i = seq % p->nslots;
    const uint8_t *in = p->inp[i];
    size_t clen = (size_t)p->lens[i];
    struct vimg_error e = { 0 };
    long r;

    if (!clen || (p->skip_zero && vimg_is_zero(in, clen))) {
        return 0;
    }
    r = dst->drv->compress_cluster(dst, p->out + i * p->out_stride, (size_t)p->out_stride,
                                   in, clen, &e);
    if (0 == r) {
        r = -EIO;
        vimg_error_set(&e, EIO, "'%s': compression produced nothing", dst->filename);
    }
    if (r < 0 && -ENOSPC != r) {
        pthread_mutex_lock(&p->lock);
        vimg_error_set(p->job->err, e.code ? e.code : (int)-r, "%s",
                       e.code ? e.msg : strerror((int)-r));
        pthread_mutex_unlock(&p->lock);
    }
    return r;
}

/* With the lock held: take the next READY slot, compress it, mark it DONE. */
static bool cpool_take_one(struct cpool *p)
{
    if (p->taken >= p->filled) {
        return false;
    }
    uint64_t seq = p->taken++;
    struct cslot *s = &p->slots[seq % p->nslots];
    s->state = CS_BUSY;
    pthread_mutex_unlock(&p->lock);
    long r = cpool_compress(p, seq);
    pthread_mutex_lock(&p->lock);
    s->res = r;
    s->state = CS_DONE;
    pthread_cond_broadcast(&p->done);
    return true;
}

static void *cpool_worker(void *opaque)
{
    struct cpool *p = opaque;
    pthread_mutex_lock(&p->lock);
    while (!p->stop) {
        if (!cpool_take_one(p)) {
            pthread_cond_wait(&p->work, &p->lock);
        }
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

/*
 * The walk for compressed output, as qemu cuts it: one cluster per request,
 * a run shorter than a cluster counts as a whole data cluster, a longer one
 * is cut down to whole clusters; zero runs stay zero.  Items are in target
 * offsets and a data cluster may span two sources.
 */
struct citem {
    enum item_kind kind;        /* ITEM_READ_SYNC (data), ITEM_ZERO, ITEM_SKIP */
    uint64_t off, len;
    bool counts;
    struct vimg_file *host;     /* data: plain in this file, or NULL */
    uint64_t host_off;
};

static void cwalk_advance(struct copy_job *j, uint64_t n)
{
    while (n && j->w_idx < j->nsrc) {
        uint64_t size = vimg_size(j->srcs[j->w_idx]);
        uint64_t step = VIMG_MIN(n, size - j->w_off);
        j->w_off += step;
        n -= step;
        if (j->w_off >= size) {
            j->w_dst_base += size;
            j->w_idx++;
            j->w_off = 0;
        }
    }
}

static int cwalk_next(struct copy_job *j, uint64_t total, uint64_t cluster,
                      struct citem *it, bool *have)
{
    *have = false;
    while (j->w_idx < j->nsrc && j->w_off >= vimg_size(j->srcs[j->w_idx])) {
        j->w_dst_base += vimg_size(j->srcs[j->w_idx]);
        j->w_idx++;
        j->w_off = 0;
    }
    if (j->w_idx >= j->nsrc) {
        return 0;
    }
    struct vimg_image *src = j->srcs[j->w_idx];
    uint64_t size = vimg_size(src), len, host_off;
    struct vimg_file *host;
    unsigned f;
    if (j->cw_end && j->cw_idx == j->w_idx && j->w_off >= j->cw_off && j->w_off < j->cw_end) {
        /* still inside the run the last query returned: a data run is
         * handed out a cluster at a time, one query for all of them */
        f = j->cw_flags;
        len = j->cw_end - j->w_off;
        host = j->cw_host;
        host_off = j->cw_host_off + (j->w_off - j->cw_off);
    } else {
        int ret = job_status(j, src, j->w_off, size - j->w_off, &f, &len, &host, &host_off);
        if (ret < 0) {
            return ret;
        }
        j->cw_idx = j->w_idx;
        j->cw_off = j->w_off;
        j->cw_end = j->w_off + len;
        j->cw_flags = f;
        j->cw_host = host;
        j->cw_host_off = host_off;
    }
    memset(it, 0, sizeof(*it));
    it->off = j->w_dst_base + j->w_off;
    if (len < cluster) {
        it->kind = ITEM_READ_SYNC;
        it->len = VIMG_MIN(cluster, total - it->off);
        it->counts = true;
    } else {
        len = vimg_align_down(len, cluster);
        if ((f & VIMG_STATUS_ZERO) && j->o->sparse_size) {
            it->kind = ITEM_ZERO;
            it->len = len;
        } else if (j->o->top_only && !(f & VIMG_STATUS_ALLOCATED)) {
            it->kind = ITEM_SKIP;
            it->len = len;
        } else {
            it->kind = ITEM_READ_SYNC;
            it->len = cluster;
            it->counts = true;
            it->host = host;
            it->host_off = host_off;
        }
    }
    cwalk_advance(j, it->len);
    *have = true;
    return 0;
}


/* Write the finished slot i (item it) of the ring at the head. */
static void cring_write(struct copy_job *j, struct cpool *p, const struct citem *it,
                        uint64_t i, bool parallel)
{
    struct vimg_image *dst = j->dst;
    const uint8_t *buf = p->inp[i];
    long res = p->slots[i].res;
    int ret = 0;

    if (ITEM_ZERO == it->kind) {
        if (!j->o->target_has_zero_init) {
            ret = vimg_write_zeroes(dst, it->off, it->len, 0, j->err);
        }
    } else if (ITEM_SKIP == it->kind) {
        /* left to the target's backing file */
    } else if (!parallel) {
        if (!(p->skip_zero && vimg_is_zero(buf, (size_t)it->len))) {
            ret = dst->drv->write_compressed(dst, buf, (size_t)it->len, it->off, j->err);
        }
    } else if (0 == res) {
        /* qemu leaves out zero clusters only on a zeroed target with -S;
         * otherwise they are compressed like the rest */
    } else if (-ENOSPC == res) {
        /* incompressible: stored plainly, as qemu does, unless the format
         * only takes compressed data (vmdk stream): then the driver's own
         * write_compressed decides */
        ret = dst->limits.needs_compressed_writes
              ? dst->drv->write_compressed(dst, buf, (size_t)it->len, it->off, j->err)
              : vimg_pwrite(dst, buf, (size_t)it->len, it->off, j->err);
    } else if (res < 0) {
        ret = (int)res;
    } else {
        ret = dst->drv->write_compressed_data(dst, p->out + i * p->out_stride, (size_t)res,
                                              (size_t)it->len, it->off, j->err);
    }
    if (ret >= 0 && p->inmap[i] && vimg_fmap_faulted()) {
        vimg_error_set(j->err, EIO, "error while reading at byte %" PRIu64 ": '%s' shrank "
                       "while it was being read", it->off, p->inmap[i]->file->name);
        ret = -EIO;
    }
    if (ret < 0) {
        job_fail(j, ret);
    } else if (it->counts) {
        job_progress(j, it->len);
    }
}

/* Clusters written from a mapping are released in runs of up to 2 MiB
 * (one madvise each); a NULL mapping releases what is pending. */
struct crel {
    const struct vimg_fmap *m;
    uint64_t off, len;
};

static void crel_add(struct crel *r, const struct vimg_fmap *m, uint64_t off, uint64_t len)
{
    if (r->m && (m != r->m || off != r->off + r->len || r->len >= DEFAULT_BUF)) {
        vimg_fmap_release(r->m, r->off, r->len);
        r->m = NULL;
    }
    if (!m) {
        return;
    }
    if (!r->m) {
        r->m = m;
        r->off = off;
        r->len = 0;
    }
    r->len += len;
}

static int job_compressed_run(struct copy_job *j, uint64_t total, uint64_t cluster)
{
    struct crel rel = { 0 };
    struct vimg_image *dst = j->dst;
    bool parallel = dst->drv->compress_cluster && dst->drv->write_compressed_data;
    struct cpool p = {
        .job = j,
        .cluster = cluster,
        .skip_zero = j->o->target_has_zero_init && j->o->sparse_size,
        /* room for a grain that grows: formats that only take compressed
         * data (vmdk stream) store incompressible grains compressed too */
        .out_stride = cluster + cluster / 8 + 4096,
    };
    unsigned nthreads = j->o->threads;
    struct citem *items = NULL;
    uint64_t head = 0;
    bool more = true;

    if (!nthreads) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        nthreads = n > 0 ? (unsigned)VIMG_MIN(n, 64) : 1;
    }
    if (!parallel) {
        nthreads = 1;
    }
    p.nslots = VIMG_MAX((uint64_t)nthreads * 4, COMPRESS_RING_MAX / cluster);
    p.nslots = VIMG_MAX(p.nslots, 2);
    p.in = malloc((size_t)(p.nslots * cluster));
    p.out = parallel ? malloc((size_t)(p.nslots * p.out_stride)) : NULL;
    p.slots = calloc((size_t)p.nslots, sizeof(*p.slots));
    p.lens = calloc((size_t)p.nslots, sizeof(*p.lens));
    p.inp = calloc((size_t)p.nslots, sizeof(*p.inp));
    p.inmap = calloc((size_t)p.nslots, sizeof(*p.inmap));
    items = calloc((size_t)p.nslots, sizeof(*items));
    if (!p.in || (parallel && !p.out) || !p.slots || !p.lens || !p.inp || !p.inmap ||
        !items) {
        vimg_error_set(j->err, ENOMEM, "out of memory");
        job_fail(j, -ENOMEM);
        goto out;
    }

    /* qemu's progress denominator: the same walk, counted first */
    for (bool have = true; have && j->ret >= 0;) {
        struct citem it;
        if (cwalk_next(j, total, cluster, &it, &have) < 0) {
            goto out;
        }
        if (have && it.counts) {
            j->allocated_total += it.len;
        }
        if (job_cancelled(j)) {
            goto out;
        }
    }
    j->w_idx = 0;
    j->w_off = j->w_dst_base = 0;

    pthread_mutex_init(&p.lock, NULL);
    pthread_cond_init(&p.work, NULL);
    pthread_cond_init(&p.done, NULL);
    p.threads = calloc(nthreads, sizeof(*p.threads));
    /* the main thread is one of the workers */
    for (unsigned i = 1; p.threads && i < nthreads; i++) {
        if (pthread_create(&p.threads[p.nthreads], NULL, cpool_worker, &p)) {
            break;
        }
        p.nthreads++;
    }

    while (j->ret >= 0 && !job_cancelled(j)) {
        uint64_t i = head % p.nslots;

        pthread_mutex_lock(&p.lock);
        bool head_done = head < p.filled && CS_DONE == p.slots[i].state;
        uint64_t filled = p.filled;
        pthread_mutex_unlock(&p.lock);
        if (head_done) {
            cring_write(j, &p, &items[i], i, parallel);
            if (p.inmap[i]) {
                crel_add(&rel, p.inmap[i], items[i].host_off, items[i].len);
                p.inmap[i] = NULL;
            }
            p.slots[i].state = CS_FREE;
            head++;
            continue;
        }
        if (more && filled - head < p.nslots) {
            uint64_t k = filled % p.nslots;
            struct citem *it = &items[k];
            if (cwalk_next(j, total, cluster, it, &more) < 0 || !more) {
                continue;
            }
            p.lens[k] = 0;
            p.inp[k] = p.in + k * cluster;
            if (ITEM_READ_SYNC == it->kind) {
                /* cached plain data is compressed from the page cache */
                const struct vimg_fmap *m = job_map_range(j, it->host, it->host_off, it->len);
                if (m) {
                    p.inp[k] = m->base + it->host_off;
                    p.inmap[k] = m;
                } else if (job_read_concat(j, p.in + k * cluster, it->len, it->off) < 0) {
                    break;
                }
                if (parallel) {
                    p.lens[k] = it->len;
                }
            }
            pthread_mutex_lock(&p.lock);
            p.slots[k].state = CS_READY;
            p.filled++;
            pthread_cond_signal(&p.work);
            pthread_mutex_unlock(&p.lock);
            continue;
        }
        if (!more && head == filled) {
            break;
        }
        /* the ring is full or the input is done: help, or wait for the head */
        pthread_mutex_lock(&p.lock);
        if (!cpool_take_one(&p)) {
            while (CS_DONE != p.slots[i].state) {
                pthread_cond_wait(&p.done, &p.lock);
            }
        }
        pthread_mutex_unlock(&p.lock);
    }

    pthread_mutex_lock(&p.lock);
    p.stop = true;
    pthread_cond_broadcast(&p.work);
    pthread_mutex_unlock(&p.lock);
    for (unsigned i = 0; i < p.nthreads; i++) {
        pthread_join(p.threads[i], NULL);
    }
    pthread_mutex_destroy(&p.lock);
    pthread_cond_destroy(&p.work);
    pthread_cond_destroy(&p.done);
    crel_add(&rel, NULL, 0, 0);
out:
    free(p.in);
    free(p.out);
    free(p.slots);
    free(p.lens);
    free(p.inp);
    free(p.inmap);
    free(items);
    free(p.threads);
    return j->ret;
}

static int job_compressed(struct copy_job *j, uint64_t total)
{
    struct vimg_image *dst = j->dst;
    uint64_t cluster = dst->limits.cluster_size;

    if (!dst->drv->write_compressed || dst->drv->data_only) {
        vimg_error_set(j->err, ENOTSUP, "Compression not supported for this file format");
        return job_fail(j, -ENOTSUP);
    }
    if (0 == cluster || cluster > 16 * 1024 * 1024) {
        vimg_error_set(j->err, EINVAL, "invalid cluster size");
        return job_fail(j, -EINVAL);
    }
    return job_compressed_run(j, total, cluster);
}

int vimg_copy(struct vimg_image *const *srcs, int nsrc, struct vimg_image *dst,
              const struct vimg_copy_opts *o, struct vimg_error *err)
{
    struct vimg_error local_err = { 0 };
    struct copy_job j = {
        .o = o, .srcs = srcs, .nsrc = nsrc, .dst = dst,
        .err = err ? err : &local_err,
    };
    uint64_t total = 0;
    int ret;

    copy_backend_used = "sync";
    for (int i = 0; i < nsrc; i++) {
        if (!vimg_add_ok(total, vimg_size(srcs[i]), &total)) {
            vimg_error_set(j.err, EFBIG, "the sources are too large together");
            return -EFBIG;
        }
    }
    if (total > vimg_size(dst)) {
        vimg_error_set(j.err, EINVAL, "output file is smaller than input file");
        return -EINVAL;
    }
    ret = job_setup(&j);
    if (ret < 0) {
        goto out;
    }
    if (o->compress || dst->limits.needs_compressed_writes) {
        job_compressed(&j, total);
        if (o->compress && j.ret >= 0) {
            /* qemu-img's "EOF" compressed write of nothing: a driver may
             * align its file end (qcow2 rounds it to a whole sector) */
            ret = dst->drv->write_compressed(dst, NULL, 0, 0, j.err);
            if (ret < 0) {
                job_fail(&j, ret);
            }
        }
        goto flush;
    }
    ret = job_prepass(&j);
    if (ret < 0) {
        goto out;
    }
    while (j.ret >= 0) {
        bool busy = false, progressed = false;
        if (job_cancelled(&j) || job_fill(&j) < 0) {
            break;
        }
        while (j.ring_count && j.ret >= 0) {
            if (job_finish_head(&j, &busy) < 0 || busy) {
                break;
            }
            progressed = true;
        }
        if (j.ret < 0 || (!j.ring_count && j.w_done && !j.have_next)) {
            break;
        }
        /* Nothing more to do until some I/O completes: wait for it (the
         * head's read, or writes holding every buffer). */
        if (busy && ITEM_READ_WORKER == j.ring[j.ring_head].kind) {
            rpool_item_done(&j, &j.ring[j.ring_head], true);
            if (job_reap(&j, 0) < 0) {
                break;
            }
        } else if (job_reap(&j, progressed ? 0 : 1) < 0) {
            break;
        }
    }
    while (vimg_aio_in_flight(j.aio) && job_reap(&j, vimg_aio_in_flight(j.aio)) >= 0) {
    }
    if (j.ret >= 0) {
        job_zero_flush(&j);
    }
flush:
    if (j.ret >= 0 && !o->no_flush) {
        ret = vimg_flush(dst, j.err);
        if (ret < 0) {
            job_fail(&j, ret);
        }
    } else if (j.ret >= 0 && DST_ALLOC == j.mode) {
        /* an append-mode writer still has its metadata to write */
        ret = vimg_flush(dst, j.err);
        if (ret < 0) {
            job_fail(&j, ret);
        }
    }
out:
    job_cleanup(&j);
    return j.ret < 0 ? j.ret : 0;
}

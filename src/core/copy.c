#include "config.h"

#include <inttypes.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core/copy.h"
#include "io/file.h"
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

struct copy_state {
    const struct vimg_copy_opts *o;
    struct vimg_image *dst;
    uint64_t allocated_total, allocated_done;
    uint8_t *buf;
    uint64_t buf_size;
};

static void copy_progress(struct copy_state *s, uint64_t n)
{
    s->allocated_done += n;
    if (s->o->progress) {
        s->o->progress(s->o->progress_opaque,
                       (float)(100.0 * (double)s->allocated_done /
                               (double)s->allocated_total));
    }
}

static int copy_zero(struct copy_state *s, uint64_t dst_off, uint64_t len,
                     struct vimg_error *err)
{
    if (s->o->target_has_zero_init) {
        return 0;
    }
    return vimg_write_zeroes(s->dst, dst_off, len, VIMG_ZERO_MAY_UNMAP, err);
}

static int copy_data(struct copy_state *s, struct vimg_image *src, uint64_t off,
                     uint64_t dst_off, uint64_t len, struct vimg_error *err)
{
    int ret = vimg_pread(src, s->buf, len, off, err);
    if (ret < 0) {
        vimg_error_prefix(err, "error while reading at byte %" PRIu64 ": ", off);
        return ret;
    }
    if (0 == s->o->sparse_size) {
        return vimg_pwrite(s->dst, s->buf, len, dst_off, err);
    }
    /* Split at the -S granularity; zero parts become holes. */
    int min = (int)(s->o->sparse_size / SECTOR);
    int alignment = 1;
    while (alignment * 2 <= min) {
        alignment *= 2;
    }
    uint64_t done = 0;
    while (done < len) {
        uint64_t rem = len - done;
        int n = (int)vimg_div_round_up(rem, SECTOR);
        int pnum;
        int is_data = vimg_internal_zero_split(s->buf + done, n, &pnum, min,
                                               (int64_t)((dst_off + done) / SECTOR),
                                               alignment);
        uint64_t bytes = VIMG_MIN((uint64_t)pnum * SECTOR, rem);
        if (is_data) {
            ret = vimg_pwrite(s->dst, s->buf + done, bytes, dst_off + done, err);
        } else {
            ret = copy_zero(s, dst_off + done, bytes, err);
        }
        if (ret < 0) {
            return ret;
        }
        done += bytes;
    }
    return 0;
}

int vimg_copy(struct vimg_image *const *srcs, int nsrc, struct vimg_image *dst,
              const struct vimg_copy_opts *o, struct vimg_error *err)
{
    struct copy_state s = { .o = o, .dst = dst };
    int ret = 0;

    s.buf_size = o->buf_size ? o->buf_size : DEFAULT_BUF;
    /* The progress denominator: what will be read (and zeros with -S 0). */
    for (int i = 0; i < nsrc; i++) {
        uint64_t size = vimg_size(srcs[i]);
        for (uint64_t off = 0; off < size;) {
            struct vimg_status st;
            ret = vimg_block_status(srcs[i], off, size - off, &st, err);
            if (ret < 0) {
                return ret;
            }
            if (!(st.flags & VIMG_STATUS_ZERO) || 0 == o->sparse_size) {
                s.allocated_total += st.length;
            }
            off += st.length;
        }
    }
    s.buf = malloc(s.buf_size);
    if (!s.buf) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    uint64_t dst_base = 0;
    for (int i = 0; i < nsrc && ret >= 0; i++) {
        struct vimg_image *src = srcs[i];
        uint64_t size = vimg_size(src);
        for (uint64_t off = 0; off < size && ret >= 0;) {
            struct vimg_status st;
            ret = vimg_block_status(src, off, size - off, &st, err);
            if (ret < 0) {
                break;
            }
            uint64_t run_end = off + st.length;
            /* A run is cut into buffer-sized chunks from its start. */
            while (off < run_end && ret >= 0) {
                uint64_t n = run_end - off;
                if ((st.flags & VIMG_STATUS_ZERO) && o->sparse_size) {
                    ret = copy_zero(&s, dst_base + off, n, err);
                    off += n;
                    continue;
                }
                n = VIMG_MIN(n, s.buf_size);
                if (st.flags & VIMG_STATUS_ZERO) {
                    memset(s.buf, 0, n);
                    ret = vimg_pwrite(dst, s.buf, n, dst_base + off, err);
                } else {
                    ret = copy_data(&s, src, off, dst_base + off, n, err);
                }
                copy_progress(&s, n);
                off += n;
            }
        }
        dst_base += size;
    }
    free(s.buf);
    if (ret >= 0) {
        ret = vimg_flush(dst, err);
    }
    return ret;
}

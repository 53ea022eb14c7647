/* Posix host files and in-memory files. */
#include "config.h"

#include <inttypes.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/file.h"
#include "util/util.h"

struct posix_file {
    struct vimg_file base;
    /* Sticky capability flags: cleared on the first EOPNOTSUPP so we never
     * retry a path the file system refused. */
    bool can_punch;
    bool can_zero_range;
    bool can_fallocate;
    bool can_seek_data;
};

static int posix_pread(struct vimg_file *f, void *buf, size_t len, uint64_t off)
{
    char *p = buf;
    while (len) {
        ssize_t n = pread(f->fd, p, len, (off_t)off);
        if (n < 0) {
            if (EINTR == errno) {
                continue;
            }
            return -errno;
        }
        if (0 == n) {
            /* past EOF: the rest reads as zeros */
            memset(p, 0, len);
            return 0;
        }
        p += n;
        off += (uint64_t)n;
        len -= (size_t)n;
    }
    return 0;
}

static int posix_pwrite(struct vimg_file *f, const void *buf, size_t len, uint64_t off)
{
    const char *p = buf;
    while (len) {
        ssize_t n = pwrite(f->fd, p, len, (off_t)off);
        if (n < 0) {
            if (EINTR == errno) {
                continue;
            }
            return -errno;
        }
        if (0 == n) {
            return -ENOSPC;
        }
        p += n;
        off += (uint64_t)n;
        len -= (size_t)n;
    }
    return 0;
}

static int64_t posix_size(struct vimg_file *f)
{
    struct stat st;
    if (fstat(f->fd, &st) < 0) {
        return -errno;
    }
    return st.st_size;
}

static int64_t posix_allocated(struct vimg_file *f)
{
    struct stat st;
    if (fstat(f->fd, &st) < 0) {
        return -errno;
    }
    return (int64_t)st.st_blocks * 512;
}

static int posix_truncate(struct vimg_file *f, uint64_t size)
{
    if (size > INT64_MAX) {
        return -EFBIG;
    }
    while (ftruncate(f->fd, (off_t)size) < 0) {
        if (EINTR != errno) {
            return -errno;
        }
    }
    return 0;
}

static int write_zeros(struct vimg_file *f, uint64_t off, uint64_t len)
{
    static const char zeros[65536];
    while (len) {
        size_t n = len < sizeof(zeros) ? (size_t)len : sizeof(zeros);
        int ret = posix_pwrite(f, zeros, n, off);
        if (ret < 0) {
            return ret;
        }
        off += n;
        len -= n;
    }
    return 0;
}

static bool unsupported(int e)
{
    return EOPNOTSUPP == e || ENOSYS == e || EINVAL == e;
}

static int posix_allocate(struct vimg_file *f, uint64_t off, uint64_t len,
                          enum vimg_alloc_mode mode)
{
    struct posix_file *pf = (struct posix_file *)f;

    if (!len) {
        return 0;
    }
    if (pf->can_fallocate) {
        if (0 == fallocate(f->fd, 0, (off_t)off, (off_t)len)) {
            return 0;
        }
        if (!unsupported(errno)) {
            return -errno;
        }
        pf->can_fallocate = false;
    }
    if (VIMG_ALLOC_FALLOC == mode) {
        return -ENOTSUP;
    }
    /* "full" without fallocate: only the range beyond EOF may be written
     * with zeros blindly; inside the file existing data must stay. */
    int64_t size = posix_size(f);
    if (size < 0) {
        return (int)size;
    }
    if (off + len > (uint64_t)size) {
        uint64_t start = VIMG_MAX(off, (uint64_t)size);
        return write_zeros(f, start, off + len - start);
    }
    return 0;
}

static int posix_zero(struct vimg_file *f, uint64_t off, uint64_t len, bool may_unmap)
{
    struct posix_file *pf = (struct posix_file *)f;

    if (!len) {
        return 0;
    }
    if (may_unmap && pf->can_punch) {
        if (0 == fallocate(f->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           (off_t)off, (off_t)len)) {
            return 0;
        }
        if (!unsupported(errno)) {
            return -errno;
        }
        pf->can_punch = false;
    }
    if (pf->can_zero_range) {
        if (0 == fallocate(f->fd, FALLOC_FL_ZERO_RANGE, (off_t)off, (off_t)len)) {
            return 0;
        }
        if (!unsupported(errno)) {
            return -errno;
        }
        pf->can_zero_range = false;
    }
    return write_zeros(f, off, len);
}

static int posix_sync(struct vimg_file *f)
{
    while (fdatasync(f->fd) < 0) {
        if (EINTR != errno) {
            return -errno;
        }
    }
    return 0;
}

/*
 * The SEEK_DATA/SEEK_HOLE walk at off (cases as the kernel answers them):
 *  D1. lseek(SEEK_DATA) == off: data; its end is lseek(SEEK_HOLE) from off.
 *  D2. lseek(SEEK_DATA) > off: a hole up to that point.
 *  H1. SEEK_DATA fails with ENXIO: a hole to EOF (or off is past EOF, which
 *      counts as a hole too: the file was truncated during the walk).
 *  E1. a result below off is impossible unless the file changed under us:
 *      report -EIO rather than loop.
 *  E2. EINVAL/ENOTSUP (no support): everything is data, once and for all.
 * Each walk uses the file's own descriptor; callers serialise per file.
 */
static int posix_extent(struct vimg_file *f, uint64_t off, uint64_t len,
                        bool *is_data, uint64_t *run_len)
{
    struct posix_file *pf = (struct posix_file *)f;
    off_t data, hole;

    if (!pf->can_seek_data) {
        *is_data = true;
        *run_len = len;
        return 0;
    }
    data = lseek(f->fd, (off_t)off, SEEK_DATA);
    if (data < 0) {
        if (ENXIO == errno) {
            *is_data = false;
            *run_len = len;
            return 0;
        }
        if (EINVAL == errno || EOPNOTSUPP == errno) {
            pf->can_seek_data = false;
            *is_data = true;
            *run_len = len;
            return 0;
        }
        return -errno;
    }
    if ((uint64_t)data < off) {
        return -EIO;
    }
    if ((uint64_t)data > off) {
        *is_data = false;
        *run_len = VIMG_MIN((uint64_t)data - off, len);
        return 0;
    }
    hole = lseek(f->fd, (off_t)off, SEEK_HOLE);
    if (hole < 0) {
        if (ENXIO == errno) {
            /* truncated between the two calls: hole */
            *is_data = false;
            *run_len = len;
            return 0;
        }
        return -errno;
    }
    if ((uint64_t)hole <= off) {
        return -EIO;
    }
    *is_data = true;
    *run_len = VIMG_MIN((uint64_t)hole - off, len);
    return 0;
}

static void posix_close(struct vimg_file *f)
{
    if (f->fd >= 0) {
        close(f->fd);
    }
}

static const struct vimg_file_ops posix_ops = {
    .pread = posix_pread,
    .pwrite = posix_pwrite,
    .size = posix_size,
    .allocated = posix_allocated,
    .truncate = posix_truncate,
    .allocate = posix_allocate,
    .zero = posix_zero,
    .sync = posix_sync,
    .extent = posix_extent,
    .close = posix_close,
};

int vimg_file_open_posix(struct vimg_file **out, const char *name, unsigned flags)
{
    struct posix_file *pf;
    struct stat st;
    int oflags = O_CLOEXEC;
    int fd;

    oflags |= (flags & VIMG_FILE_RDWR) ? O_RDWR : O_RDONLY;
    if (flags & VIMG_FILE_CREATE) {
        oflags |= O_CREAT;
    }
    if (flags & VIMG_FILE_EXCL) {
        oflags |= O_EXCL;
    }
    if (flags & VIMG_FILE_TRUNC) {
        oflags |= O_TRUNC;
    }
    if (flags & VIMG_FILE_DIRECT) {
        oflags |= O_DIRECT;
    }
    do {
        fd = open(name, oflags, 0644);
    } while (fd < 0 && EINTR == errno);
    if (fd < 0) {
        return -errno;
    }
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return S_ISDIR(st.st_mode) ? -EISDIR : -ENOTSUP;
    }
    pf = calloc(1, sizeof(*pf));
    if (pf) {
        pf->base.name = strdup(name);
    }
    if (!pf || !pf->base.name) {
        free(pf);
        close(fd);
        return -ENOMEM;
    }
    pf->base.ops = &posix_ops;
    pf->base.fd = fd;
    pf->base.writable = !!(flags & VIMG_FILE_RDWR);
    pf->can_punch = pf->can_zero_range = pf->can_fallocate = pf->can_seek_data = true;
    *out = &pf->base;
    return 0;
}

static bool copy_range_unsupported(int e)
{
    return EXDEV == e || EINVAL == e || ENOSYS == e || EOPNOTSUPP == e || EBADF == e ||
           ETXTBSY == e || EPERM == e;
}

int vimg_file_copy_range(struct vimg_file *src, uint64_t src_off, struct vimg_file *dst,
                         uint64_t dst_off, uint64_t len, bool try_clone)
{
    if (src->fd < 0 || dst->fd < 0 || src_off > INT64_MAX || dst_off > INT64_MAX ||
        len > INT64_MAX - VIMG_MAX(src_off, dst_off)) {
        return -ENOTSUP;
    }
    if (try_clone && 0 == src_off % 4096 && 0 == dst_off % 4096 && 0 == len % 4096) {
        struct file_clone_range fcr = {
            .src_fd = src->fd,
            .src_offset = src_off,
            .src_length = len,
            .dest_offset = dst_off,
        };
        if (0 == ioctl(dst->fd, FICLONERANGE, &fcr)) {
            return 0;
        }
        /* any failure: the plain copy below still may work */
    }
    while (len) {
        loff_t in = (loff_t)src_off, out = (loff_t)dst_off;
        ssize_t n = copy_file_range(src->fd, &in, dst->fd, &out,
                                    (size_t)VIMG_MIN(len, (uint64_t)1 << 30), 0);
        if (n < 0) {
            if (EINTR == errno) {
                continue;
            }
            return copy_range_unsupported(errno) ? -ENOTSUP : -errno;
        }
        if (0 == n) {
            /* the source ends here: the rest reads as zeros, which the
             * buffered path knows how to write */
            return -ENOTSUP;
        }
        src_off += (uint64_t)n;
        dst_off += (uint64_t)n;
        len -= (uint64_t)n;
    }
    return 0;
}

#define LOCK_BASE_HELD 100
#define LOCK_BASE_UNSHARED 200
#define LOCK_NPERMS 4

static const char *const perm_names[LOCK_NPERMS] = {
    "consistent read", "write", "write unchanged", "resize",
};

static int lock_byte(int fd, int type, int cmd, uint64_t byte, bool *conflict)
{
    struct flock fl = {
        .l_type = (short)type,
        .l_whence = SEEK_SET,
        .l_start = (off_t)byte,
        .l_len = 1,
    };
    if (fcntl(fd, cmd, &fl) < 0) {
        return -errno;
    }
    if (conflict) {
        *conflict = F_UNLCK != fl.l_type;
    }
    return 0;
}

int vimg_file_lock(struct vimg_file *f, unsigned held, unsigned unshared,
                   const char **perm_name, bool *shared)
{
    int ret = 0;
    bool conflict;

    if (f->fd < 0) {
        return 0;
    }
    /* Drop what a previous call took, then take the new set. */
    for (unsigned i = 0; i < LOCK_NPERMS; i++) {
        for (unsigned base = LOCK_BASE_HELD; base <= LOCK_BASE_UNSHARED; base += 100) {
            unsigned mask = LOCK_BASE_HELD == base ? held : unshared;
            int type = (mask & (1u << i)) ? F_RDLCK : F_UNLCK;
            ret = lock_byte(f->fd, type, F_OFD_SETLK, base + i, NULL);
            if (-EINVAL == ret && 0 == i && LOCK_BASE_HELD == base) {
                return 0;   /* no OFD locks on this file system: run unlocked */
            }
            if (ret < 0 && F_RDLCK == type) {
                goto conflict_found;
            }
        }
    }
    for (unsigned i = 0; i < LOCK_NPERMS; i++) {
        if ((held & (1u << i))) {
            ret = lock_byte(f->fd, F_WRLCK, F_OFD_GETLK, LOCK_BASE_UNSHARED + i, &conflict);
            if (ret < 0 || conflict) {
                *perm_name = perm_names[i];
                *shared = false;
                goto fail;
            }
        }
    }
    for (unsigned i = 0; i < LOCK_NPERMS; i++) {
        if ((unshared & (1u << i))) {
            ret = lock_byte(f->fd, F_WRLCK, F_OFD_GETLK, LOCK_BASE_HELD + i, &conflict);
            if (ret < 0 || conflict) {
                *perm_name = perm_names[i];
                *shared = true;
                goto fail;
            }
        }
    }
    return 0;
conflict_found:
    *perm_name = "consistent read";
    *shared = false;
fail:
    for (unsigned i = 0; i < LOCK_NPERMS; i++) {
        lock_byte(f->fd, F_UNLCK, F_OFD_SETLK, LOCK_BASE_HELD + i, NULL);
        lock_byte(f->fd, F_UNLCK, F_OFD_SETLK, LOCK_BASE_UNSHARED + i, NULL);
    }
    return -EAGAIN;
}

void vimg_file_close(struct vimg_file *f)
{
    if (!f) {
        return;
    }
    f->ops->close(f);
    free(f->name);
    free(f);
}

/* ---- in-memory files (fuzzers and tests) -------------------------------- */

struct mem_file {
    struct vimg_file base;
    unsigned char *data;
    size_t len;
    size_t max;
};

static int mem_pread(struct vimg_file *f, void *buf, size_t len, uint64_t off)
{
    struct mem_file *m = (struct mem_file *)f;
    size_t avail = off < m->len ? m->len - (size_t)off : 0;
    size_t n = VIMG_MIN(avail, len);
    if (n) {
        memcpy(buf, m->data + off, n);
    }
    memset((char *)buf + n, 0, len - n);
    return 0;
}

static int mem_resize(struct mem_file *m, uint64_t size)
{
    if (size > m->max) {
        return -EFBIG;
    }
    if (size > m->len) {
        unsigned char *p = realloc(m->data, size ? size : 1);
        if (!p) {
            return -ENOMEM;
        }
        memset(p + m->len, 0, size - m->len);
        m->data = p;
    }
    m->len = size;
    return 0;
}

static int mem_pwrite(struct vimg_file *f, const void *buf, size_t len, uint64_t off)
{
    struct mem_file *m = (struct mem_file *)f;
    uint64_t end;
    if (!f->writable) {
        return -EBADF;
    }
    if (!vimg_add_ok(off, len, &end)) {
        return -EFBIG;
    }
    if (end > m->len) {
        int ret = mem_resize(m, end);
        if (ret < 0) {
            return ret;
        }
    }
    memcpy(m->data + off, buf, len);
    return 0;
}

static int64_t mem_size(struct vimg_file *f)
{
    return (int64_t)((struct mem_file *)f)->len;
}

static int mem_truncate(struct vimg_file *f, uint64_t size)
{
    if (!f->writable) {
        return -EBADF;
    }
    return mem_resize((struct mem_file *)f, size);
}

static int mem_allocate(struct vimg_file *f, uint64_t off, uint64_t len,
                        enum vimg_alloc_mode mode)
{
    struct mem_file *m = (struct mem_file *)f;
    uint64_t end;
    if (!f->writable) {
        return -EBADF;
    }
    if (!vimg_add_ok(off, len, &end)) {
        return -EFBIG;
    }
    return end > m->len ? mem_resize(m, end) : 0;
}

static int mem_zero(struct vimg_file *f, uint64_t off, uint64_t len, bool may_unmap)
{
    struct mem_file *m = (struct mem_file *)f;
    uint64_t end;
    if (!f->writable) {
        return -EBADF;
    }
    if (!vimg_add_ok(off, len, &end)) {
        return -EFBIG;
    }
    if (end > m->len) {
        int ret = mem_resize(m, end);
        if (ret < 0) {
            return ret;
        }
    }
    memset(m->data + off, 0, len);
    return 0;
}

static int mem_sync(struct vimg_file *f)
{
    return 0;
}

static int mem_extent(struct vimg_file *f, uint64_t off, uint64_t len, bool *is_data,
                      uint64_t *run_len)
{
    *is_data = true;
    *run_len = len;
    return 0;
}

static void mem_close(struct vimg_file *f)
{
    free(((struct mem_file *)f)->data);
}

static const struct vimg_file_ops mem_ops = {
    .pread = mem_pread,
    .pwrite = mem_pwrite,
    .size = mem_size,
    .allocated = mem_size,
    .truncate = mem_truncate,
    .allocate = mem_allocate,
    .zero = mem_zero,
    .sync = mem_sync,
    .extent = mem_extent,
    .close = mem_close,
};

int vimg_file_open_mem(struct vimg_file **out, const char *name, const void *data,
                       size_t len, size_t max_size, bool writable)
{
    struct mem_file *m = calloc(1, sizeof(*m));
    if (!m) {
        return -ENOMEM;
    }
    m->data = malloc(len ? len : 1);
    m->base.name = strdup(name);
    if (!m->data || !m->base.name) {
        free(m->data);
        free(m->base.name);
        free(m);
        return -ENOMEM;
    }
    if (len) {
        memcpy(m->data, data, len);
    }
    m->len = len;
    m->max = VIMG_MAX(max_size, len);
    m->base.ops = &mem_ops;
    m->base.fd = -1;
    m->base.writable = writable;
    *out = &m->base;
    return 0;
}

/*
 * The copy engine (src/core/copy.c) end to end.
 *
 * Op-trace tests: the source and the target are raw images on a recording
 * host file, which logs every pread, pwrite, zero, allocate and truncate.
 * The sorted log is asserted exactly: holes and zero runs are never read,
 * and never written as data.  The source layout (and what qemu-img convert
 * makes of it with the default -S 4k: data at [64K,68K) and [200K,204K),
 * holes elsewhere) is:
 *   [64K,72K)   data extent: 4K of 0x11, then 4K of written zeros
 *   [128K,136K) data extent: written zeros
 *   [200K,204K) data extent: 0x22
 *   everything else: holes
 *
 * Backend tests: the same copy between posix files with each async backend
 * forced (VIMG_AIO=io_uring|libaio|threads), with copy offload, and with
 * -S 0; the results must be the same byte for byte and extent for extent.
 *
 * Memory: a 1 TiB sparse source copies with a peak RSS far below its size.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <setjmp.h>
#include <cmocka.h>

#include "test_tmp.h"

#include "core/copy.h"
#include "io/fmap.h"
#include "core/image.h"
#include "io/aio.h"
#include "io/file.h"
#include "vimg/vimg.h"

#define KiB 1024ull
#define MiB (1024ull * 1024)
#define SRC_SIZE MiB

/* ---- a recording host file ------------------------------------------------ */

struct extent {
    uint64_t off, len;
};

struct rec_file {
    struct vimg_file base;
    struct vimg_file *inner;
    const struct extent *map;   /* data extents (sorted); NULL: all data */
    size_t nmap;
    char **log;
    size_t nlog;
};

static void rec_log(struct rec_file *r, const char *op, uint64_t off, uint64_t len)
{
    char line[64];
    snprintf(line, sizeof(line), "%s %llu %llu", op, (unsigned long long)off,
             (unsigned long long)len);
    r->log = realloc(r->log, (r->nlog + 1) * sizeof(*r->log));
    assert_non_null(r->log);
    r->log[r->nlog] = strdup(line);
    assert_non_null(r->log[r->nlog]);
    r->nlog++;
}

static int rec_pread(struct vimg_file *f, void *buf, size_t len, uint64_t off)
{
    struct rec_file *r = (struct rec_file *)f;
    rec_log(r, "R", off, len);
    return vimg_file_pread(r->inner, buf, len, off);
}

static int rec_pwrite(struct vimg_file *f, const void *buf, size_t len, uint64_t off)
{
    struct rec_file *r = (struct rec_file *)f;
    rec_log(r, "W", off, len);
    return vimg_file_pwrite(r->inner, buf, len, off);
}

static int64_t rec_size(struct vimg_file *f)
{
    return vimg_file_size(((struct rec_file *)f)->inner);
}

static int rec_truncate(struct vimg_file *f, uint64_t size)
{
    struct rec_file *r = (struct rec_file *)f;
    rec_log(r, "T", size, 0);
    return r->inner->ops->truncate(r->inner, size);
}

static int rec_allocate(struct vimg_file *f, uint64_t off, uint64_t len,
                        enum vimg_alloc_mode mode)
{
    struct rec_file *r = (struct rec_file *)f;
    rec_log(r, "A", off, len);
    return r->inner->ops->allocate(r->inner, off, len, mode);
}

static int rec_zero(struct vimg_file *f, uint64_t off, uint64_t len, bool may_unmap)
{
    struct rec_file *r = (struct rec_file *)f;
    rec_log(r, "Z", off, len);
    return r->inner->ops->zero(r->inner, off, len, may_unmap);
}

static int rec_sync(struct vimg_file *f)
{
    return 0;
}

static int rec_extent(struct vimg_file *f, uint64_t off, uint64_t len, bool *is_data,
                      uint64_t *run_len)
{
    struct rec_file *r = (struct rec_file *)f;
    if (!r->map) {
        *is_data = true;
        *run_len = len;
        return 0;
    }
    for (size_t i = 0; i < r->nmap; i++) {
        const struct extent *e = &r->map[i];
        if (off < e->off) {
            *is_data = false;
            *run_len = e->off - off < len ? e->off - off : len;
            return 0;
        }
        if (off < e->off + e->len) {
            *is_data = true;
            *run_len = e->off + e->len - off < len ? e->off + e->len - off : len;
            return 0;
        }
    }
    *is_data = false;
    *run_len = len;
    return 0;
}

static void rec_close(struct vimg_file *f)
{
    struct rec_file *r = (struct rec_file *)f;
    vimg_file_close(r->inner);
    for (size_t i = 0; i < r->nlog; i++) {
        free(r->log[i]);
    }
    free(r->log);
}

static const struct vimg_file_ops rec_ops = {
    .pread = rec_pread,
    .pwrite = rec_pwrite,
    .size = rec_size,
    .allocated = rec_size,
    .truncate = rec_truncate,
    .allocate = rec_allocate,
    .zero = rec_zero,
    .sync = rec_sync,
    .extent = rec_extent,
    .close = rec_close,
};

static struct rec_file *rec_new(const char *name, const void *data, size_t len,
                                const struct extent *map, size_t nmap)
{
    struct rec_file *r = calloc(1, sizeof(*r));
    assert_non_null(r);
    assert_int_equal(0, vimg_file_open_mem(&r->inner, name, data, len, len, true));
    r->base.ops = &rec_ops;
    r->base.name = strdup(name);
    r->base.fd = -1;
    r->base.writable = true;
    r->map = map;
    r->nmap = nmap;
    return r;
}

static int cmp_str(const void *a, const void *b)
{
    const char *x = *(char *const *)a, *y = *(char *const *)b;
    /* numeric order of "OP off len" lines: op first, then offset */
    if (x[0] != y[0]) {
        return x[0] - y[0];
    }
    unsigned long long ox = strtoull(x + 2, NULL, 10), oy = strtoull(y + 2, NULL, 10);
    return ox < oy ? -1 : ox > oy;
}

static void assert_log(struct rec_file *r, const char *const *expect)
{
    size_t n = 0;
    char buf[4096] = "";
    if (r->nlog) {
        qsort(r->log, r->nlog, sizeof(*r->log), cmp_str);
    }
    for (size_t i = 0; i < r->nlog; i++) {
        strncat(buf, r->log[i], sizeof(buf) - strlen(buf) - 2);
        strcat(buf, "\n");
    }
    while (expect[n]) {
        n++;
    }
    if (n != r->nlog) {
        fail_msg("'%s': %zu ops, expected %zu:\n%s", r->base.name, r->nlog, n, buf);
    }
    for (size_t i = 0; i < n; i++) {
        if (0 != strcmp(expect[i], r->log[i])) {
            fail_msg("'%s': op %zu is '%s', expected '%s':\n%s", r->base.name, i, r->log[i],
                     expect[i], buf);
        }
    }
    for (size_t i = 0; i < r->nlog; i++) {
        free(r->log[i]);
    }
    r->nlog = 0;
}

static const struct extent src_map[] = {
    { 64 * KiB, 8 * KiB },
    { 128 * KiB, 8 * KiB },
    { 200 * KiB, 4 * KiB },
};

struct trace_env {
    struct vimg_image *src, *dst;
    struct rec_file *rsrc, *rdst;
};

static void trace_open(struct trace_env *e)
{
    uint8_t *data = calloc(1, SRC_SIZE);
    assert_non_null(data);
    memset(data + 64 * KiB, 0x11, 4 * KiB);
    memset(data + 200 * KiB, 0x22, 4 * KiB);
    e->rsrc = rec_new("src.img", data, SRC_SIZE, src_map, 3);
    memset(data, 0, SRC_SIZE);
    e->rdst = rec_new("dst.img", data, SRC_SIZE, NULL, 0);
    free(data);
    struct vimg_error err = { 0 };
    assert_int_equal(0, vimg_internal_open_file(&e->src, &e->rsrc->base, "raw", 0, &err));
    assert_int_equal(0, vimg_internal_open_file(&e->dst, &e->rdst->base, "raw",
                                                VIMG_OPEN_RDWR, &err));
}

static void trace_close(struct trace_env *e)
{
    vimg_close(e->src);
    vimg_close(e->dst);
}

static void trace_copy(struct trace_env *e, const struct vimg_copy_opts *o)
{
    struct vimg_error err = { 0 };
    struct vimg_image *srcs[] = { e->src };
    int ret = vimg_copy(srcs, 1, e->dst, o, &err);
    if (ret < 0) {
        fail_msg("vimg_copy: %s", err.msg);
    }
}

static const char *const src_reads[] = {
    "R 65536 8192", "R 131072 8192", "R 204800 4096", NULL,
};

static void test_trace_zero_init(void **state)
{
    struct trace_env e;
    struct vimg_copy_opts o = { .sparse_size = 4096, .target_has_zero_init = true,
                                .fresh_target = true };
    trace_open(&e);
    trace_copy(&e, &o);
    assert_log(e.rsrc, src_reads);
    static const char *const dst_ops[] = { "W 65536 4096", "W 204800 4096", NULL };
    assert_log(e.rdst, dst_ops);
    trace_close(&e);
}

static void test_trace_existing_target(void **state)
{
    /* -n without --target-is-zero: zero runs are zeroed (holes punched),
     * adjacent ones (written zeros, then a hole) in one request */
    struct trace_env e;
    struct vimg_copy_opts o = { .sparse_size = 4096 };
    trace_open(&e);
    trace_copy(&e, &o);
    assert_log(e.rsrc, src_reads);
    static const char *const dst_ops[] = {
        "W 65536 4096", "W 204800 4096",
        "Z 0 65536", "Z 69632 135168", "Z 208896 839680", NULL,
    };
    assert_log(e.rdst, dst_ops);
    trace_close(&e);
}

static void test_trace_sparse_0(void **state)
{
    /* -S 0 writes everything, but still never reads a hole */
    struct trace_env e;
    struct vimg_copy_opts o = { .sparse_size = 0, .fresh_target = true };
    trace_open(&e);
    trace_copy(&e, &o);
    assert_log(e.rsrc, src_reads);
    static const char *const dst_ops[] = {
        "W 0 65536", "W 65536 8192", "W 73728 57344", "W 131072 8192", "W 139264 65536",
        "W 204800 4096", "W 208896 839680", NULL,
    };
    assert_log(e.rdst, dst_ops);
    trace_close(&e);
}

static void test_trace_sparse_64k(void **state)
{
    /* -S 64k: the 4K zero tail of the first extent is written with its data */
    struct trace_env e;
    struct vimg_copy_opts o = { .sparse_size = 64 * KiB, .target_has_zero_init = true,
                                .fresh_target = true };
    trace_open(&e);
    trace_copy(&e, &o);
    assert_log(e.rsrc, src_reads);
    static const char *const dst_ops[] = { "W 65536 8192", "W 204800 4096", NULL };
    assert_log(e.rdst, dst_ops);
    trace_close(&e);
}

static void trace_progress(void *opaque, float pct)
{
    float *last = opaque;
    assert_true(pct >= *last);
    *last = pct;
}

static void test_trace_progress(void **state)
{
    struct trace_env e;
    float last = 0;
    struct vimg_copy_opts o = { .sparse_size = 4096, .target_has_zero_init = true,
                                .progress = trace_progress, .progress_opaque = &last };
    trace_open(&e);
    trace_copy(&e, &o);
    assert_true(last > 99.99f && last < 100.01f);
    trace_close(&e);
}

static void test_target_too_small(void **state)
{
    struct trace_env e;
    struct vimg_copy_opts o = { .sparse_size = 4096 };
    struct vimg_error err = { 0 };
    trace_open(&e);
    struct vimg_image *srcs[] = { e.src, e.src };
    assert_int_equal(-EINVAL, vimg_copy(srcs, 2, e.dst, &o, &err));
    assert_string_equal("output file is smaller than input file", err.msg);
    trace_close(&e);
}

static void test_cancel(void **state)
{
    struct trace_env e;
    volatile sig_atomic_t cancel = 1;
    struct vimg_copy_opts o = { .sparse_size = 4096, .cancel = &cancel };
    struct vimg_error err = { 0 };
    trace_open(&e);
    struct vimg_image *srcs[] = { e.src };
    assert_int_equal(-ECANCELED, vimg_copy(srcs, 1, e.dst, &o, &err));
    /* nothing was read or written after the cancel */
    static const char *const none[] = { NULL };
    assert_log(e.rdst, none);
    trace_close(&e);
}

/* ---- compressed output through a fake driver ------------------------------
 *
 * compress_cluster "compresses" a cluster to its first 16 bytes, or answers
 * -ENOSPC for clusters starting with 0xEE (incompressible); every write is
 * logged, and the log must come out in guest order without sorting. */
#define FAKE_CLUSTER (64 * KiB)

struct fake_log {
    char lines[256][48];
    int n;
    bool in_order;
    uint64_t last;
    int eof_calls;      /* zero-length write_compressed: the end of the copy */
};
static struct fake_log flog;

static void fake_record(const char *op, uint64_t off, uint64_t len)
{
    assert_true(flog.n < 256);
    if (off < flog.last) {
        flog.in_order = false;
    }
    flog.last = off;
    snprintf(flog.lines[flog.n++], sizeof(flog.lines[0]), "%s %llu %llu", op,
             (unsigned long long)off, (unsigned long long)len);
}

static long fake_compress(struct vimg_image *img, void *out, size_t cap, const void *buf,
                          size_t len, struct vimg_error *err)
{
    if (0xEE == ((const uint8_t *)buf)[0]) {
        return -ENOSPC;
    }
    memcpy(out, buf, 16);
    return 16;
}

static int fake_write_cdata(struct vimg_image *img, const void *cdata, size_t clen,
                            size_t len, uint64_t offset, struct vimg_error *err)
{
    /* the bytes are this cluster's own: each cluster starts with its index */
    assert_int_equal(16, clen);
    assert_int_equal((uint8_t)(offset / FAKE_CLUSTER), ((const uint8_t *)cdata)[0]);
    fake_record("C", offset, len);
    return 0;
}

static int fake_write_compressed(struct vimg_image *img, const void *buf, size_t len,
                                 uint64_t offset, struct vimg_error *err)
{
    if (0 == len) {
        /* the end-of-copy call, as qemu-img makes it */
        assert_null(buf);
        flog.eof_calls++;
        return 0;
    }
    fake_record("C", offset, len);
    return 0;
}

static int fake_write(struct vimg_image *img, const void *buf, size_t len, uint64_t offset,
                      struct vimg_error *err)
{
    fake_record("P", offset, len);
    return 0;
}

static int fake_flush(struct vimg_image *img, struct vimg_error *err)
{
    return 0;
}

static const struct vimg_driver fake_parallel = {
    .abi_version = VIMG_DRIVER_ABI_VERSION,
    .name = "fake",
    .write = fake_write,
    .flush = fake_flush,
    .write_compressed = fake_write_compressed,
    .compress_cluster = fake_compress,
    .write_compressed_data = fake_write_cdata,
};

static const struct vimg_driver fake_serial = {
    .abi_version = VIMG_DRIVER_ABI_VERSION,
    .name = "fake",
    .write = fake_write,
    .flush = fake_flush,
    .write_compressed = fake_write_compressed,
};

static struct vimg_image *fake_image(const struct vimg_driver *drv, uint64_t size)
{
    struct vimg_image *img = calloc(1, sizeof(*img));
    assert_non_null(img);
    img->drv = drv;
    img->filename = strdup("fake.img");
    img->opaque = calloc(1, 1);
    img->flags = VIMG_OPEN_RDWR;
    img->size = size;
    img->limits.request_align = 1;
    img->limits.cluster_size = FAKE_CLUSTER;
    return img;
}

static void compressed_copy(const struct vimg_driver *drv, unsigned threads)
{
    /* 40 clusters + a short one: cluster i starts with byte i; clusters
     * 3, 17 are zero, 5 and 30 incompressible */
    const uint64_t size = 40 * FAKE_CLUSTER + 4 * KiB;
    uint8_t *data = calloc(1, size);
    assert_non_null(data);
    for (uint64_t c = 0; c * FAKE_CLUSTER < size; c++) {
        if (3 != c && 17 != c) {
            memset(data + c * FAKE_CLUSTER, (int)c, 32);
            data[c * FAKE_CLUSTER + 1000] = 1;
        }
    }
    data[5 * FAKE_CLUSTER] = data[30 * FAKE_CLUSTER] = 0xEE;
    struct rec_file *r = rec_new("csrc.img", data, size, NULL, 0);
    free(data);
    struct vimg_error err = { 0 };
    struct vimg_image *src, *dst = fake_image(drv, size);
    assert_int_equal(0, vimg_internal_open_file(&src, &r->base, "raw", 0, &err));
    struct vimg_copy_opts o = { .sparse_size = 4096, .target_has_zero_init = true,
                                .fresh_target = true, .compress = true, .threads = threads,
                                .buf_size = 256 * KiB };
    memset(&flog, 0, sizeof(flog));
    flog.in_order = true;
    struct vimg_image *srcs[] = { src };
    if (vimg_copy(srcs, 1, dst, &o, &err) < 0) {
        fail_msg("vimg_copy: %s", err.msg);
    }
    assert_true(flog.in_order);
    /* 41 clusters - 2 zero = 39 writes; 5 and 30 plain in the parallel
     * path (the serial path leaves that choice to write_compressed) */
    assert_int_equal(39, flog.n);
    for (int i = 0; i < flog.n; i++) {
        unsigned long long off = strtoull(flog.lines[i] + 2, NULL, 10);
        bool plain = drv == &fake_parallel &&
                     (5 * FAKE_CLUSTER == off || 30 * FAKE_CLUSTER == off);
        assert_int_equal(plain ? 'P' : 'C', flog.lines[i][0]);
        assert_true(off != 3 * FAKE_CLUSTER && off != 17 * FAKE_CLUSTER);
    }
    assert_string_equal("C 2621440 4096", flog.lines[flog.n - 1]);
    assert_int_equal(1, flog.eof_calls);
    vimg_close(src);
    vimg_close(dst);
}

static void test_compress_parallel_in_order(void **state)
{
    compressed_copy(&fake_parallel, 4);
    compressed_copy(&fake_parallel, 1);
}

static void test_compress_serial(void **state)
{
    compressed_copy(&fake_serial, 0);
}

/* ---- append-mode writer through a fake driver ------------------------------
 *
 * alloc_data hands out 64K clusters at the end of a host file in the order
 * asked; the test checks the contract (increasing, non-overlapping calls),
 * that the engine wrote each byte at the host offset it was given, and that
 * flush ran after the data. */
struct fake_alloc {
    struct vimg_file *host;
    uint64_t map[64];           /* guest cluster -> host offset + 1 (0: none) */
    uint64_t next_host;
    uint64_t last_end;
    int calls;
    bool flushed, bad_order;
};

static int fake_alloc_data(struct vimg_image *img, uint64_t offset, uint64_t len,
                           struct vimg_run *run, struct vimg_error *err)
{
    struct fake_alloc *f = img->opaque;
    uint64_t c = offset / FAKE_CLUSTER;
    if (offset < f->last_end || f->flushed) {
        f->bad_order = true;
    }
    f->calls++;
    assert_true(c < 64);
    if (!f->map[c]) {
        f->map[c] = f->next_host + 1;
        f->next_host += FAKE_CLUSTER;
    }
    run->flags = VIMG_RUN_DATA | VIMG_RUN_ALLOCATED | VIMG_RUN_HOST_VALID;
    run->host = f->host;
    run->host_off = f->map[c] - 1 + offset % FAKE_CLUSTER;
    run->length = (c + 1) * FAKE_CLUSTER - offset < len ? (c + 1) * FAKE_CLUSTER - offset : len;
    f->last_end = offset + run->length;
    return 0;
}

static int fake_alloc_flush(struct vimg_image *img, struct vimg_error *err)
{
    ((struct fake_alloc *)img->opaque)->flushed = true;
    return 0;
}

static const struct vimg_driver fake_append = {
    .abi_version = VIMG_DRIVER_ABI_VERSION,
    .name = "fake",
    .write = fake_write,
    .flush = fake_alloc_flush,
    .alloc_data = fake_alloc_data,
};

static void append_copy(struct rec_file *host, bool zero_init, const char *const *ops)
{
    /* 40 clusters: data in clusters 2, 3 (one partly), 10, 39 (partly) */
    const uint64_t size = 40 * FAKE_CLUSTER;
    uint8_t *data = calloc(1, size);
    assert_non_null(data);
    memset(data + 2 * FAKE_CLUSTER, 0x21, FAKE_CLUSTER + 8 * KiB);
    memset(data + 3 * FAKE_CLUSTER + 20 * KiB, 0x23, 4 * KiB);
    memset(data + 10 * FAKE_CLUSTER, 0x2a, FAKE_CLUSTER);
    memset(data + 39 * FAKE_CLUSTER + 60 * KiB, 0x27, 4 * KiB);
    struct rec_file *r = rec_new("asrc.img", data, size, NULL, 0);
    struct vimg_error err = { 0 };
    struct vimg_image *src, *dst = fake_image(&fake_append, size);
    free(dst->opaque);
    dst->opaque = calloc(1, sizeof(struct fake_alloc));
    struct fake_alloc *f = dst->opaque;
    f->host = &host->base;
    f->next_host = 128 * KiB;   /* after some "metadata" */
    assert_int_equal(0, vimg_internal_open_file(&src, &r->base, "raw", 0, &err));
    struct vimg_copy_opts o = { .sparse_size = 4096, .target_has_zero_init = zero_init,
                                .fresh_target = true, .buf_size = 256 * KiB };
    struct vimg_image *srcs[] = { src };
    if (vimg_copy(srcs, 1, dst, &o, &err) < 0) {
        fail_msg("vimg_copy: %s", err.msg);
    }
    assert_false(f->bad_order);
    assert_true(f->flushed);
    assert_log(host, ops);
    /* clusters in guest order at the append point */
    assert_int_equal(128 * KiB + 1, f->map[2]);
    assert_int_equal(128 * KiB + FAKE_CLUSTER + 1, f->map[3]);
    assert_int_equal(128 * KiB + 2 * FAKE_CLUSTER + 1, f->map[10]);
    assert_int_equal(128 * KiB + 3 * FAKE_CLUSTER + 1, f->map[39]);
    assert_int_equal(0, f->map[0]);
    assert_int_equal(0, f->map[11]);
    /* every data byte is where the driver said */
    uint8_t *back = malloc(FAKE_CLUSTER);
    for (uint64_t c = 0; c < 40; c++) {
        if (f->map[c]) {
            assert_int_equal(0, vimg_file_pread(&host->base, back, FAKE_CLUSTER,
                                                f->map[c] - 1));
            assert_memory_equal(data + c * FAKE_CLUSTER, back, FAKE_CLUSTER);
        }
    }
    free(back);
    free(data);
    dst->opaque = calloc(1, 1);
    free(f);
    vimg_close(src);
    vimg_close(dst);
}

static void test_append_writer_trace(void **state)
{
    struct rec_file *host = rec_new("host.img", "", 0, NULL, 0);
    vimg_file_close(host->inner);
    assert_int_equal(0, vimg_file_open_mem(&host->inner, "host.img", NULL, 0, 16 * MiB,
                                           true));
    /* the engine writes data only, each range once, at the host offsets
     * alloc_data gave; zero runs are left alone */
    static const char *const ops[] = {
        "W 131072 65536", "W 196608 8192", "W 217088 4096", "W 262144 65536",
        "W 389120 4096", NULL,
    };
    append_copy(host, true, ops);
    vimg_file_close(&host->base);
}

/* ---- posix files, every backend ------------------------------------------- */


static int group_setup(void **state)
{
    return test_tmp_make("test_copy_engine");
}

static int group_teardown(void **state)
{
    return test_tmp_remove();
}

#define POSIX_SIZE (24 * MiB + 1536)   /* not a multiple of 4K on purpose */

/* Data with holes, written zeros and an unaligned tail. */
static void make_source(const char *path)
{
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    uint8_t *buf = malloc(4 * MiB);
    assert_true(fd >= 0);
    assert_non_null(buf);
    assert_int_equal(0, ftruncate(fd, POSIX_SIZE));
    for (size_t i = 0; i < 4 * MiB; i++) {
        buf[i] = (uint8_t)(i * 7 + i / 4096);
    }
    assert_int_equal(4 * MiB, pwrite(fd, buf, 4 * MiB, 1 * MiB));      /* dense */
    memset(buf, 0, 64 * KiB);
    assert_int_equal(64 * KiB, pwrite(fd, buf, 64 * KiB, 8 * MiB));   /* zeros */
    memset(buf + 4 * KiB, 0x5a, 512);
    assert_int_equal(64 * KiB, pwrite(fd, buf, 64 * KiB, 12 * MiB));  /* one sector */
    memset(buf, 0x77, 1536);
    assert_int_equal(1536, pwrite(fd, buf, 1536, 24 * MiB));           /* tail */
    close(fd);
    free(buf);
}

/* Copy the raw src_path into a new dst_path of format fmt (POSIX_SIZE):
 * vimg_copy's result, with its message in *err. */
static int posix_copy_fmt(const char *src_path, const char *dst_path, const char *fmt,
                          const struct vimg_copy_opts *o, struct vimg_error *err)
{
    struct vimg_opts *opts = vimg_opts_new();
    struct vimg_image *src, *dst;
    char size[32];
    int ret;

    unlink(dst_path);
    snprintf(size, sizeof(size), "%llu", (unsigned long long)POSIX_SIZE);
    vimg_opts_set(opts, "size", size);
    assert_int_equal(0, vimg_create(dst_path, fmt, opts, err));
    vimg_opts_free(opts);
    assert_int_equal(0, vimg_open(&src, src_path, "raw", 0, NULL, err));
    assert_int_equal(0, vimg_open(&dst, dst_path, fmt, VIMG_OPEN_RDWR, NULL, err));
    struct vimg_image *srcs[] = { src };
    ret = vimg_copy(srcs, 1, dst, o, err);
    vimg_close(src);
    vimg_close(dst);
    return ret;
}

static void posix_copy(const char *src_path, const char *dst_path,
                       const struct vimg_copy_opts *o)
{
    struct vimg_error err = { 0 };
    if (posix_copy_fmt(src_path, dst_path, "raw", o, &err) < 0) {
        fail_msg("vimg_copy: %s", err.msg);
    }
}

static void assert_same_content(const char *a, const char *b)
{
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    assert_non_null(fa);
    assert_non_null(fb);
    static uint8_t x[65536], y[65536];
    for (;;) {
        size_t na = fread(x, 1, sizeof(x), fa), nb = fread(y, 1, sizeof(y), fb);
        /* a raw target is rounded up to whole sectors: extra bytes are zero */
        size_t n = na < nb ? na : nb;
        assert_memory_equal(x, y, n);
        for (size_t i = n; i < nb; i++) {
            assert_int_equal(0, y[i]);
        }
        if (!na || !nb) {
            break;
        }
    }
    fclose(fa);
    fclose(fb);
}

/* The data extents of a file as text ("off+len ..."). */
static void data_map(const char *path, char *out, size_t outlen)
{
    int fd = open(path, O_RDONLY);
    off_t size, off = 0;
    assert_true(fd >= 0);
    size = lseek(fd, 0, SEEK_END);
    out[0] = 0;
    while (off < size) {
        off_t d = lseek(fd, off, SEEK_DATA);
        if (d < 0) {
            break;
        }
        off_t h = lseek(fd, d, SEEK_HOLE);
        char item[64];
        snprintf(item, sizeof(item), "%lld+%lld ", (long long)d, (long long)(h - d));
        strncat(out, item, outlen - strlen(out) - 1);
        off = h;
    }
    close(fd);
}

static const char *backend_env[] = { "io_uring", "libaio", "threads" };

static void test_backends_same_result(void **state)
{
    char src[PATH_MAX], dst[PATH_MAX], ref_map[4096] = "", map[4096];
    struct vimg_copy_opts o = { .sparse_size = 4096, .target_has_zero_init = true,
                                .fresh_target = true, .queue_depth = 4,
                                .buf_size = 1 * MiB };
    snprintf(src, sizeof(src), "%s/src.img", tmpdir);
    make_source(src);
    for (size_t i = 0; i < 3; i++) {
        struct vimg_aio *aio;
        setenv("VIMG_AIO", backend_env[i], 1);
        if (vimg_aio_new(&aio, VIMG_AIO_AUTO, 4) < 0) {
            print_message("backend %s unavailable here: not tested\n", backend_env[i]);
            continue;
        }
        vimg_aio_free(aio);
        snprintf(dst, sizeof(dst), "%s/dst-%s.img", tmpdir, backend_env[i]);
        posix_copy(src, dst, &o);
        assert_string_equal(backend_env[i], vimg_internal_copy_backend());
        assert_same_content(src, dst);
        data_map(dst, map, sizeof(map));
        if (!ref_map[0]) {
            strcpy(ref_map, map);
        }
        assert_string_equal(ref_map, map);
    }
    unsetenv("VIMG_AIO");
    /* the written zeros at 8M and the zero sectors around 12M+4K are holes;
     * what qemu-img makes of the same source */
    assert_non_null(strstr(ref_map, "1048576+4194304 "));
    assert_null(strstr(ref_map, "8388608+"));
}

/* Into a fresh qcow2 (the append-mode writer: data written by the engine
 * at host offsets the driver hands out): every backend gives the same file,
 * byte for byte, and it reads back as the source. */
static void test_backends_same_qcow2(void **state)
{
    char src[PATH_MAX], dst[PATH_MAX], ref[PATH_MAX] = "", cmd[4 * PATH_MAX + 256];
    struct vimg_copy_opts o = { .sparse_size = 4096, .target_has_zero_init = true,
                                .fresh_target = true, .queue_depth = 4,
                                .buf_size = 1 * MiB };
    snprintf(src, sizeof(src), "%s/src.img", tmpdir);
    make_source(src);
    for (size_t i = 0; i < 3; i++) {
        struct vimg_aio *aio;
        struct vimg_error err = { 0 };

        setenv("VIMG_AIO", backend_env[i], 1);
        if (vimg_aio_new(&aio, VIMG_AIO_AUTO, 4) < 0) {
            print_message("backend %s unavailable here: not tested\n", backend_env[i]);
            continue;
        }
        vimg_aio_free(aio);
        snprintf(dst, sizeof(dst), "%s/dst-%s.qcow2", tmpdir, backend_env[i]);
        if (posix_copy_fmt(src, dst, "qcow2", &o, &err) < 0) {
            fail_msg("vimg_copy: %s", err.msg);
        }
        assert_string_equal(backend_env[i], vimg_internal_copy_backend());
        if (!ref[0]) {
            strcpy(ref, dst);
            /* the content, through qemu-img when it is here */
            snprintf(cmd, sizeof(cmd), "! command -v qemu-img >/dev/null || "
                     "{ qemu-img compare -q -f raw -F qcow2 '%s' '%s' && "
                     "qemu-img check -q '%s'; }", src, dst, dst);
            assert_int_equal(0, system(cmd));
        } else {
            snprintf(cmd, sizeof(cmd), "cmp -s '%s' '%s'", ref, dst);
            assert_int_equal(0, system(cmd));
        }
    }
    unsetenv("VIMG_AIO");
}

/* ASan handles SIGBUS itself unless told not to; then vimg's guard (and
 * the mapped path it protects) would be refused here. */
const char *__asan_default_options(void);
const char *__asan_default_options(void)
{
    return "handle_sigbus=0";
}

/* cmocka catches SIGBUS around each test, which makes vimg refuse its
 * mappings: these tests give the signal its default action back. */
static struct sigaction cmocka_bus;

static void bus_default(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = SIG_DFL;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &cmocka_bus);
}

static void bus_restore(void)
{
    sigaction(SIGBUS, &cmocka_bus, NULL);
}

/* Whether this process can map files (no foreign SIGBUS handler). */
static bool can_map(const char *path)
{
    struct vimg_file *f;
    struct vimg_fmap m;
    bool ok;

    assert_int_equal(0, vimg_file_open_posix(&f, path, 0));
    ok = 0 == vimg_fmap_open(&m, f);
    vimg_fmap_close(&m);
    vimg_file_close(f);
    return ok;
}

/* The mapping's guard: a page past the new end of a truncated file reads
 * as zeros and is reported, instead of killing the process. */
static void test_fmap_guard(void **state)
{
    char path[PATH_MAX];
    struct vimg_file *f;
    struct vimg_fmap m;
    uint8_t buf[65536];
    int fd;

    bus_default();
    snprintf(path, sizeof(path), "%s/fmap.img", tmpdir);
    memset(buf, 0x42, sizeof(buf));
    fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    assert_int_equal(sizeof(buf), pwrite(fd, buf, sizeof(buf), 0));
    assert_int_equal(0, vimg_file_open_posix(&f, path, 0));
    if (vimg_fmap_open(&m, f) < 0) {
        print_message("mappings refused here (a SIGBUS handler): not tested\n");
        vimg_file_close(f);
        close(fd);
        bus_restore();
        return;
    }
    vimg_fmap_clear();
    assert_true(vimg_fmap_resident(&m, 0, sizeof(buf)));
    assert_false(vimg_fmap_resident(&m, 4096, sizeof(buf)));   /* past the end */
    assert_int_equal(0x42, ((volatile const uint8_t *)m.base)[8192]);
    assert_false(vimg_fmap_faulted());
    assert_int_equal(0, ftruncate(fd, 4096));
    assert_int_equal(0x42, ((volatile const uint8_t *)m.base)[100]);
    assert_int_equal(0, ((volatile const uint8_t *)m.base)[8192]);
    assert_true(vimg_fmap_faulted());
    vimg_fmap_release(&m, 0, m.len);
    vimg_fmap_close(&m);
    vimg_fmap_clear();
    vimg_file_close(f);
    close(fd);
    bus_restore();
}

/* -c into qcow2: clusters compressed straight from the source's page
 * cache give the file that reading them first gives. */
static void test_mapped_source_same_result(void **state)
{
    char src[PATH_MAX], a[PATH_MAX], b[PATH_MAX], cmd[3 * PATH_MAX];

    bus_default();
    snprintf(src, sizeof(src), "%s/src-map.img", tmpdir);
    snprintf(a, sizeof(a), "%s/dst-map.qcow2", tmpdir);
    snprintf(b, sizeof(b), "%s/dst-nomap.qcow2", tmpdir);
    make_source(src);
    for (int nomap = 0; nomap < 2; nomap++) {
        struct vimg_copy_opts oc = { .sparse_size = 4096, .target_has_zero_init = true,
                                     .fresh_target = true, .compress = true };
        struct vimg_error err = { 0 };

        if (nomap) {
            setenv("VIMG_COPY_NO_MAP", "1", 1);
        }
        if (posix_copy_fmt(src, nomap ? b : a, "qcow2", &oc, &err) < 0) {
            fail_msg("vimg_copy -c: %s", err.msg);
        }
        unsetenv("VIMG_COPY_NO_MAP");
    }
    snprintf(cmd, sizeof(cmd), "cmp -s '%s' '%s'", a, b);
    assert_int_equal(0, system(cmd));
    snprintf(cmd, sizeof(cmd), "! command -v qemu-img >/dev/null || "
             "qemu-img compare -q -f raw -F qcow2 '%s' '%s'", src, a);
    assert_int_equal(0, system(cmd));
    bus_restore();
}

/* A source truncated by someone else while it is copied: an error naming
 * it, no crash. */
static const char *shrink_path;

static void shrink_progress(void *opaque, float pct)
{
    int *done = opaque;
    if (pct > 0 && !*done) {
        *done = 1;
        assert_int_equal(0, truncate(shrink_path, 2 * MiB));
    }
}

static void test_mapped_source_shrinks(void **state)
{
    char src[PATH_MAX], dst[PATH_MAX];
    int done = 0;
    /* one thread: clusters are compressed in order, after the truncation */
    struct vimg_copy_opts o = { .sparse_size = 4096, .target_has_zero_init = true,
                                .fresh_target = true, .compress = true, .threads = 1,
                                .progress = shrink_progress, .progress_opaque = &done };
    struct vimg_error err = { 0 };

    snprintf(src, sizeof(src), "%s/src-shrink.img", tmpdir);
    snprintf(dst, sizeof(dst), "%s/dst-shrink.qcow2", tmpdir);
    make_source(src);
    bus_default();
    if (!can_map(src)) {
        print_message("mappings refused here (a SIGBUS handler): not tested\n");
        bus_restore();
        return;
    }
    shrink_path = src;
    assert_int_equal(-EIO, posix_copy_fmt(src, dst, "qcow2", &o, &err));
    assert_non_null(strstr(err.msg, "shrank while it was being read"));
    assert_true(done);
    bus_restore();
}

static void test_direct_io(void **state)
{
    char src[PATH_MAX], dst[PATH_MAX];
    struct vimg_copy_opts o = { .sparse_size = 4096, .target_has_zero_init = true,
                                .fresh_target = true, .src_direct = true,
                                .dst_direct = true };
    snprintf(src, sizeof(src), "%s/src-direct.img", tmpdir);
    snprintf(dst, sizeof(dst), "%s/dst-direct.img", tmpdir);
    make_source(src);
    posix_copy(src, dst, &o);
    assert_same_content(src, dst);
}

static void test_copy_range_and_sparse_0(void **state)
{
    char src[PATH_MAX], dst[PATH_MAX];
    struct vimg_copy_opts o = { .sparse_size = 4096, .target_has_zero_init = true,
                                .fresh_target = true, .copy_range = true };
    snprintf(src, sizeof(src), "%s/src-cr.img", tmpdir);
    snprintf(dst, sizeof(dst), "%s/dst-cr.img", tmpdir);
    make_source(src);
    posix_copy(src, dst, &o);
    assert_same_content(src, dst);
    o.copy_range = false;
    o.sparse_size = 0;
    o.target_has_zero_init = false;
    posix_copy(src, dst, &o);
    assert_same_content(src, dst);
    struct stat st;
    assert_int_equal(0, stat(dst, &st));
    /* -S 0 allocates everything */
    assert_true((uint64_t)st.st_blocks * 512 >= POSIX_SIZE - 4096);
}

/* Peak RSS (KiB) of a child that runs fn: the parent's own peak would hide
 * the engine's. */
static long child_max_rss_kib(void (*fn)(void))
{
    struct rusage ru;
    int status;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (0 == pid) {
        fn();
        _exit(0);
    }
    assert_int_equal(pid, wait4(pid, &status, 0, &ru));
    assert_true(WIFEXITED(status));
    assert_int_equal(0, WEXITSTATUS(status));
    return ru.ru_maxrss;
}

static char tib_src[PATH_MAX], tib_dst[PATH_MAX];
#define TIB (1024ull * 1024 * MiB)

static void tib_baseline(void)
{
    struct vimg_error err = { 0 };
    struct vimg_image *s;
    if (vimg_open(&s, tib_src, "raw", 0, NULL, &err) < 0) {
        _exit(1);
    }
    vimg_close(s);
}

static void tib_copy(void)
{
    struct vimg_error err = { 0 };
    struct vimg_copy_opts o = { .sparse_size = 4096, .target_has_zero_init = true,
                                .fresh_target = true };
    struct vimg_opts *opts = vimg_opts_new();
    struct vimg_image *s, *d;
    vimg_opts_set(opts, "size", "1T");
    if (vimg_create(tib_dst, "raw", opts, &err) < 0 ||
        vimg_open(&s, tib_src, "raw", 0, NULL, &err) < 0 ||
        vimg_open(&d, tib_dst, "raw", VIMG_OPEN_RDWR, NULL, &err) < 0) {
        _exit(1);
    }
    vimg_opts_free(opts);
    struct vimg_image *srcs[] = { s };
    if (vimg_copy(srcs, 1, d, &o, &err) < 0) {
        _exit(2);
    }
    vimg_close(s);
    vimg_close(d);
}

static void test_1tib_sparse_bounded_memory(void **state)
{
    static uint8_t blk[4 * MiB];
    snprintf(tib_src, sizeof(tib_src), "%s/tib.img", tmpdir);
    snprintf(tib_dst, sizeof(tib_dst), "%s/tib-out.img", tmpdir);
    int fd = open(tib_src, O_RDWR | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    if (ftruncate(fd, (off_t)TIB) < 0) {
        close(fd);
        skip();
    }
    /* some dense stretches (64 MiB in all), so every buffer is used */
    memset(blk, 0xab, sizeof(blk));
    for (uint64_t off = 0; off < TIB; off += TIB / 4) {
        for (uint64_t k = 0; k < 16 * MiB; k += sizeof(blk)) {
            assert_int_equal(sizeof(blk),
                             pwrite(fd, blk, sizeof(blk), (off_t)(off + 7 * MiB + k)));
        }
    }
    close(fd);
    long base = child_max_rss_kib(tib_baseline);
    long peak = child_max_rss_kib(tib_copy);
    /* the bound of docs/performance.md: queue depth x 2 MiB buffers (8 MiB
     * by default) plus a fixed few hundred KiB; nothing grows with the image */
    print_message("peak RSS %ld KiB, %ld KiB above opening the source alone\n", peak,
                  peak - base);
    assert_true(peak - base < 16 * 1024);   /* 8 MiB + ASan shadow + slack */
    struct stat st;
    assert_int_equal(0, stat(tib_dst, &st));
    assert_int_equal(TIB, st.st_size);
    assert_true((uint64_t)st.st_blocks * 512 < 128 * MiB);
    unlink(tib_src);
    unlink(tib_dst);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_trace_zero_init),
        cmocka_unit_test(test_trace_existing_target),
        cmocka_unit_test(test_trace_sparse_0),
        cmocka_unit_test(test_trace_sparse_64k),
        cmocka_unit_test(test_trace_progress),
        cmocka_unit_test(test_target_too_small),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_compress_parallel_in_order),
        cmocka_unit_test(test_compress_serial),
        cmocka_unit_test(test_append_writer_trace),
        cmocka_unit_test(test_backends_same_result),
        cmocka_unit_test(test_backends_same_qcow2),
        cmocka_unit_test(test_fmap_guard),
        cmocka_unit_test(test_mapped_source_same_result),
        cmocka_unit_test(test_mapped_source_shrinks),
        cmocka_unit_test(test_direct_io),
        cmocka_unit_test(test_copy_range_and_sparse_0),
        cmocka_unit_test(test_1tib_sparse_bounded_memory),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

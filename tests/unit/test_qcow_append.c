/*
 * src/formats/qcow.c, the append-mode writer (alloc_data): where a fresh
 * qcow image's L2 tables and data clusters go (qemu's get_cluster_offset
 * layout), runs that start and end inside clusters or cross an L2 table,
 * the commit at flush and at close, what turns the writer off (a backing
 * file, a read-only or non-empty image, any other write), -EFBIG at the
 * largest offset an L2 entry can hold, and convert -c through the engine.
 */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <setjmp.h>
#include <cmocka.h>

#include "test_tmp.h"

#include "core/copy.h"
#include "core/image.h"
#include "core/opts.h"
#include "io/file.h"
#include "util/util.h"
#include "vimg/vimg.h"

#define CS 4096u
#define SPAN (512u * CS)   /* one L2 table of a qcow made without a backing file */

static int group_setup(void **state)
{
    return test_tmp_make("test_qcow_append");
}

static int group_teardown(void **state)
{
    return test_tmp_remove();
}

static void create_qcow(const char *path, const char *size, const char *backing)
{
    struct vimg_opts *o = vimg_opts_new();
    struct vimg_error err = { 0 };
    int ret;

    unlink(path);
    vimg_opts_set(o, "size", size);
    if (backing) {
        vimg_opts_set(o, "backing_file", backing);
        vimg_opts_set(o, "backing_fmt", "raw");
    }
    ret = vimg_create(path, "qcow", o, &err);
    vimg_opts_free(o);
    if (ret < 0) {
        print_error("vimg_create: %s\n", err.msg);
    }
    assert_int_equal(ret, 0);
}

static void check_model(struct vimg_image *img, const uint8_t *model, size_t size)
{
    struct vimg_error err = { 0 };
    uint8_t *buf = malloc(size);

    assert_non_null(buf);
    assert_int_equal(vimg_pread(img, buf, size, 0, &err), 0);
    assert_memory_equal(buf, model, size);
    free(buf);
}

/* Ask for [off, off+len), check the answer, write the bytes where it says
 * and into the model. */
static void put(struct vimg_image *img, uint8_t *model, uint64_t off, uint64_t len,
                uint64_t want_host, uint64_t want_len)
{
    struct vimg_error err = { 0 };
    struct vimg_run run = { 0 };
    uint8_t *buf = malloc(want_len);

    assert_non_null(buf);
    assert_int_equal(img->drv->alloc_data(img, off, len, &run, &err), 0);
    assert_int_equal(run.flags, VIMG_RUN_HOST_VALID);
    assert_ptr_equal(run.host, img->file);
    assert_int_equal(run.host_off, want_host);
    assert_int_equal(run.length, want_len);
    for (uint64_t i = 0; i < want_len; i++) {
        buf[i] = (uint8_t)((off + i) * 13 + 1);
    }
    assert_int_equal(vimg_file_pwrite(run.host, buf, (size_t)want_len, run.host_off), 0);
    memcpy(model + off, buf, (size_t)want_len);
    free(buf);
}

static int64_t file_size(const char *path)
{
    struct stat st;
    assert_int_equal(0, stat(path, &st));
    return st.st_size;
}

static void test_append_layout(void **state)
{
    enum { SIZE = 9 * 1024 * 1024 };
    static uint8_t model[SIZE];
    char path[PATH_MAX];
    struct vimg_image *img = NULL;
    struct vimg_error err = { 0 };
    struct vimg_run run = { 0 };

    snprintf(path, sizeof(path), "%s/layout.qcow", tmpdir);
    create_qcow(path, "9M", NULL);
    /* the 48-byte header and one sector of L1 */
    assert_int_equal(file_size(path), 560);
    assert_int_equal(vimg_open(&img, path, "qcow", VIMG_OPEN_RDWR, NULL, &err), 0);
    /* the first table at the end of the file rounded up, its first
     * cluster right after it; a run inside one cluster */
    put(img, model, 4608, 3000, 2 * CS + 512, 3000);
    /* the rest of that cluster, and a new one after it: contiguous */
    put(img, model, 7680, 1024, 2 * CS + 3584, 1024);
    /* a run over the end of the first table's span stops there ... */
    put(img, model, SPAN - 512, 8192, 5 * CS - 512, 512);
    /* ... and the next span gets its table before its first cluster */
    put(img, model, SPAN, 7680, 6 * CS, 7680);
    /* whole spans skipped cost nothing; a cluster past the last whole one */
    put(img, model, 4 * SPAN + 4096, 2 * CS, 9 * CS, 2 * CS);
    put(img, model, SIZE - 1024, 1024, 11 * CS + 3072, 1024);
    /* back to an earlier table: refused */
    assert_int_equal(img->drv->alloc_data(img, 2 * SPAN - CS, 3 * CS, &run, &err), -EINVAL);
    assert_int_equal(err.code, EINVAL);
    vimg_error_clear(&err);
    assert_int_equal(vimg_flush(img, &err), 0);
    /* every cluster handed out is in the file, the unwritten part a hole */
    assert_int_equal(file_size(path), 12 * CS);
    check_model(img, model, SIZE);
    vimg_close(img);

    assert_int_equal(vimg_open(&img, path, NULL, 0, NULL, &err), 0);
    check_model(img, model, SIZE);
    struct vimg_status st;
    assert_int_equal(vimg_block_status(img, SPAN, CS, &st, &err), 0);
    assert_true(st.flags & VIMG_STATUS_DATA);
    assert_int_equal(vimg_block_status(img, 2 * SPAN, CS, &st, &err), 0);
    assert_false(st.flags & VIMG_STATUS_DATA);
    vimg_close(img);
}

/* Closing without a flush commits too. */
static void test_append_close_commits(void **state)
{
    enum { SIZE = 3 * 1024 * 1024 };
    static uint8_t model[SIZE];
    char path[PATH_MAX];
    struct vimg_image *img = NULL;
    struct vimg_error err = { 0 };

    snprintf(path, sizeof(path), "%s/close.qcow", tmpdir);
    create_qcow(path, "3M", NULL);
    assert_int_equal(vimg_open(&img, path, "qcow", VIMG_OPEN_RDWR, NULL, &err), 0);
    put(img, model, 0, 1024 * 1024, 2 * CS, 1024 * 1024);
    put(img, model, SPAN + 512, 512, SPAN / 2 + 3 * CS + 512, 512);
    vimg_close(img);
    assert_int_equal(file_size(path), SPAN / 2 + 4 * CS);
    assert_int_equal(vimg_open(&img, path, NULL, 0, NULL, &err), 0);
    check_model(img, model, SIZE);
    vimg_close(img);
}

static void expect_enotsup(struct vimg_image *img, uint64_t off)
{
    struct vimg_error err = { 0 };
    struct vimg_run run = { 0 };

    assert_int_equal(img->drv->alloc_data(img, off, 512, &run, &err), -ENOTSUP);
    /* the engine falls back quietly */
    assert_int_equal(err.code, 0);
}

static void test_append_fallbacks(void **state)
{
    enum { SIZE = 1024 * 1024 };
    static uint8_t model[SIZE];
    char path[PATH_MAX], base[PATH_MAX];
    struct vimg_image *img = NULL;
    struct vimg_error err = { 0 };
    FILE *f;

    snprintf(path, sizeof(path), "%s/fb.qcow", tmpdir);
    snprintf(base, sizeof(base), "%s/base.raw", tmpdir);

    /* read-only */
    create_qcow(path, "1M", NULL);
    assert_int_equal(vimg_open(&img, path, "qcow", 0, NULL, &err), 0);
    expect_enotsup(img, 0);
    vimg_close(img);

    /* a backing file: copy-on-write is the normal path's */
    f = fopen(base, "w");
    assert_non_null(f);
    assert_int_equal(0, ftruncate(fileno(f), SIZE));
    fclose(f);
    create_qcow(path, "1M", "base.raw");
    assert_int_equal(vimg_open(&img, path, "qcow", VIMG_OPEN_RDWR, NULL, &err), 0);
    expect_enotsup(img, 0);
    vimg_close(img);

    /* a write first: the writer never starts */
    create_qcow(path, "1M", NULL);
    assert_int_equal(vimg_open(&img, path, "qcow", VIMG_OPEN_RDWR, NULL, &err), 0);
    assert_int_equal(vimg_pwrite(img, "abc", 3, 100, &err), 0);
    expect_enotsup(img, 8192);
    vimg_close(img);

    /* ... and on reopening the image is not empty */
    assert_int_equal(vimg_open(&img, path, "qcow", VIMG_OPEN_RDWR, NULL, &err), 0);
    expect_enotsup(img, 8192);
    vimg_close(img);

    /* a write after alloc_data commits first, then the writer is off */
    memset(model, 0, sizeof(model));
    create_qcow(path, "1M", NULL);
    assert_int_equal(vimg_open(&img, path, "qcow", VIMG_OPEN_RDWR, NULL, &err), 0);
    put(img, model, 8192, 6000, 2 * CS, 6000);
    assert_int_equal(vimg_pwrite(img, "xyz", 3, 20000, &err), 0);
    memcpy(model + 20000, "xyz", 3);
    /* into the unwritten tail of a cluster the writer handed out */
    assert_int_equal(vimg_pwrite(img, "tail", 4, 8192 + 7000, &err), 0);
    memcpy(model + 8192 + 7000, "tail", 4);
    check_model(img, model, SIZE);
    expect_enotsup(img, 65536);
    /* the normal path appended after the writer's clusters */
    assert_int_equal(file_size(path), 5 * CS);
    vimg_close(img);
    assert_int_equal(vimg_open(&img, path, NULL, 0, NULL, &err), 0);
    check_model(img, model, SIZE);
    vimg_close(img);

    /* a compressed write commits as well */
    memset(model, 0, sizeof(model));
    create_qcow(path, "1M", NULL);
    assert_int_equal(vimg_open(&img, path, "qcow", VIMG_OPEN_RDWR, NULL, &err), 0);
    put(img, model, 0, 512, 2 * CS, 512);
    memset(model + 4 * CS, 'c', CS);
    assert_int_equal(img->drv->write_compressed(img, model + 4 * CS, CS, 4 * CS, &err), 0);
    check_model(img, model, SIZE);
    expect_enotsup(img, 65536);
    vimg_close(img);
    assert_int_equal(vimg_open(&img, path, NULL, 0, NULL, &err), 0);
    check_model(img, model, SIZE);
    vimg_close(img);
}

/* ---- a host file at the edge of what an L2 entry can hold ---------------- */

struct huge_file {
    struct vimg_file base;
    uint8_t head[1024];      /* header and L1; everything else reads as zeros */
    int64_t size;
};

static int huge_pread(struct vimg_file *f, void *buf, size_t len, uint64_t off)
{
    struct huge_file *h = (struct huge_file *)f;
    memset(buf, 0, len);
    if (off < sizeof(h->head)) {
        memcpy(buf, h->head + off, VIMG_MIN(len, sizeof(h->head) - off));
    }
    return 0;
}

static int huge_pwrite(struct vimg_file *f, const void *buf, size_t len, uint64_t off)
{
    struct huge_file *h = (struct huge_file *)f;
    if (off < sizeof(h->head)) {
        memcpy(h->head + off, buf, VIMG_MIN(len, sizeof(h->head) - off));
    }
    if (off + len > (uint64_t)h->size) {
        h->size = (int64_t)(off + len);
    }
    return 0;
}

static int64_t huge_size(struct vimg_file *f)
{
    return ((struct huge_file *)f)->size;
}

static int huge_truncate(struct vimg_file *f, uint64_t size)
{
    ((struct huge_file *)f)->size = (int64_t)size;
    return 0;
}

static int huge_sync(struct vimg_file *f)
{
    return 0;
}

static void huge_close(struct vimg_file *f)
{
}

static const struct vimg_file_ops huge_ops = {
    .pread = huge_pread,
    .pwrite = huge_pwrite,
    .size = huge_size,
    .truncate = huge_truncate,
    .sync = huge_sync,
    .close = huge_close,
};

static struct vimg_image *open_huge(int64_t size, struct huge_file **out)
{
    struct huge_file *h = calloc(1, sizeof(*h));
    struct vimg_image *img = NULL;
    struct vimg_error err = { 0 };

    assert_non_null(h);
    h->base.ops = &huge_ops;
    h->base.name = strdup("huge.qcow");
    h->base.fd = -1;
    h->base.writable = true;
    h->size = size;
    /* a fresh 8M qcow: 4 KiB clusters, 512-entry tables, L1 at 48 */
    vimg_st_be32(h->head, 0x514649fb);
    vimg_st_be32(h->head + 4, 1);
    vimg_st_be64(h->head + 24, 8 * 1024 * 1024);
    h->head[32] = 12;
    h->head[33] = 9;
    vimg_st_be64(h->head + 40, 48);
    if (vimg_internal_open_file(&img, &h->base, "qcow", VIMG_OPEN_RDWR, &err) < 0) {
        fail_msg("open: %s", err.msg);
    }
    *out = h;
    return img;
}

static void test_append_efbig(void **state)
{
    const uint64_t top = (uint64_t)INT64_MAX + 1;   /* 2^63: bit 63 flags compression */
    struct vimg_image *img;
    struct huge_file *h;
    struct vimg_error err = { 0 };
    struct vimg_run run = { 0 };

    /* room for the table, none for a cluster after it */
    img = open_huge((int64_t)(top - 2 * CS), &h);
    assert_int_equal(img->drv->alloc_data(img, 0, CS, &run, &err), -EFBIG);
    assert_int_equal(err.code, EFBIG);
    assert_non_null(strstr(err.msg, "huge.qcow"));
    vimg_close(img);

    /* room for one cluster: a two-cluster request gets the first only,
     * the next call fails */
    img = open_huge((int64_t)(top - 3 * CS - 100), &h);
    vimg_error_clear(&err);
    assert_int_equal(img->drv->alloc_data(img, 0, 2 * CS, &run, &err), 0);
    assert_int_equal(run.host_off, top - 2 * CS);
    assert_int_equal(run.length, CS);
    assert_int_equal(err.code, 0);
    assert_int_equal(img->drv->alloc_data(img, CS, CS, &run, &err), -EFBIG);
    assert_int_equal(err.code, EFBIG);
    vimg_error_clear(&err);
    /* what was handed out is committed: L1 entry 0 names the table */
    assert_int_equal(vimg_flush(img, &err), 0);
    assert_int_equal(vimg_ld_be64(h->head + 48), top - 3 * CS);
    assert_int_equal(h->size, (int64_t)(top - CS));
    vimg_close(img);
}

/* ---- convert -c through the engine --------------------------------------- */

static void test_append_compressed_convert(void **state)
{
    enum { SIZE = 3 * 1024 * 1024 };
    static uint8_t data[SIZE], back[SIZE];
    char src[PATH_MAX], dst[PATH_MAX], ref[PATH_MAX], cmd[4 * PATH_MAX + 256];
    struct vimg_copy_opts o = { .sparse_size = 4096, .target_has_zero_init = true,
                                .fresh_target = true, .compress = true };
    struct vimg_image *s, *d;
    struct vimg_error err = { 0 };
    uint32_t x = 12345;
    FILE *f;

    /* compressible text, incompressible noise (stored plainly), a hole,
     * and noise across the end of the first L2 span */
    for (size_t i = 0; i < 700000; i++) {
        data[i] = (uint8_t)("qcow append "[i % 12]);
    }
    for (size_t i = 800000; i < 900000; i++) {
        x = x * 1103515245u + 12345u;
        data[i] = (uint8_t)(x >> 16);
    }
    for (size_t i = SPAN - 10000; i < SPAN + 30000; i++) {
        x = x * 1103515245u + 12345u;
        data[i] = (uint8_t)(x >> 16);
    }
    snprintf(src, sizeof(src), "%s/c-src.raw", tmpdir);
    snprintf(dst, sizeof(dst), "%s/c-dst.qcow", tmpdir);
    snprintf(ref, sizeof(ref), "%s/c-ref.qcow", tmpdir);
    f = fopen(src, "w");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, SIZE, f), SIZE);
    fclose(f);
    create_qcow(dst, "3M", NULL);
    assert_int_equal(0, vimg_open(&s, src, "raw", 0, NULL, &err));
    assert_int_equal(0, vimg_open(&d, dst, "qcow", VIMG_OPEN_RDWR, NULL, &err));
    struct vimg_image *srcs[] = { s };
    if (vimg_copy(srcs, 1, d, &o, &err) < 0) {
        fail_msg("vimg_copy: %s", err.msg);
    }
    vimg_close(s);
    vimg_close(d);
    assert_int_equal(0, vimg_open(&d, dst, NULL, 0, NULL, &err));
    assert_int_equal(0, vimg_pread(d, back, SIZE, 0, &err));
    assert_memory_equal(back, data, SIZE);
    struct vimg_status st;
    assert_int_equal(vimg_block_status(d, 0, CS, &st, &err), 0);
    assert_true(st.flags & VIMG_STATUS_COMPRESSED);
    vimg_close(d);
    /* the file qemu-img writes (it exits 1 after its last, zero-length
     * compressed write, which qcow refuses; the file is complete) */
    snprintf(cmd, sizeof(cmd), "! command -v qemu-img >/dev/null || "
             "{ qemu-img convert -c -O qcow '%s' '%s' 2>/dev/null; cmp '%s' '%s'; }",
             src, ref, ref, dst);
    assert_int_equal(0, system(cmd));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_append_layout),
        cmocka_unit_test(test_append_close_commits),
        cmocka_unit_test(test_append_fallbacks),
        cmocka_unit_test(test_append_efbig),
        cmocka_unit_test(test_append_compressed_convert),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

/*
 * src/core/copy.c: qemu-img's zero split (is_allocated_sectors_min) and the
 * copy engine end to end on raw files.  The expected layout of the copy is
 * what `qemu-img convert -f raw -O raw` (default -S 4k) of the same input
 * produced, as shown by `qemu-img map --output=json -f raw`:
 *   data [0,4K) [8K,12K) [20K,28K) [64K,68K), holes everywhere else.
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
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <setjmp.h>
#include <cmocka.h>

#include "test_tmp.h"

#include "core/copy.h"
#include "vimg/vimg.h"

#define SECTOR 512
#define KiB 1024

/* ---- zero split ---------------------------------------------------------- */

/* A buffer described one sector per character: 'D' data, '_' zero. */
static uint8_t *sectors(const char *pattern, int *n)
{
    size_t len = strlen(pattern);
    uint8_t *buf = calloc(len ? len : 1, SECTOR);
    assert_non_null(buf);
    for (size_t i = 0; i < len; i++) {
        if ('D' == pattern[i]) {
            /* one nonzero byte in the middle is enough to be data */
            buf[i * SECTOR + 200] = 0x5A;
        }
    }
    *n = (int)len;
    return buf;
}

static void split(const char *pattern, int min, int64_t sector, int alignment,
                  int expect_ret, int expect_pnum)
{
    int n, pnum = -1;
    uint8_t *buf = sectors(pattern, &n);
    int ret = vimg_internal_zero_split(buf, n, &pnum, min, sector, alignment);
    free(buf);
    if (ret != expect_ret || pnum != expect_pnum) {
        fail_msg("split(\"%s\", min=%d, sector=%lld, align=%d) = (%d, %d), "
                 "expected (%d, %d)", pattern, min, (long long)sector, alignment,
                 ret, pnum, expect_ret, expect_pnum);
    }
}

static void test_copy_split_all_zero(void **state)
{
    split("________________", 8, 0, 8, 0, 16);
    split("_", 8, 0, 8, 0, 1);
    split("___", 8, 5, 8, 0, 3);
}

static void test_copy_split_all_data(void **state)
{
    split("DDDDDDDDDDDDDDDD", 8, 0, 8, 1, 16);
    split("D", 8, 3, 8, 1, 1);
    /* a whole buffer of one kind is not aligned further */
    split("DDD", 8, 1, 8, 1, 3);
}

static void test_copy_split_empty(void **state)
{
    int pnum = -1;
    uint8_t b[SECTOR] = { 0 };
    assert_int_equal(vimg_internal_zero_split(b, 0, &pnum, 8, 0, 8), 0);
    assert_int_equal(pnum, 0);
}

static void test_copy_split_data_then_long_zero(void **state)
{
    /* data ends mid-block: it is extended to the block end (sector 8),
     * then the zero run of 8 >= min ends the data */
    split("DDDD____________", 8, 0, 8, 1, 8);
    /* the rest, taken on its own: a hole */
    split("________", 8, 8, 8, 0, 8);
    /* aligned data end: nothing to extend */
    split("DDDDDDDD________", 8, 0, 8, 1, 8);
}

static void test_copy_split_short_gap_absorbed(void **state)
{
    /* a 4-sector gap < min=8 inside data is written as data */
    split("DDDDDDDD____DDDDDDDDDDDD________________", 8, 0, 1, 1, 24);
    /* a gap of exactly min is not absorbed */
    split("DDDDDDDD________DDDD", 8, 0, 1, 1, 8);
    /* several short gaps */
    split("DD___DD___DD______", 4, 0, 1, 1, 12);
    /* zeros at the very end, shorter than min: not part of the data run */
    split("DDDDDDDD__", 8, 0, 1, 1, 8);
}

static void test_copy_split_zero_mid_block_becomes_data(void **state)
{
    /* a zero run that ends inside an alignment block, shorter than the
     * block's head: the RMW would rewrite it anyway, so it is data */
    split("___DDDDD________", 8, 0, 8, 1, 8);
    /* the 512-byte zero sector at 24K in the end-to-end pattern */
    split("_DDDDDDD", 8, 48, 8, 1, 8);
    /* a longer zero run is cut back to the block boundary */
    split("___________DDDDD", 8, 0, 8, 0, 8);
    split("___DDDDD", 8, 8, 8, 1, 8);
}

static void test_copy_split_alignment_from_sector(void **state)
{
    /* data at sector 5..6: its end moves to sector 8 (3 sectors) */
    split("DD______________", 8, 5, 8, 1, 3);
    /* data from sector 128 (64K): one sector becomes a 4K write */
    split("D_______________________", 8, 128, 8, 1, 8);
    /* alignment 1: no moving at all */
    split("DD______________", 8, 5, 1, 1, 2);
}

static void test_copy_split_min_clamped_to_n(void **state)
{
    /* n=4 < min=8: min becomes 4, and 3 trailing zeros stay out */
    split("D___", 8, 0, 1, 1, 1);
    split("D___D", 8, 0, 1, 1, 5);
}

/* ---- end to end ---------------------------------------------------------- */


static int setup_tmp(void **state)
{
    return test_tmp_make("test_copy_split");
}

static int teardown_tmp(void **state)
{
    return test_tmp_remove();
}

static void path(char *out, size_t len, const char *name)
{
    snprintf(out, len, "%s/%s", tmpdir, name);
}

#define IMG_SIZE (128 * KiB)

/* 4K data, 4K zero, 4K data, 8K zero, 4K data, 512 zero, 3.5K data, zeros to
 * 64K, 512 data at 64K, zeros to 128K. */
static uint8_t *pattern(void)
{
    uint8_t *b = calloc(1, IMG_SIZE);
    assert_non_null(b);
    memset(b + 0, 0xA1, 4 * KiB);
    memset(b + 8 * KiB, 0xB2, 4 * KiB);
    memset(b + 20 * KiB, 0xC3, 4 * KiB);
    memset(b + 24 * KiB + 512, 0xD4, 3 * KiB + 512);
    memset(b + 64 * KiB, 0xE5, 512);
    /* make each sector distinct, so a misplaced write shows */
    for (size_t off = 0; off < IMG_SIZE; off += SECTOR) {
        if (b[off]) {
            b[off + 1] = (uint8_t)(off / SECTOR);
        }
    }
    return b;
}

/* Write the file: whole (every byte written, the zeros too) or sparse
 * (only the data parts written into a truncated file). */
static void write_source(const char *name, const uint8_t *b, bool sparse)
{
    int fd = open(name, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    assert_true(fd >= 0);
    if (sparse) {
        assert_int_equal(ftruncate(fd, IMG_SIZE), 0);
        for (size_t off = 0; off < IMG_SIZE; off += SECTOR) {
            bool zero = true;
            for (size_t i = 0; i < SECTOR; i++) {
                zero = zero && !b[off + i];
            }
            if (!zero) {
                assert_int_equal(pwrite(fd, b + off, SECTOR, (off_t)off), SECTOR);
            }
        }
    } else {
        assert_int_equal(pwrite(fd, b, IMG_SIZE, 0), IMG_SIZE);
    }
    assert_int_equal(close(fd), 0);
}

/* Does the file system of tmpdir report holes? */
static bool fs_has_holes(void)
{
    char p[PATH_MAX];
    bool ok;
    int fd;

    path(p, sizeof(p), "holeprobe");
    fd = open(p, O_CREAT | O_TRUNC | O_RDWR, 0644);
    assert_true(fd >= 0);
    assert_int_equal(ftruncate(fd, 1024 * KiB), 0);
    assert_int_equal(pwrite(fd, "x", 1, 1024 * KiB - 1), 1);
    ok = lseek(fd, 0, SEEK_DATA) > 0;
    close(fd);
    unlink(p);
    return ok;
}

struct extent {
    off_t start, end;
};

/* The data extents of a file, by SEEK_DATA / SEEK_HOLE. */
static int data_extents(const char *name, struct extent *ex, int max)
{
    int fd = open(name, O_RDONLY);
    int n = 0;
    off_t off = 0;
    struct stat st;

    assert_true(fd >= 0);
    assert_int_equal(fstat(fd, &st), 0);
    while (off < st.st_size) {
        off_t d = lseek(fd, off, SEEK_DATA);
        if (d < 0) {
            break;
        }
        off_t h = lseek(fd, d, SEEK_HOLE);
        assert_true(h > d);
        assert_true(n < max);
        ex[n].start = d;
        ex[n].end = h;
        n++;
        off = h;
    }
    close(fd);
    return n;
}

static void check_content(const char *name, const uint8_t *expected, size_t len)
{
    uint8_t *got = malloc(len + 1);
    int fd = open(name, O_RDONLY);
    struct stat st;

    assert_non_null(got);
    assert_true(fd >= 0);
    assert_int_equal(fstat(fd, &st), 0);
    assert_int_equal(st.st_size, len);
    assert_int_equal(pread(fd, got, len + 1, 0), len);
    close(fd);
    int same = 0 == memcmp(got, expected, len);
    free(got);
    assert_true(same);
}

static float last_percent;
static int progress_calls;
static bool progress_monotonic;

static void progress(void *opaque, float percent)
{
    assert_ptr_equal(opaque, &last_percent);
    if (percent + 0.001f < last_percent) {
        progress_monotonic = false;
    }
    last_percent = percent;
    progress_calls++;
}

/* Copy src to a new raw target through the public API. */
static void convert(const char *src, const char *dst, uint64_t sparse_size,
                    uint64_t buf_size)
{
    struct vimg_image *in = NULL, *out = NULL;
    struct vimg_opts *opts = vimg_opts_new();
    struct vimg_error err = { 0 };
    char size[32];

    assert_non_null(opts);
    snprintf(size, sizeof(size), "%d", IMG_SIZE);
    assert_int_equal(vimg_opts_set(opts, "size", size), 0);
    assert_int_equal(vimg_create(dst, "raw", opts, &err), 0);
    vimg_opts_free(opts);
    assert_int_equal(vimg_open(&in, src, "raw", 0, NULL, &err), 0);
    assert_int_equal(vimg_open(&out, dst, "raw", VIMG_OPEN_RDWR, NULL, &err), 0);
    assert_int_equal(vimg_size(in), IMG_SIZE);
    assert_int_equal(vimg_size(out), IMG_SIZE);

    struct vimg_copy_opts o = {
        .sparse_size = sparse_size,
        .target_has_zero_init = true,
        .buf_size = buf_size,
        .progress = progress,
        .progress_opaque = &last_percent,
    };
    last_percent = 0;
    progress_calls = 0;
    progress_monotonic = true;
    int ret = vimg_copy(&in, 1, out, &o, &err);
    if (ret < 0) {
        print_error("vimg_copy: %s\n", err.msg);
    }
    assert_int_equal(ret, 0);
    assert_int_equal(err.code, 0);
    vimg_close(in);
    vimg_close(out);
    assert_true(progress_calls > 0);
    assert_true(progress_monotonic);
    assert_true(last_percent > 99.99f && last_percent < 100.01f);
}

/* What qemu-img convert -S 4k made of the pattern. */
static const struct extent qemu_layout[] = {
    { 0, 4 * KiB }, { 8 * KiB, 12 * KiB }, { 20 * KiB, 28 * KiB },
    { 64 * KiB, 68 * KiB },
};

static void check_layout(const char *dst)
{
    struct extent ex[64];
    int n = data_extents(dst, ex, 64);
    bool same = n == (int)(sizeof(qemu_layout) / sizeof(qemu_layout[0]));

    for (int i = 0; same && i < n; i++) {
        same = ex[i].start == qemu_layout[i].start && ex[i].end == qemu_layout[i].end;
    }
    if (!same) {
        for (int i = 0; i < n; i++) {
            print_error("data [%lld, %lld)\n", (long long)ex[i].start, (long long)ex[i].end);
        }
    }
    assert_true(same);
}

static void run_e2e(bool sparse_source, uint64_t buf_size)
{
    char src[PATH_MAX], dst[PATH_MAX];
    uint8_t *b = pattern();

    path(src, sizeof(src), sparse_source ? "src-sparse.raw" : "src.raw");
    path(dst, sizeof(dst), "dst.raw");
    unlink(dst);
    write_source(src, b, sparse_source);
    convert(src, dst, 4096, buf_size);
    check_content(dst, b, IMG_SIZE);
    free(b);
    if (!fs_has_holes()) {
        skip();
    }
    check_layout(dst);
}

static void test_copy_split_e2e_written_zeros(void **state)
{
    run_e2e(false, 0);
}

static void test_copy_split_e2e_sparse_source(void **state)
{
    run_e2e(true, 0);
}

static void test_copy_split_e2e_small_buffer(void **state)
{
    /* 4K requests: every chunk is split on its own, same result */
    run_e2e(false, 4096);
}

static void test_copy_split_e2e_no_sparse(void **state)
{
    /* -S 0: every byte is written, nothing stays a hole (qemu-img convert
     * -S 0 gives a single data extent over the whole file) */
    char src[PATH_MAX], dst[PATH_MAX];
    struct extent ex[64];
    uint8_t *b = pattern();

    path(src, sizeof(src), "src.raw");
    path(dst, sizeof(dst), "dst0.raw");
    unlink(dst);
    write_source(src, b, false);
    convert(src, dst, 0, 0);
    check_content(dst, b, IMG_SIZE);
    free(b);
    if (!fs_has_holes()) {
        skip();
    }
    int n = data_extents(dst, ex, 64);
    assert_int_equal(n, 1);
    assert_int_equal(ex[0].start, 0);
    assert_int_equal(ex[0].end, IMG_SIZE);
}

static void test_copy_split_e2e_concatenation(void **state)
{
    char a[PATH_MAX], bpath[PATH_MAX], dst[PATH_MAX];
    struct vimg_image *srcs[2] = { NULL, NULL }, *out = NULL;
    struct vimg_opts *opts = vimg_opts_new();
    struct vimg_error err = { 0 };
    uint8_t *b = pattern();
    int fd;

    path(a, sizeof(a), "half-a.raw");
    path(bpath, sizeof(bpath), "half-b.raw");
    path(dst, sizeof(dst), "cat.raw");
    unlink(dst);
    fd = open(a, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    assert_true(fd >= 0);
    assert_int_equal(pwrite(fd, b, IMG_SIZE / 2, 0), IMG_SIZE / 2);
    close(fd);
    fd = open(bpath, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    assert_true(fd >= 0);
    assert_int_equal(pwrite(fd, b + IMG_SIZE / 2, IMG_SIZE / 2, 0), IMG_SIZE / 2);
    close(fd);

    assert_non_null(opts);
    assert_int_equal(vimg_opts_set(opts, "size", "128k"), 0);
    assert_int_equal(vimg_create(dst, "raw", opts, &err), 0);
    vimg_opts_free(opts);
    assert_int_equal(vimg_open(&srcs[0], a, "raw", 0, NULL, &err), 0);
    assert_int_equal(vimg_open(&srcs[1], bpath, "raw", 0, NULL, &err), 0);
    assert_int_equal(vimg_open(&out, dst, "raw", VIMG_OPEN_RDWR, NULL, &err), 0);
    struct vimg_copy_opts o = { .sparse_size = 4096, .target_has_zero_init = true };
    assert_int_equal(vimg_copy(srcs, 2, out, &o, &err), 0);
    vimg_close(srcs[0]);
    vimg_close(srcs[1]);
    vimg_close(out);
    check_content(dst, b, IMG_SIZE);
    free(b);
    if (!fs_has_holes()) {
        skip();
    }
    check_layout(dst);
}

/* Without zero init the zero parts are written as zeroes (may unmap): the
 * content is still exact over a target full of junk. */
static void test_copy_split_e2e_no_zero_init(void **state)
{
    char src[PATH_MAX], dst[PATH_MAX];
    struct vimg_image *in = NULL, *out = NULL;
    struct vimg_error err = { 0 };
    uint8_t *b = pattern();
    uint8_t *junk = malloc(IMG_SIZE);
    int fd;

    assert_non_null(junk);
    memset(junk, 0xFF, IMG_SIZE);
    path(src, sizeof(src), "src.raw");
    path(dst, sizeof(dst), "junk.raw");
    write_source(src, b, false);
    fd = open(dst, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    assert_true(fd >= 0);
    assert_int_equal(pwrite(fd, junk, IMG_SIZE, 0), IMG_SIZE);
    close(fd);
    free(junk);

    assert_int_equal(vimg_open(&in, src, "raw", 0, NULL, &err), 0);
    assert_int_equal(vimg_open(&out, dst, "raw", VIMG_OPEN_RDWR, NULL, &err), 0);
    struct vimg_copy_opts o = { .sparse_size = 4096, .target_has_zero_init = false };
    assert_int_equal(vimg_copy(&in, 1, out, &o, &err), 0);
    vimg_close(in);
    vimg_close(out);
    check_content(dst, b, IMG_SIZE);
    free(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_copy_split_all_zero),
        cmocka_unit_test(test_copy_split_all_data),
        cmocka_unit_test(test_copy_split_empty),
        cmocka_unit_test(test_copy_split_data_then_long_zero),
        cmocka_unit_test(test_copy_split_short_gap_absorbed),
        cmocka_unit_test(test_copy_split_zero_mid_block_becomes_data),
        cmocka_unit_test(test_copy_split_alignment_from_sector),
        cmocka_unit_test(test_copy_split_min_clamped_to_n),
        cmocka_unit_test(test_copy_split_e2e_written_zeros),
        cmocka_unit_test(test_copy_split_e2e_sparse_source),
        cmocka_unit_test(test_copy_split_e2e_small_buffer),
        cmocka_unit_test(test_copy_split_e2e_no_sparse),
        cmocka_unit_test(test_copy_split_e2e_concatenation),
        cmocka_unit_test(test_copy_split_e2e_no_zero_init),
    };
    return cmocka_run_group_tests(tests, setup_tmp, teardown_tmp);
}

/*
 * vmdk reads and writes through the public API, on fixtures built from the
 * spec (tests/images/make_vmdk_fixtures.py) and on images vimg creates,
 * with the qemu 7.2 bugs vimg must not copy: a write into a grain whose GT
 * is missing (qemu overwrote the header), copy-on-write in the 2nd extent
 * of a split image (qemu read the wrong backing offset), appending to a
 * VMware-style stream (qemu lost the footer), a zero-size image (qemu
 * cannot reopen it).
 */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
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

#include "core/image.h"
#include "util/util.h"
#include "vimg/vimg.h"

#define KiB 1024ull
#define MiB (1024ull * 1024)
#define GiB (1024ull * MiB)

static char src[PATH_MAX - 128];

static int group_setup(void **state)
{
    const char *slash;
    if (test_tmp_make("test_vmdk_io") < 0) {
        return -1;
    }
    snprintf(src, sizeof(src), "%s", __FILE__);
    slash = strrchr(src, '/');
    if (!slash) {
        return -1;
    }
    snprintf(src + (slash - src), sizeof(src) - (size_t)(slash - src), "/../images");
    return 0;
}

static int group_teardown(void **state)
{
    return test_tmp_remove();
}

static void copy_fixture(const char *name, char *out, size_t outlen)
{
    char cmd[3 * PATH_MAX];
    snprintf(out, outlen, "%s/%s", tmpdir, name);
    snprintf(cmd, sizeof(cmd), "cp '%s/%s' '%s'", src, name, out);
    assert_int_equal(0, system(cmd));
}

/* mkimage.py's pattern: letter repeated, block offset in the first 8 bytes. */
static void pattern(uint8_t *b, char letter, uint64_t off, size_t n)
{
    for (size_t i = 0; i < n; i += 512) {
        memset(b + i, letter, 512);
        for (int k = 0; k < 8; k++) {
            b[i + k] = (uint8_t)((off + i) >> (8 * k));
        }
    }
}

static struct vimg_image *open_img(const char *path, unsigned flags)
{
    struct vimg_error err = { 0 };
    struct vimg_image *img = NULL;
    int ret = vimg_open(&img, path, NULL, flags, NULL, &err);
    if (ret < 0) {
        fail_msg("open %s: %s", path, err.msg);
    }
    return img;
}

static void create(const char *path, const char *optstr)
{
    struct vimg_error err = { 0 };
    struct vimg_opts *o = vimg_opts_new();
    assert_non_null(o);
    assert_int_equal(0, vimg_opts_parse(o, optstr, &err));
    if (vimg_create(path, "vmdk", o, &err) < 0) {
        fail_msg("create %s: %s", path, err.msg);
    }
    vimg_opts_free(o);
}

static void test_vmdk_read_vmware_stream(void **state)
{
    char path[PATH_MAX];
    struct vimg_error err = { 0 };
    uint8_t *got = malloc(64 * KiB), *want = malloc(64 * KiB);
    struct vimg_image *img;

    snprintf(path, sizeof(path), "%s/vmdk-vmware-stream.vmdk", src);
    img = open_img(path, 0);
    assert_int_equal(1 * MiB, vimg_size(img));
    assert_int_equal(0, vimg_pread(img, got, 64 * KiB, 0, &err));
    pattern(want, 'A', 0, 64 * KiB);
    assert_memory_equal(want, got, 64 * KiB);
    assert_int_equal(0, vimg_pread(img, got, 64 * KiB, 8 * 64 * KiB, &err));
    pattern(want, 'C', 8 * 64 * KiB, 64 * KiB);
    assert_memory_equal(want, got, 64 * KiB);
    assert_int_equal(0, vimg_pread(img, got, 4096, 4 * 64 * KiB, &err));
    memset(want, 0, 4096);
    assert_memory_equal(want, got, 4096);
    vimg_close(img);
    free(got);
    free(want);
}

/* The other layouts built from the spec: COWD (vmfsSparse), seSparse,
 * CRLF descriptor with skipped RDONLY/NOACCESS/ZERO lines, vmfs. */
static void expect_pattern(struct vimg_image *img, uint64_t off, size_t n, char letter,
                           uint64_t pat_off)
{
    struct vimg_error err = { 0 };
    uint8_t *got = malloc(n), *want = malloc(n);
    assert_int_equal(0, vimg_pread(img, got, n, off, &err));
    if (letter) {
        pattern(want, letter, pat_off, n);
    } else {
        memset(want, 0, n);
    }
    assert_memory_equal(want, got, n);
    free(got);
    free(want);
}

static void test_vmdk_read_other_layouts(void **state)
{
    char path[PATH_MAX];
    struct vimg_image *img;

    snprintf(path, sizeof(path), "%s/vmdk-cowd.vmdk", src);
    img = open_img(path, 0);
    assert_int_equal(1 * MiB, vimg_size(img));
    expect_pattern(img, 0, 8192, 'G', 0);
    expect_pattern(img, 8192, 8192, 0, 0);
    expect_pattern(img, 65536, 8192, 'H', 65536);
    vimg_close(img);

    snprintf(path, sizeof(path), "%s/vmdk-sesparse.vmdk", src);
    img = open_img(path, 0);
    expect_pattern(img, 0, 4096, 'I', 0);
    expect_pattern(img, 4096, 8192, 0, 0);
    expect_pattern(img, 12288, 4096, 'J', 12288);
    vimg_close(img);

    /* the RDONLY, NOACCESS and ZERO lines are skipped, as qemu does */
    snprintf(path, sizeof(path), "%s/vmdk-crlf.vmdk", src);
    img = open_img(path, 0);
    assert_int_equal(24 * 512, vimg_size(img));
    expect_pattern(img, 0, 16 * 512, 'K', 0);
    expect_pattern(img, 16 * 512, 8 * 512, 'K', 16 * 512);
    vimg_close(img);

    snprintf(path, sizeof(path), "%s/vmdk-vmfs.vmdk", src);
    img = open_img(path, 0);
    expect_pattern(img, 0, 32 * 512, 'L', 0);
    vimg_close(img);
}

/* Writes to a COWD extent: an existing grain in place, a new one appended. */
static void test_vmdk_write_cowd(void **state)
{
    char path[PATH_MAX], delta[PATH_MAX];
    struct vimg_error err = { 0 };
    struct vimg_image *img;
    uint8_t b[8192];

    copy_fixture("vmdk-cowd.vmdk", path, sizeof(path));
    copy_fixture("vmdk-cowd-delta.vmdk", delta, sizeof(delta));
    img = open_img(path, VIMG_OPEN_RDWR);
    pattern(b, 'R', 512 * KiB, sizeof(b));
    assert_int_equal(0, vimg_pwrite(img, b, sizeof(b), 512 * KiB, &err));
    pattern(b, 'S', 4096, 4096);
    assert_int_equal(0, vimg_pwrite(img, b, 4096, 4096, &err));
    vimg_close(img);
    img = open_img(path, 0);
    expect_pattern(img, 512 * KiB, sizeof(b), 'R', 512 * KiB);
    expect_pattern(img, 0, 4096, 'G', 0);
    expect_pattern(img, 4096, 4096, 'S', 4096);
    expect_pattern(img, 65536, 8192, 'H', 65536);
    vimg_close(img);
}

/* Appending grains to a VMware stream keeps it openable (footer rewritten). */
static void test_vmdk_append_vmware_stream(void **state)
{
    char path[PATH_MAX];
    struct vimg_error err = { 0 };
    uint8_t *b = malloc(64 * KiB), *want = malloc(64 * KiB);
    struct vimg_image *img;

    copy_fixture("vmdk-vmware-stream.vmdk", path, sizeof(path));
    img = open_img(path, VIMG_OPEN_RDWR);
    pattern(b, 'Z', 4 * 64 * KiB, 64 * KiB);
    assert_int_equal(0, vimg_pwrite(img, b, 64 * KiB, 4 * 64 * KiB, &err));
    /* an allocated grain of a stream cannot be rewritten (as qemu) */
    assert_int_equal(-EIO, vimg_pwrite(img, b, 64 * KiB, 0, &err));
    vimg_close(img);

    img = open_img(path, 0);
    assert_int_equal(0, vimg_pread(img, b, 64 * KiB, 4 * 64 * KiB, &err));
    pattern(want, 'Z', 4 * 64 * KiB, 64 * KiB);
    assert_memory_equal(want, b, 64 * KiB);
    assert_int_equal(0, vimg_pread(img, b, 64 * KiB, 64 * KiB, &err));
    pattern(want, 'B', 64 * KiB, 64 * KiB);
    assert_memory_equal(want, b, 64 * KiB);
    vimg_close(img);
    free(b);
    free(want);
}

/* A grain whose GT is missing (GD entry 0): the GT is allocated, the
 * header stays intact. */
static void test_vmdk_write_missing_gt(void **state)
{
    char path[PATH_MAX];
    struct vimg_error err = { 0 };
    uint8_t head[512], head2[512], b[4096], want[4096];
    struct vimg_image *img;
    FILE *f;

    copy_fixture("vmdk-gd-hole.vmdk", path, sizeof(path));
    f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(1, fread(head, sizeof(head), 1, f));
    fclose(f);

    img = open_img(path, VIMG_OPEN_RDWR);
    pattern(b, 'Q', 3 * MiB, sizeof(b));
    assert_int_equal(0, vimg_pwrite(img, b, sizeof(b), 3 * MiB, &err));
    vimg_close(img);

    f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(1, fread(head2, sizeof(head2), 1, f));
    fclose(f);
    assert_memory_equal(head, head2, sizeof(head));

    img = open_img(path, 0);
    assert_int_equal(0, vimg_pread(img, b, sizeof(b), 3 * MiB, &err));
    pattern(want, 'Q', 3 * MiB, sizeof(want));
    assert_memory_equal(want, b, sizeof(b));
    assert_int_equal(0, vimg_pread(img, b, sizeof(b), 0, &err));
    pattern(want, 'F', 0, sizeof(want));
    assert_memory_equal(want, b, sizeof(b));
    vimg_close(img);
}

/* Copy-on-write in the second extent of a split child reads the backing
 * image at the guest offset. */
static void test_vmdk_cow_second_extent(void **state)
{
    char base[PATH_MAX], top[PATH_MAX], opt[PATH_MAX + 64];
    struct vimg_error err = { 0 };
    uint8_t *b = malloc(64 * KiB), *want = malloc(64 * KiB);
    struct vimg_image *img;
    const uint64_t g = 2 * GiB + 640 * KiB;   /* a grain inside extent 2 */

    snprintf(base, sizeof(base), "%s/cow-base.vmdk", tmpdir);
    snprintf(top, sizeof(top), "%s/cow-top.vmdk", tmpdir);
    create(base, "size=3G");
    img = open_img(base, VIMG_OPEN_RDWR);
    pattern(b, 'B', g, 64 * KiB);
    assert_int_equal(0, vimg_pwrite(img, b, 64 * KiB, g, &err));
    /* what the wrong (extent-relative) offset would read */
    pattern(b, 'W', g - 2 * GiB, 64 * KiB);
    assert_int_equal(0, vimg_pwrite(img, b, 64 * KiB, g - 2 * GiB, &err));
    vimg_close(img);

    snprintf(opt, sizeof(opt), "size=3G,subformat=twoGbMaxExtentSparse,backing_file=%s,"
             "backing_fmt=vmdk", "cow-base.vmdk");
    create(top, opt);
    img = open_img(top, VIMG_OPEN_RDWR);
    memset(b, 0x11, 512);
    assert_int_equal(0, vimg_pwrite(img, b, 512, g + 4096, &err));
    vimg_close(img);

    /* read the child alone: the grain must hold the base's bytes */
    img = open_img(top, VIMG_OPEN_NO_BACKING);
    assert_int_equal(0, vimg_pread(img, b, 64 * KiB, g, &err));
    pattern(want, 'B', g, 64 * KiB);
    memset(want + 4096, 0x11, 512);
    assert_memory_equal(want, b, 64 * KiB);
    vimg_close(img);
    free(b);
    free(want);
}

/* A zero-size monolithicSparse image reopens (qemu 7.2 cannot). */
static void test_vmdk_zero_size(void **state)
{
    char path[PATH_MAX];
    struct vimg_image *img;

    snprintf(path, sizeof(path), "%s/zero.vmdk", tmpdir);
    create(path, "size=0");
    img = open_img(path, 0);
    assert_int_equal(0, vimg_size(img));
    vimg_close(img);
    snprintf(path, sizeof(path), "%s/vmdk-zero-size.vmdk", src);
    img = open_img(path, 0);
    assert_int_equal(0, vimg_size(img));
    vimg_close(img);
}

/* The append-mode writer overwrites grain tables whole: one that a fresh
 * image's directory places over the header or a directory is refused
 * (the engine then writes through the ordinary path). */
static void test_vmdk_append_refuses_bad_tables(void **state)
{
    char path[PATH_MAX];
    struct vimg_image *img;
    struct vimg_error err = { 0 };
    struct vimg_run run = { 0 };
    uint8_t h[512], e[4];
    FILE *f;

    snprintf(path, sizeof(path), "%s/append-ok.vmdk", tmpdir);
    create(path, "size=8M");
    img = open_img(path, VIMG_OPEN_RDWR);
    assert_int_equal(0, img->drv->alloc_data(img, 0, 65536, &run, &err));
    assert_int_equal(65536, run.length);
    vimg_close(img);

    for (int which = 0; which < 2; which++) {
        snprintf(path, sizeof(path), "%s/append-bad%d.vmdk", tmpdir, which);
        create(path, "size=8M");
        f = fopen(path, "r+b");
        assert_non_null(f);
        assert_int_equal(1, fread(h, sizeof(h), 1, f));
        /* GD entry 0 (which 0) or redundant GD entry 0 (which 1): sector 0 */
        uint64_t dir = (0 == which ? vimg_ld_le64(h + 56) : vimg_ld_le64(h + 48)) * 512;
        vimg_st_le32(e, 0 == which ? 1 : 0);
        assert_int_equal(0, fseek(f, (long)dir, SEEK_SET));
        assert_int_equal(1, fwrite(e, sizeof(e), 1, f));
        fclose(f);
        if (vimg_open(&img, path, "vmdk", VIMG_OPEN_RDWR, NULL, &err) < 0) {
            vimg_error_clear(&err);   /* refused at open: just as safe */
            continue;
        }
        assert_int_equal(-ENOTSUP, img->drv->alloc_data(img, 0, 65536, &run, &err));
        vimg_close(img);
    }
}

/* Round trip through every subformat vimg creates, with a short last grain. */
static void test_vmdk_roundtrip_subformats(void **state)
{
    static const char *const subs[] = { "monolithicSparse", "monolithicFlat",
                                        "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
                                        "streamOptimized" };
    const uint64_t size = 1 * MiB + 4096;
    uint8_t *b = malloc(size), *c = malloc(size);

    for (size_t i = 0; i < sizeof(subs) / sizeof(subs[0]); i++) {
        char path[PATH_MAX], opt[128];
        struct vimg_error err = { 0 };
        struct vimg_image *img;

        snprintf(path, sizeof(path), "%s/rt-%zu.vmdk", tmpdir, i);
        snprintf(opt, sizeof(opt), "size=%llu,subformat=%s", (unsigned long long)size,
                 subs[i]);
        create(path, opt);
        img = open_img(path, VIMG_OPEN_RDWR);
        pattern(b, (char)('a' + i), 0, size);
        memset(b + 128 * KiB, 0, 64 * KiB);
        for (uint64_t off = 0; off < size; off += 64 * KiB) {
            size_t n = (size_t)(size - off < 64 * KiB ? size - off : 64 * KiB);
            if (off == 128 * KiB) {
                continue;
            }
            if (i == 4) {
                assert_int_equal(0, vimg_pwrite(img, b + off, n, off, &err));
            } else {
                /* unaligned pieces for the sparse and flat kinds */
                assert_int_equal(0, vimg_pwrite(img, b + off, 1000, off, &err));
                assert_int_equal(0, vimg_pwrite(img, b + off + 1000, n - 1000, off + 1000,
                                                &err));
            }
        }
        vimg_close(img);
        img = open_img(path, 0);
        assert_int_equal(size, vimg_size(img));
        assert_int_equal(0, vimg_pread(img, c, size, 0, &err));
        assert_memory_equal(b, c, size);
        vimg_close(img);
    }
    free(b);
    free(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vmdk_read_vmware_stream),
        cmocka_unit_test(test_vmdk_read_other_layouts),
        cmocka_unit_test(test_vmdk_write_cowd),
        cmocka_unit_test(test_vmdk_append_vmware_stream),
        cmocka_unit_test(test_vmdk_write_missing_gt),
        cmocka_unit_test(test_vmdk_cow_second_extent),
        cmocka_unit_test(test_vmdk_zero_size),
        cmocka_unit_test(test_vmdk_append_refuses_bad_tables),
        cmocka_unit_test(test_vmdk_roundtrip_subformats),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

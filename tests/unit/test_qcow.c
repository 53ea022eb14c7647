/*
 * src/formats/qcow.c: the header checks (qemu 7.2's order and wording,
 * checked against qemu-img 7.2 on tests/images/hostile/qcow-*), probing,
 * create, reads and writes (allocation, copy-on-write from a backing file,
 * compressed clusters) through the public API.
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

#include "core/image.h"
#include "core/opts.h"
#include "util/util.h"
#include "vimg/vimg.h"

int vimg_internal_qcow_check_header(const uint8_t *hdr, uint64_t *l1_entries,
                                    const char **msg);

static char images[PATH_MAX - 64];

static int group_setup(void **state)
{
    char *slash;

    if (test_tmp_make("test_qcow") < 0) {
        return -1;
    }
    /* fixtures live beside this file: tests/unit/../images */
    snprintf(images, sizeof(images), "%s", __FILE__);
    slash = strrchr(images, '/');
    if (slash) {
        *slash = '\0';
    }
    slash = strrchr(images, '/');
    if (slash) {
        strcpy(slash, "/images");
    }
    return 0;
}

static int group_teardown(void **state)
{
    return test_tmp_remove();
}

static void make_header(uint8_t *h, uint32_t version, uint64_t size, uint8_t cb, uint8_t l2b,
                        uint32_t crypt, uint64_t boff, uint32_t blen)
{
    memset(h, 0, 48);
    vimg_st_be32(h, 0x514649fb);
    vimg_st_be32(h + 4, version);
    vimg_st_be64(h + 8, boff);
    vimg_st_be32(h + 16, blen);
    vimg_st_be64(h + 24, size);
    h[32] = cb;
    h[33] = l2b;
    vimg_st_be32(h + 36, crypt);
    vimg_st_be64(h + 40, 48);
}

static void expect_header(uint32_t version, uint64_t size, uint8_t cb, uint8_t l2b,
                          uint32_t crypt, uint64_t boff, uint32_t blen, const char *want)
{
    uint8_t h[48];
    uint64_t l1 = 0;
    const char *msg = NULL;
    int ret;

    make_header(h, version, size, cb, l2b, crypt, boff, blen);
    ret = vimg_internal_qcow_check_header(h, &l1, &msg);
    if (!want) {
        assert_int_equal(ret, 0);
        assert_null(msg);
    } else {
        assert_true(ret < 0);
        assert_non_null(msg);
        assert_string_equal(msg, want);
    }
}

static void test_qcow_header_bounds(void **state)
{
    uint8_t h[48];
    uint64_t l1 = 0;
    const char *msg;

    expect_header(1, 1 << 20, 12, 9, 0, 0, 0, NULL);
    expect_header(1, 2, 9, 6, 0, 0, 0, NULL);
    expect_header(1, 1 << 20, 16, 13, 1, 48, 1023, NULL);
    expect_header(1, 1, 12, 9, 0, 0, 0, "Image size is too small (must be at least 2 bytes)");
    expect_header(1, 0, 12, 9, 0, 0, 0, "Image size is too small (must be at least 2 bytes)");
    expect_header(1, 1 << 20, 8, 9, 0, 0, 0, "Cluster size must be between 512 and 64k");
    expect_header(1, 1 << 20, 17, 9, 0, 0, 0, "Cluster size must be between 512 and 64k");
    expect_header(1, 1 << 20, 12, 5, 0, 0, 0, "L2 table size must be between 512 and 64k");
    expect_header(1, 1 << 20, 12, 14, 0, 0, 0, "L2 table size must be between 512 and 64k");
    expect_header(1, 1 << 20, 12, 9, 2, 0, 0, "invalid encryption method in qcow header");
    expect_header(1, UINT64_MAX - 100, 12, 9, 0, 0, 0, "Image too large");
    expect_header(1, 1ull << 62, 9, 6, 0, 0, 0, "Image too large");
    expect_header(1, 1 << 20, 12, 9, 0, 48, 1024, "Backing file name too long");
    /* a name length without a name offset is not looked at (as in qemu) */
    expect_header(1, 1 << 20, 12, 9, 0, 0, 5000, NULL);
    expect_header(2, 1 << 20, 12, 9, 0, 0, 0, "version");

    /* the L1 entry count follows from the size */
    make_header(h, 1, (1 << 21) + 1, 12, 9, 0, 0, 0);
    assert_int_equal(vimg_internal_qcow_check_header(h, &l1, &msg), 0);
    assert_int_equal(l1, 2);
    /* the largest L1 qemu accepts: INT_MAX / 8 entries */
    make_header(h, 1, (uint64_t)(INT_MAX / 8) << 15, 9, 6, 0, 0, 0);
    assert_int_equal(vimg_internal_qcow_check_header(h, &l1, &msg), 0);
    make_header(h, 1, ((uint64_t)(INT_MAX / 8) << 15) + 1, 9, 6, 0, 0, 0);
    assert_true(vimg_internal_qcow_check_header(h, &l1, &msg) < 0);
    memcpy(h, "QFI\xfa", 4);
    assert_int_equal(vimg_internal_qcow_check_header(h, &l1, &msg), -EINVAL);
    assert_string_equal(msg, "Image not in qcow format");
}

static void test_qcow_probe(void **state)
{
    uint8_t h[512] = { 0 };

    make_header(h, 1, 1 << 20, 12, 9, 0, 0, 0);
    assert_string_equal(vimg_internal_probe(h, sizeof(h), "x")->name, "qcow");
    /* version 0 belongs to neither qcow driver: raw */
    vimg_st_be32(h + 4, 0);
    assert_string_equal(vimg_internal_probe(h, sizeof(h), "x")->name, "raw");
    /* version 2 and 3 are qcow2's (or raw while that driver is missing) */
    vimg_st_be32(h + 4, 3);
    assert_string_not_equal(vimg_internal_probe(h, sizeof(h), "x")->name, "qcow");
    /* too short for a header */
    vimg_st_be32(h + 4, 1);
    assert_string_equal(vimg_internal_probe(h, 47, "x")->name, "raw");
}

/* Every bound the driver enforces at open, with qemu-img 7.2's message. */
static void test_qcow_hostile_open(void **state)
{
    static const struct {
        const char *file, *msg;
    } cases[] = {
        { "qcow-cluster-bits-8.qcow", "Cluster size must be between 512 and 64k" },
        { "qcow-cluster-bits-17.qcow", "Cluster size must be between 512 and 64k" },
        { "qcow-l2-bits-5.qcow", "L2 table size must be between 512 and 64k" },
        { "qcow-l2-bits-14.qcow", "L2 table size must be between 512 and 64k" },
        { "qcow-size-1.qcow", "Image size is too small (must be at least 2 bytes)" },
        { "qcow-size-overflow.qcow", "Image too large" },
        { "qcow-l1-too-large.qcow", "Image too large" },
        { "qcow-backing-too-long.qcow", "Backing file name too long" },
        { "qcow-crypt-2.qcow", "invalid encryption method in qcow header" },
        { "qcow-version-2.qcow", "qcow (v1) does not support qcow version 2\n"
                                 "Try the 'qcow2' driver instead." },
        { "qcow-encrypted.qcow", "encrypted qcow images (AES-CBC) are not supported; "
                                 "decrypt the image with qemu-img first" },
    };
    for (size_t i = 0; i < VIMG_ARRAY_SIZE(cases); i++) {
        char path[PATH_MAX], want[PATH_MAX + 256];
        struct vimg_image *img = NULL;
        struct vimg_error err = { 0 };

        snprintf(path, sizeof(path), "%s/hostile/%s", images, cases[i].file);
        snprintf(want, sizeof(want), "Could not open '%s': %s", path, cases[i].msg);
        assert_true(vimg_open(&img, path, "qcow", 0, NULL, &err) < 0);
        assert_null(img);
        assert_string_equal(err.msg, want);
        assert_null(strchr(cases[i].msg, '\n') ? NULL : strchr(err.msg, '\n'));
    }
}

/* Entries that only fail when used: reads give one-line errors. */
static void test_qcow_hostile_io(void **state)
{
    static const struct {
        const char *file, *msg;
    } cases[] = {
        { "qcow-unaligned-cluster.qcow", "is not sector aligned" },
        { "qcow-cluster-past-eof.qcow", "beyond the end of the file" },
        { "qcow-bad-compressed.qcow", "is corrupt" },
        { "qcow-compressed-past-eof.qcow", "lies beyond the end of the file" },
        { "qcow-l2-offset-huge.qcow", "L2 table offset 0xfffffffffffff000 is invalid" },
    };
    static uint8_t buf[65536];
    for (size_t i = 0; i < VIMG_ARRAY_SIZE(cases); i++) {
        char path[PATH_MAX];
        struct vimg_image *img = NULL;
        struct vimg_error err = { 0 };

        snprintf(path, sizeof(path), "%s/hostile/%s", images, cases[i].file);
        assert_int_equal(vimg_open(&img, path, NULL, 0, NULL, &err), 0);
        assert_string_equal(vimg_format(img), "qcow");
        assert_true(vimg_pread(img, buf, sizeof(buf), 0, &err) < 0);
        assert_non_null(strstr(err.msg, cases[i].msg));
        assert_null(strchr(err.msg, '\n'));
        vimg_close(img);
    }
    /* encrypted images still show their header (info opens with NO_IO) */
    {
        char path[PATH_MAX];
        struct vimg_image *img = NULL;
        struct vimg_error err = { 0 };
        snprintf(path, sizeof(path), "%s/hostile/qcow-encrypted.qcow", images);
        assert_int_equal(vimg_open(&img, path, NULL, VIMG_OPEN_NO_IO, NULL, &err), 0);
        vimg_close(img);
    }
}

static void create_qcow(const char *path, const char *size, const char *backing,
                        const char *bfmt)
{
    struct vimg_opts *o = vimg_opts_new();
    struct vimg_error err = { 0 };
    int ret;

    if (size) {
        vimg_opts_set(o, "size", size);
    }
    if (backing) {
        vimg_opts_set(o, "backing_file", backing);
        vimg_opts_set(o, "backing_fmt", bfmt);
    }
    ret = vimg_create(path, "qcow", o, &err);
    vimg_opts_free(o);
    if (ret < 0) {
        print_error("vimg_create: %s\n", err.msg);
    }
    assert_int_equal(ret, 0);
}

static void test_qcow_create_layout(void **state)
{
    char path[PATH_MAX];
    struct stat st;
    struct vimg_error err = { 0 };
    struct vimg_opts *o;

    /* qemu-img 7.2: 48-byte header, L1 in whole zeroed sectors */
    snprintf(path, sizeof(path), "%s/c1.qcow", tmpdir);
    create_qcow(path, "1M", NULL, NULL);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_size, 560);
    snprintf(path, sizeof(path), "%s/c2.qcow", tmpdir);
    create_qcow(path, "1001", NULL, NULL);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_size, 560);

    /* size 0: refused, and (as in qemu) an empty file is left */
    snprintf(path, sizeof(path), "%s/c0.qcow", tmpdir);
    o = vimg_opts_new();
    vimg_opts_set(o, "size", "0");
    assert_true(vimg_create(path, "qcow", o, &err) < 0);
    assert_string_equal(err.msg, "Image size is too small, cannot be zero length");
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_size, 0);
    vimg_error_clear(&err);
    vimg_opts_set(o, "size", "1M");
    vimg_opts_set(o, "backing_fmt", "nosuchformat");
    assert_true(vimg_create(path, "qcow", o, &err) < 0);
    assert_string_equal(err.msg, "unrecognized backing format 'nosuchformat'");
    vimg_error_clear(&err);
    vimg_opts_unset(o, "backing_fmt");
    vimg_opts_set(o, "encryption", "on");
    assert_true(vimg_create(path, "qcow", o, &err) < 0);
    assert_string_equal(err.msg, "Parameter 'encrypt.key-secret' is required for cipher");
    vimg_opts_free(o);
}

/* An in-memory model of the disk, checked against every read. */
static void check_model(struct vimg_image *img, const uint8_t *model, size_t size)
{
    uint8_t *buf = malloc(size);
    struct vimg_error err = { 0 };
    assert_non_null(buf);
    assert_int_equal(vimg_pread(img, buf, size, 0, &err), 0);
    assert_memory_equal(buf, model, size);
    free(buf);
}

static void test_qcow_write_read(void **state)
{
    enum { SIZE = 1 << 20 };
    static uint8_t model[SIZE], data[71000];
    char path[PATH_MAX];
    struct vimg_image *img = NULL;
    struct vimg_error err = { 0 };
    static const struct {
        uint64_t off;
        size_t len;
    } writes[] = {
        { 0, 4096 }, { 4096 + 100, 10 }, { 65535, 70000 }, { SIZE - 1, 1 }, { 200000, 512 },
        { 4096 + 50, 4000 },
    };

    for (size_t i = 0; i < sizeof(data); i++) {
        data[i] = (uint8_t)(i * 7 + 3);
    }
    snprintf(path, sizeof(path), "%s/rw.qcow", tmpdir);
    create_qcow(path, "1M", NULL, NULL);
    assert_int_equal(vimg_open(&img, path, "qcow", VIMG_OPEN_RDWR, NULL, &err), 0);
    for (size_t i = 0; i < VIMG_ARRAY_SIZE(writes); i++) {
        assert_int_equal(vimg_pwrite(img, data + i, writes[i].len, writes[i].off, &err), 0);
        memcpy(model + writes[i].off, data + i, writes[i].len);
        check_model(img, model, SIZE);
    }
    /* compressed clusters: written through the convert hook, read back */
    memset(data, 'z', 4096);
    assert_int_equal(img->drv->write_compressed(img, data, 4096, 8 * 4096, &err), 0);
    memcpy(model + 8 * 4096, data, 4096);
    assert_int_equal(img->drv->write_compressed(img, data, 0, 0, &err), 0);
    check_model(img, model, SIZE);
    struct vimg_status st;
    assert_int_equal(vimg_block_status(img, 8 * 4096, 4096, &st, &err), 0);
    assert_true(st.flags & VIMG_STATUS_COMPRESSED);
    /* a partial write into a compressed cluster keeps the rest */
    assert_int_equal(vimg_pwrite(img, "abc", 3, 8 * 4096 + 10, &err), 0);
    memcpy(model + 8 * 4096 + 10, "abc", 3);
    check_model(img, model, SIZE);
    vimg_close(img);

    /* and again after reopening */
    assert_int_equal(vimg_open(&img, path, NULL, 0, NULL, &err), 0);
    assert_string_equal(vimg_format(img), "qcow");
    check_model(img, model, SIZE);
    vimg_close(img);
}

static void test_qcow_backing_cow(void **state)
{
    enum { SIZE = 256 * 1024 };
    static uint8_t model[SIZE];
    char base[PATH_MAX], top[PATH_MAX];
    struct vimg_image *img = NULL;
    struct vimg_error err = { 0 };
    struct vimg_opts *o = vimg_opts_new();

    snprintf(base, sizeof(base), "%s/base.raw", tmpdir);
    snprintf(top, sizeof(top), "%s/top.qcow", tmpdir);
    vimg_opts_set(o, "size", "256k");
    assert_int_equal(vimg_create(base, "raw", o, &err), 0);
    vimg_opts_free(o);
    for (size_t i = 0; i < SIZE; i++) {
        model[i] = (uint8_t)(i / 512 + 1);
    }
    assert_int_equal(vimg_open(&img, base, "raw", VIMG_OPEN_RDWR, NULL, &err), 0);
    assert_int_equal(vimg_pwrite(img, model, SIZE, 0, &err), 0);
    vimg_close(img);

    create_qcow(top, "256k", "base.raw", "raw");
    assert_int_equal(vimg_open(&img, top, NULL, VIMG_OPEN_RDWR, NULL, &err), 0);
    assert_non_null(vimg_backing(img));
    check_model(img, model, SIZE);
    /* 512-byte clusters with a backing file; partial writes copy the rest */
    assert_int_equal(vimg_pwrite(img, "hello", 5, 1000, &err), 0);
    memcpy(model + 1000, "hello", 5);
    assert_int_equal(vimg_pwrite(img, "x", 1, SIZE - 1, &err), 0);
    model[SIZE - 1] = 'x';
    check_model(img, model, SIZE);
    vimg_close(img);
    assert_int_equal(vimg_open(&img, top, NULL, 0, NULL, &err), 0);
    check_model(img, model, SIZE);
    vimg_close(img);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_qcow_header_bounds),
        cmocka_unit_test(test_qcow_probe),
        cmocka_unit_test(test_qcow_hostile_open),
        cmocka_unit_test(test_qcow_hostile_io),
        cmocka_unit_test(test_qcow_create_layout),
        cmocka_unit_test(test_qcow_write_read),
        cmocka_unit_test(test_qcow_backing_cow),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

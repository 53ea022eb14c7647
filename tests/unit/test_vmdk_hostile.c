/*
 * Every bound the vmdk driver enforces, on the fixtures that
 * tests/images/make_vmdk_fixtures.py writes to tests/images/hostile/: each
 * must fail to open (or to read) with a clear one-line message, never crash.
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
#include <setjmp.h>
#include <cmocka.h>

#include "vimg/vimg.h"

static char dir[PATH_MAX];

static int group_setup(void **state)
{
    const char *slash;
    snprintf(dir, sizeof(dir), "%s", __FILE__);
    slash = strrchr(dir, '/');
    if (!slash) {
        return -1;
    }
    snprintf(dir + (slash - dir), sizeof(dir) - (size_t)(slash - dir),
             "/../images/hostile");
    return 0;
}

/* Open name from hostile/, expect failure with a message containing want. */
static void expect_open_fails(const char *name, const char *want)
{
    char path[PATH_MAX + 64];
    struct vimg_error err = { 0 };
    struct vimg_image *img = NULL;
    int ret;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    ret = vimg_open(&img, path, "vmdk", 0, NULL, &err);
    if (0 == ret) {
        vimg_close(img);
        fail_msg("%s opened", name);
    }
    assert_true(err.code > 0);
    assert_null(strchr(err.msg, '\n'));
    if (!strstr(err.msg, want)) {
        fail_msg("%s: message '%s' lacks '%s'", name, err.msg, want);
    }
}

static void test_vmdk_hostile_header(void **state)
{
    expect_open_fails("vmdk-grain-too-big.vmdk", "Invalid granularity, image may be corrupt");
    expect_open_fails("vmdk-gtes-too-big.vmdk", "L2 table size too big");
    expect_open_fails("vmdk-l1-entry-zero.vmdk", "L1 entry size is invalid");
    expect_open_fails("vmdk-l1-too-big.vmdk", "L1 size too big");
    expect_open_fails("vmdk-truncated.vmdk", "File truncated, expecting at least 512000 bytes");
    expect_open_fails("vmdk-version4.vmdk", "Unsupported VMDK version 4");
    expect_open_fails("vmdk-bad-footer.vmdk", "Invalid footer");
    expect_open_fails("vmdk-gd-outside.vmdk",
                      "grain directory at offset 51200000 lies beyond the end of the file");
}

static void test_vmdk_hostile_cowd(void **state)
{
    /* qemu 7.2 opens this one and dies of SIGFPE on the first lookup */
    expect_open_fails("vmdk-cowd-grain0.vmdk", "invalid grain size 0");
    expect_open_fails("vmdk-cowd-small-gd.vmdk",
                      "grain directory of 1 entries does not cover the capacity");
}

static void test_vmdk_hostile_descriptor(void **state)
{
    /* qemu 7.2 opens this one and aborts in info */
    expect_open_fails("vmdk-no-extents.vmdk", "the descriptor names no usable extent");
    expect_open_fails("vmdk-extent-outside.vmdk",
                      "extent '../x.raw' lies outside the image's folder");
    expect_open_fails("vmdk-extent-absolute.vmdk",
                      "extent '/etc/passwd' lies outside the image's folder");
    expect_open_fails("vmdk-extent-protocol.vmdk", "uses a protocol prefix");
    expect_open_fails("vmdk-hint-too-long.vmdk", "Invalid argument");
    expect_open_fails("vmdk-bad-extent-line.vmdk", "Invalid extent line: RW 8 FLAT");
    expect_open_fails("vmdk-bad-type.vmdk", "Unsupported image type 'custom'");
    expect_open_fails("vmdk-no-cid.vmdk", "Invalid argument");
}

/* Bad grains open but fail cleanly when used. */
static void test_vmdk_hostile_grains(void **state)
{
    char path[PATH_MAX + 64];
    struct vimg_error err = { 0 };
    struct vimg_image *img;
    struct vimg_status st;
    uint8_t buf[4096];

    snprintf(path, sizeof(path), "%s/vmdk-marker-size.vmdk", dir);
    assert_int_equal(0, vimg_open(&img, path, NULL, 0, NULL, &err));
    assert_int_equal(-EINVAL, vimg_pread(img, buf, sizeof(buf), 0, &err));
    assert_non_null(strstr(err.msg, "has an invalid size 196608"));
    vimg_close(img);

    memset(&err, 0, sizeof(err));
    snprintf(path, sizeof(path), "%s/vmdk-gte-past-eof.vmdk", dir);
    assert_int_equal(0, vimg_open(&img, path, NULL, 0, NULL, &err));
    assert_int_equal(-EIO, vimg_block_status(img, 0, 65536, &st, &err));
    assert_non_null(strstr(err.msg, "lies beyond the end of the file"));
    vimg_close(img);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vmdk_hostile_header),
        cmocka_unit_test(test_vmdk_hostile_cowd),
        cmocka_unit_test(test_vmdk_hostile_descriptor),
        cmocka_unit_test(test_vmdk_hostile_grains),
    };
    return cmocka_run_group_tests(tests, group_setup, NULL);
}

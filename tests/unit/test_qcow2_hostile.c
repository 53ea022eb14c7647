/*
 * Every bound the qcow2 driver enforces, one fixture each
 * (tests/images/hostile/qcow2-*.qcow2, made by make_qcow2_fixtures.py):
 * open (or the first read) must fail with the expected one-line message,
 * qemu's wording where qemu has one, and never crash.
 */
#include "config.h"

#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <cmocka.h>

#include "vimg/vimg.h"

/* The source tree's root, from this file's path. */
static char root[PATH_MAX - 128];

static int group_setup(void **state)
{
    char *slash;
    snprintf(root, sizeof(root), "%s", __FILE__);
    for (int i = 0; i < 3; i++) {
        slash = strrchr(root, '/');
        if (!slash) {
            return -1;
        }
        *slash = 0;
    }
    return 0;
}

struct hostile_case {
    const char *file;
    const char *msg;       /* substring of the error */
    bool at_read;          /* open works, reading the data fails */
    unsigned flags;
};

static const struct hostile_case cases[] = {
    { "version4", "Unsupported qcow2 version 4", false, 0 },
    { "cluster-bits-8", "Unsupported cluster size: 2^8", false, 0 },
    { "cluster-bits-22", "Unsupported cluster size: 2^22", false, 0 },
    { "header-short", "qcow2 header too short", false, 0 },
    { "header-exceeds-cluster", "qcow2 header exceeds cluster size", false, 0 },
    { "header-unaligned", "qcow2 header length 108 is not a multiple of 8", false, 0 },
    { "backing-offset", "Invalid backing file offset", false, 0 },
    { "compression-unknown", "qcow2: unknown compression type: 2", false, 0 },
    { "compression-bit", "qcow2: Compression type incompatible feature bit must not be set",
      false, 0 },
    { "unknown-feature", "Unsupported qcow2 feature(s): Unknown incompatible feature: 200",
      false, 0 },
    { "refcount-order", "Reference count entry width too large; may not exceed 64 bits",
      false, 0 },
    { "no-reftable", "Image does not contain a reference count table", false, 0 },
    { "reftable-too-large", "Reference count table too large", false, 0 },
    { "reftable-unaligned", "Reference count table offset invalid", false, 0 },
    { "reftable-past-eof", "Reference count table lies beyond the end of the file", false, 0 },
    { "snapshots-too-many", "Snapshot table too large", false, 0 },
    { "l1-too-large", "Active L1 table too large", false, 0 },
    { "l1-unaligned", "Active L1 table offset invalid", false, 0 },
    { "l1-too-small", "L1 table is too small", false, 0 },
    { "l1-past-eof", "Active L1 table lies beyond the end of the file", false, 0 },
    { "crypt-method-3", "Unsupported encryption method 3", false, 0 },
    { "crypt-luks-no-header", "Missing CRYPTO header for crypt method 2", false, 0 },
    { "crypt-aes", "encrypted qcow2 images are not supported", false, 0 },
    { "subcluster-too-small", "Unsupported subcluster size: 16", false, 0 },
    { "corrupt-bit", "qcow2: Image is corrupt; cannot be opened read/write", false,
      VIMG_OPEN_RDWR },
    { "data-file-missing", "'data-file' is required for this image", false, 0 },
    { "data-file-raw-alone", "data-file-raw requires a data file", false, 0 },
    { "backing-fmt-too-long", "ERROR: ext_backing_format: len=16 too large (>=16)", false, 0 },
    { "ext-too-large", "Header extension too large", false, 0 },
    { "backing-name-too-long", "Backing file name too long", false, 0 },
    { "snapshot-past-eof", "Snapshot table lies beyond the end of the file", false, 0 },
    { "snapshot-extra-too-big", "Too much extra metadata in snapshot table entry 0", false,
      0 },
    { "compressed-garbage", "could not decompress the cluster", true, 0 },
    { "v2-zero-flag", "Zero cluster entry found in pre-v3 image", true, 0 },
};

static void test_qcow2_hostile_messages(void **state)
{
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const struct hostile_case *c = &cases[i];
        char path[PATH_MAX];
        struct vimg_error err = { 0 };
        struct vimg_image *img = NULL;
        int ret;

        snprintf(path, sizeof(path), "%s/tests/images/hostile/qcow2-%s.qcow2",
                 root, c->file);
        ret = vimg_open(&img, path, NULL, c->flags | VIMG_OPEN_NO_BACKING, NULL, &err);
        if (c->at_read) {
            uint8_t buf[512];
            if (ret < 0) {
                fail_msg("%s: open failed: %s", c->file, err.msg);
            }
            ret = vimg_pread(img, buf, sizeof(buf), 0, &err);
            vimg_close(img);
        }
        if (ret >= 0) {
            fail_msg("%s: expected an error", c->file);
        }
        if (!strstr(err.msg, c->msg)) {
            fail_msg("%s: got '%s', expected '%s'", c->file, err.msg, c->msg);
        }
    }
}

static void test_qcow2_hostile_tiny_reads(void **state)
{
    char path[PATH_MAX];
    struct vimg_error err = { 0 };
    struct vimg_image *img;
    uint8_t buf[1024];

    snprintf(path, sizeof(path), "%s/tests/images/qcow2-tiny.qcow2", root);
    assert_int_equal(0, vimg_open(&img, path, NULL, 0, NULL, &err));
    assert_string_equal("qcow2", vimg_format(img));
    assert_int_equal(65536, vimg_size(img));
    assert_int_equal(0, vimg_pread(img, buf, sizeof(buf), 0, &err));
    for (size_t i = 0; i < 512; i++) {
        assert_int_equal(0x5a, buf[i]);
        assert_int_equal(0, buf[512 + i]);
    }
    vimg_close(img);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_qcow2_hostile_messages),
        cmocka_unit_test(test_qcow2_hostile_tiny_reads),
    };
    return cmocka_run_group_tests(tests, group_setup, NULL);
}

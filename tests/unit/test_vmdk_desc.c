/*
 * The vmdk descriptor parser (src/formats/vmdk/descriptor.c) and the grain
 * arithmetic: qemu 7.2's parsing rules (substring look-ups, field widths,
 * which extent lines count) and vimg's bounds (lines, extents, size).
 */
#include "config.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <cmocka.h>

#include "formats/vmdk/vmdk.h"

static void test_vmdk_probe(void **state)
{
    static const char *const yes[] = {
        "version=1\n", "# Disk DescriptorFile\nversion=2\n", "#\n   \nversion=3\r\n",
        "# c\n  \r\nversion=1\nCID=1\n",
    };
    static const char *const no[] = {
        "version = 1\n", "\nversion=1\n", "version=4\n", "# only comments\n", "abc",
    };
    for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
        assert_int_equal(100, vmdk_probe_text((const uint8_t *)yes[i], strlen(yes[i])));
    }
    for (size_t i = 0; i < sizeof(no) / sizeof(no[0]); i++) {
        assert_int_equal(0, vmdk_probe_text((const uint8_t *)no[i], strlen(no[i])));
    }
    assert_int_equal(100, vmdk_probe_text((const uint8_t *)"KDMV", 4));
    assert_int_equal(100, vmdk_probe_text((const uint8_t *)"COWD....", 8));
    assert_int_equal(0, vmdk_probe_text((const uint8_t *)"KDM", 3));
}

static void test_vmdk_cid(void **state)
{
    uint32_t v;
    assert_int_equal(0, vmdk_desc_cid("CID=abc\nparentCID=ffffffff\n", false, &v));
    assert_int_equal(0xabc, v);
    assert_int_equal(0, vmdk_desc_cid("CID=abc\nparentCID=ffffffff\n", true, &v));
    assert_int_equal(0xffffffff, v);
    /* without a CID line qemu finds the CID inside parentCID */
    assert_int_equal(0, vmdk_desc_cid("parentCID=12\n", false, &v));
    assert_int_equal(0x12, v);
    assert_int_equal(-EINVAL, vmdk_desc_cid("nothing\n", false, &v));
    assert_int_equal(-EINVAL, vmdk_desc_cid("CID=zz\n", false, &v));
    assert_int_equal(-EINVAL, vmdk_desc_cid("CID", false, &v));
}

static void test_vmdk_hint(void **state)
{
    char *h = NULL;
    char big[6000];

    assert_int_equal(0, vmdk_desc_hint("parentFileNameHint=\"base.vmdk\"\n", &h));
    assert_string_equal("base.vmdk", h);
    free(h);
    assert_int_equal(0, vmdk_desc_hint("no hint\n", &h));
    assert_null(h);
    assert_int_equal(-EINVAL, vmdk_desc_hint("parentFileNameHint=\"open\n", &h));
    assert_int_equal(-EINVAL, vmdk_desc_hint("parentFileNameHint", &h));
    snprintf(big, sizeof(big), "parentFileNameHint=\"%04095d\"", 0);
    assert_int_equal(0, vmdk_desc_hint(big, &h));
    assert_int_equal(4095, strlen(h));
    free(h);
    snprintf(big, sizeof(big), "parentFileNameHint=\"%04096d\"", 0);
    assert_int_equal(-EINVAL, vmdk_desc_hint(big, &h));
}

static int parse(const char *text, struct vmdk_desc *d, struct vimg_error *err)
{
    memset(err, 0, sizeof(*err));
    return vmdk_desc_parse(text, d, err);
}

static void test_vmdk_desc_extents(void **state)
{
    struct vmdk_desc d;
    struct vimg_error err;
    const char *t =
        "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n"
        "createType=\"twoGbMaxExtentFlat\"\n"
        "RW 4194304 FLAT \"a-f001.vmdk\" 0\r\n"
        "RDONLY 8 FLAT \"ro.vmdk\" 0\n"
        "NOACCESS 8 FLAT \"na.vmdk\" 0\n"
        "RW 16 ZERO\n"
        "RW 0 FLAT \"zero-size.vmdk\" 0\n"
        "RW 8 VMFSRDM \"rdm.vmdk\"\n"
        "RW 100 VMFS \"v.vmdk\"\n"
        "RW 200 SPARSE \"s p a c e.vmdk\"\n"
        "RW 300 FLAT \"off.vmdk\" 77\n"
        "ddb.adapterType = \"ide\"\n";

    assert_int_equal(0, parse(t, &d, &err));
    assert_string_equal("twoGbMaxExtentFlat", d.create_type);
    assert_int_equal(4, d.n_extents);
    assert_int_equal(4, d.n_skipped);   /* RDONLY, NOACCESS, size 0, VMFSRDM */
    assert_string_equal("a-f001.vmdk", d.extents[0].fname);
    assert_int_equal(4194304, d.extents[0].sectors);
    assert_string_equal("VMFS", d.extents[1].type);
    assert_int_equal(0, d.extents[1].offset);
    assert_string_equal("s p a c e.vmdk", d.extents[2].fname);
    assert_int_equal(77, d.extents[3].offset);
    vmdk_desc_free(&d);
}

static void test_vmdk_desc_errors(void **state)
{
    struct vmdk_desc d;
    struct vimg_error err;

    assert_int_equal(-EINVAL, parse("version=1\nRW 8 FLAT \"x\" 0\n", &d, &err));
    assert_string_equal("invalid VMDK image descriptor", err.msg);
    assert_int_equal(-ENOTSUP, parse("createType=\"monolithicSparse\"\n", &d, &err));
    assert_string_equal("Unsupported image type 'monolithicSparse'", err.msg);
    assert_int_equal(-ENOTSUP, parse("createType = \"vmfs\"\n", &d, &err));
    assert_string_equal("Unsupported image type ' '", err.msg);
    assert_int_equal(-EINVAL, parse("createType=\"vmfs\"\nRW 8 FLAT \"x\"\r\n", &d, &err));
    assert_string_equal("Invalid extent line: RW 8 FLAT \"x\"\r", err.msg);
    assert_int_equal(-EINVAL, parse("createType=\"vmfs\"\nRW 8 VMFS \"x\" 3\n", &d, &err));
    assert_int_equal(-EINVAL, parse("createType=\"vmfs\"\nRW 8 SPARSE \"x\" 3\n", &d, &err));
    assert_int_equal(-EINVAL, parse("createType=\"vmfs\"\nRW 8 FLAT \"x\" -1\n", &d, &err));
    /* a createType value longer than qemu's buffer */
    char big[300];
    snprintf(big, sizeof(big), "createType=\"%0200d\"\n", 0);
    assert_int_equal(-EINVAL, parse(big, &d, &err));
}

static void test_vmdk_desc_bounds(void **state)
{
    struct vmdk_desc d;
    struct vimg_error err;
    const char *head = "createType=\"twoGbMaxExtentFlat\"\n";
    size_t n = VMDK_MAX_EXTENTS + 1, len = strlen(head) + n * 20 + 1;
    char *t = malloc(len), *p = t;

    assert_non_null(t);
    p += sprintf(p, "%s", head);
    for (size_t i = 0; i < n; i++) {
        p += sprintf(p, "RW 8 FLAT \"f\" 0\n");
    }
    assert_int_equal(-EFBIG, parse(t, &d, &err));
    assert_non_null(strstr(err.msg, "more than 8192 extents"));
    free(t);

    /* line count: newlines alone */
    len = strlen(head) + VMDK_DESC_MAX_LINES + 2;
    t = calloc(1, len);
    assert_non_null(t);
    strcpy(t, head);
    memset(t + strlen(head), '\n', VMDK_DESC_MAX_LINES + 1);
    assert_int_equal(-EFBIG, parse(t, &d, &err));
    assert_non_null(strstr(err.msg, "more than 65536 lines"));
    free(t);

    /* size */
    t = malloc(VMDK_DESC_READ_MAX + 10);
    assert_non_null(t);
    memset(t, ' ', VMDK_DESC_READ_MAX + 9);
    t[VMDK_DESC_READ_MAX + 9] = '\0';
    assert_int_equal(-EFBIG, parse(t, &d, &err));
    free(t);
}

static void test_vmdk_create_type(void **state)
{
    char ct[128];
    assert_int_equal(0, vmdk_desc_create_type("createType=\"vmfs\"", ct, sizeof(ct)));
    assert_string_equal("vmfs", ct);
    assert_int_equal(-EINVAL, vmdk_desc_create_type("createType=\"vmfs", ct, sizeof(ct)));
    assert_int_equal(-EINVAL, vmdk_desc_create_type("createType", ct, sizeof(ct)));
    assert_int_equal(-EINVAL, vmdk_desc_create_type("createType=\"abcdef\"", ct, 4));
}

/* qemu's layout of a created sparse extent (reference A5). */
static void test_vmdk_layout(void **state)
{
    struct vmdk_layout l;

    vmdk_layout(5ull << 21, 128, 512, &l);      /* 5 GiB */
    assert_int_equal(160, l.gt_count);
    assert_int_equal(2, l.gd_sectors);
    assert_int_equal(21, l.rgd);
    assert_int_equal(0x297, l.gd);
    assert_int_equal(0x580, l.overhead);
    vmdk_layout(1ull << 22, 128, 512, &l);      /* 2 GiB split extent */
    assert_int_equal(278, l.gd);
    assert_int_equal(640, l.overhead);
    vmdk_layout(0, 128, 512, &l);
    assert_int_equal(0, l.gt_count);
}

static void test_vmdk_header_roundtrip(void **state)
{
    struct vmdk4_header h = { .version = 3, .flags = 0x30001, .capacity = 123456,
                              .grain = 128, .desc_off = 1, .desc_size = 20, .gtes = 512,
                              .rgd_off = 0, .gd_off = VMDK_GD_AT_END, .overhead = 128,
                              .compress = 1 }, g;
    uint8_t b[512];

    vmdk4_header_encode(&h, b);
    assert_memory_equal("KDMV", b, 4);
    assert_memory_equal("\n \r\n", b + 73, 4);
    vmdk4_header_decode(b, &g);
    assert_int_equal(h.capacity, g.capacity);
    assert_true(VMDK_GD_AT_END == g.gd_off);
    assert_int_equal(1, g.compress);
    assert_int_equal(0x30001, g.flags);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vmdk_probe),
        cmocka_unit_test(test_vmdk_cid),
        cmocka_unit_test(test_vmdk_hint),
        cmocka_unit_test(test_vmdk_desc_extents),
        cmocka_unit_test(test_vmdk_desc_errors),
        cmocka_unit_test(test_vmdk_desc_bounds),
        cmocka_unit_test(test_vmdk_create_type),
        cmocka_unit_test(test_vmdk_layout),
        cmocka_unit_test(test_vmdk_header_roundtrip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

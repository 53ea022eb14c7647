/*
 * src/util/util.h: checked arithmetic, alignment helpers and unaligned
 * byte-order loads and stores.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <setjmp.h>
#include <cmocka.h>

#include "util/util.h"

static void test_util_round_up_exact_and_up(void **state)
{
    uint64_t out = 12345;

    assert_true(vimg_round_up(0, 512, &out));
    assert_int_equal(out, 0);
    assert_true(vimg_round_up(1, 512, &out));
    assert_int_equal(out, 512);
    assert_true(vimg_round_up(512, 512, &out));
    assert_int_equal(out, 512);
    assert_true(vimg_round_up(513, 512, &out));
    assert_int_equal(out, 1024);
    /* any non-zero alignment, not only powers of two */
    assert_true(vimg_round_up(10, 3, &out));
    assert_int_equal(out, 12);
    assert_true(vimg_round_up(7, 1, &out));
    assert_int_equal(out, 7);
}

static void test_util_round_up_overflow(void **state)
{
    uint64_t out = 42;

    /* UINT64_MAX is not a multiple of 512 and the next one does not fit */
    assert_false(vimg_round_up(UINT64_MAX, 512, &out));
    assert_int_equal(out, 42);          /* unchanged on overflow */
    assert_false(vimg_round_up(UINT64_MAX - 510, 512, &out));
    assert_int_equal(out, 42);
    /* the largest multiple of 512 still fits */
    assert_true(vimg_round_up(UINT64_MAX - 1022, 512, &out));
    assert_int_equal(out, UINT64_MAX - 511);
    assert_true(vimg_round_up(UINT64_MAX - 1023, 512, &out));
    assert_int_equal(out, UINT64_MAX - 1023);
    assert_true(vimg_round_up(UINT64_MAX - 511, 512, &out));
    assert_int_equal(out, UINT64_MAX - 511);
    /* already aligned at the very top: fine */
    assert_true(vimg_round_up(UINT64_MAX, 1, &out));
    assert_int_equal(out, UINT64_MAX);
    assert_true(vimg_round_up(UINT64_MAX, UINT64_MAX, &out));
    assert_int_equal(out, UINT64_MAX);
    /* huge alignment: the only multiples are 0 and the alignment itself */
    assert_true(vimg_round_up(1, UINT64_MAX, &out));
    assert_int_equal(out, UINT64_MAX);
    assert_true(vimg_round_up(1, (uint64_t)1 << 63, &out));
    assert_int_equal(out, (uint64_t)1 << 63);
    out = 7;
    assert_false(vimg_round_up(((uint64_t)1 << 63) + 1, (uint64_t)1 << 63, &out));
    assert_int_equal(out, 7);
}

static void test_util_is_pow2(void **state)
{
    assert_false(vimg_is_pow2(0));
    assert_true(vimg_is_pow2(1));
    assert_true(vimg_is_pow2(2));
    assert_false(vimg_is_pow2(3));
    assert_true(vimg_is_pow2(4096));
    assert_false(vimg_is_pow2(4097));
    assert_false(vimg_is_pow2(6));
    assert_true(vimg_is_pow2((uint64_t)1 << 63));
    assert_false(vimg_is_pow2(UINT64_MAX));
    assert_false(vimg_is_pow2(((uint64_t)1 << 63) + 1));
    for (int i = 0; i < 64; i++) {
        assert_true(vimg_is_pow2((uint64_t)1 << i));
        if (i > 1) {
            assert_false(vimg_is_pow2(((uint64_t)1 << i) - 1));
        }
    }
}

static void test_util_align_down_and_is_aligned(void **state)
{
    assert_int_equal(vimg_align_down(0, 512), 0);
    assert_int_equal(vimg_align_down(511, 512), 0);
    assert_int_equal(vimg_align_down(512, 512), 512);
    assert_int_equal(vimg_align_down(1023, 512), 512);
    assert_int_equal(vimg_align_down(UINT64_MAX, 4096), UINT64_MAX - 4095);
    assert_int_equal(vimg_align_down(12345, 1), 12345);

    assert_true(vimg_is_aligned(0, 4096));
    assert_true(vimg_is_aligned(8192, 4096));
    assert_false(vimg_is_aligned(8193, 4096));
    assert_true(vimg_is_aligned(3, 1));
}

static void test_util_div_round_up(void **state)
{
    assert_int_equal(vimg_div_round_up(0, 512), 0);
    assert_int_equal(vimg_div_round_up(1, 512), 1);
    assert_int_equal(vimg_div_round_up(512, 512), 1);
    assert_int_equal(vimg_div_round_up(513, 512), 2);
    /* no intermediate overflow near the top */
    assert_int_equal(vimg_div_round_up(UINT64_MAX, 2), (UINT64_MAX / 2) + 1);
    assert_int_equal(vimg_div_round_up(UINT64_MAX, UINT64_MAX), 1);
}

static void test_util_add_overflow(void **state)
{
    uint64_t out = 0;

    assert_true(vimg_add_ok(1, 2, &out));
    assert_int_equal(out, 3);
    assert_true(vimg_add_ok(UINT64_MAX - 1, 1, &out));
    assert_int_equal(out, UINT64_MAX);
    assert_true(vimg_add_ok(UINT64_MAX, 0, &out));
    assert_int_equal(out, UINT64_MAX);
    assert_false(vimg_add_ok(UINT64_MAX, 1, &out));
    assert_false(vimg_add_ok(1, UINT64_MAX, &out));
    assert_false(vimg_add_ok((uint64_t)1 << 63, (uint64_t)1 << 63, &out));
}

static void test_util_mul_overflow(void **state)
{
    uint64_t out = 0;

    assert_true(vimg_mul_ok(0, UINT64_MAX, &out));
    assert_int_equal(out, 0);
    assert_true(vimg_mul_ok(65536, 65536, &out));
    assert_int_equal(out, (uint64_t)1 << 32);
    assert_true(vimg_mul_ok((uint64_t)1 << 32, ((uint64_t)1 << 32) - 1, &out));
    assert_int_equal(out, ((uint64_t)1 << 32) * (((uint64_t)1 << 32) - 1));
    assert_false(vimg_mul_ok((uint64_t)1 << 32, (uint64_t)1 << 32, &out));
    assert_false(vimg_mul_ok(UINT64_MAX, 2, &out));
    assert_true(vimg_mul_ok(UINT64_MAX, 1, &out));
    assert_int_equal(out, UINT64_MAX);
    assert_false(vimg_mul_ok(3, (UINT64_MAX / 3) + 1, &out));
}

static void test_util_be_roundtrip(void **state)
{
    uint8_t buf[11];

    /* an odd offset: the helpers must cope with unaligned buffers */
    memset(buf, 0xEE, sizeof(buf));
    vimg_st_be16(buf + 1, 0x1234);
    assert_int_equal(buf[1], 0x12);
    assert_int_equal(buf[2], 0x34);
    assert_int_equal(buf[0], 0xEE);
    assert_int_equal(buf[3], 0xEE);
    assert_int_equal(vimg_ld_be16(buf + 1), 0x1234);

    memset(buf, 0xEE, sizeof(buf));
    vimg_st_be32(buf + 1, 0x89ABCDEFu);
    assert_memory_equal(buf + 1, "\x89\xAB\xCD\xEF", 4);
    assert_int_equal(buf[5], 0xEE);
    assert_int_equal(vimg_ld_be32(buf + 1), 0x89ABCDEFu);

    memset(buf, 0xEE, sizeof(buf));
    vimg_st_be64(buf + 3, 0x0102030405060708ull);
    assert_memory_equal(buf + 3, "\x01\x02\x03\x04\x05\x06\x07\x08", 8);
    assert_int_equal(buf[2], 0xEE);
    assert_int_equal(vimg_ld_be64(buf + 3), 0x0102030405060708ull);

    /* qcow2's magic, big endian */
    assert_int_equal(vimg_ld_be32("QFI\xfb"), 0x514649FBu);
}

static void test_util_le_roundtrip(void **state)
{
    uint8_t buf[11];

    memset(buf, 0xEE, sizeof(buf));
    vimg_st_le16(buf + 1, 0x1234);
    assert_int_equal(buf[1], 0x34);
    assert_int_equal(buf[2], 0x12);
    assert_int_equal(vimg_ld_le16(buf + 1), 0x1234);

    memset(buf, 0xEE, sizeof(buf));
    vimg_st_le32(buf + 1, 0x89ABCDEFu);
    assert_memory_equal(buf + 1, "\xEF\xCD\xAB\x89", 4);
    assert_int_equal(vimg_ld_le32(buf + 1), 0x89ABCDEFu);

    memset(buf, 0xEE, sizeof(buf));
    vimg_st_le64(buf + 3, 0x0102030405060708ull);
    assert_memory_equal(buf + 3, "\x08\x07\x06\x05\x04\x03\x02\x01", 8);
    assert_int_equal(buf[2], 0xEE);
    assert_int_equal(vimg_ld_le64(buf + 3), 0x0102030405060708ull);

    /* the same bytes read the other way round */
    assert_int_equal(vimg_ld_be64(buf + 3), 0x0807060504030201ull);
    assert_int_equal(vimg_ld_be16("\xff\x01"), 0xFF01);
    assert_int_equal(vimg_ld_le16("\xff\x01"), 0x01FF);
}

static void test_util_min_max_array_size(void **state)
{
    int arr[7];

    assert_int_equal(VIMG_MIN(3, 5), 3);
    assert_int_equal(VIMG_MAX(3, 5), 5);
    assert_int_equal(VIMG_MIN((uint64_t)UINT64_MAX, (uint64_t)1), 1);
    assert_int_equal(VIMG_ARRAY_SIZE(arr), 7);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_util_round_up_exact_and_up),
        cmocka_unit_test(test_util_round_up_overflow),
        cmocka_unit_test(test_util_is_pow2),
        cmocka_unit_test(test_util_align_down_and_is_aligned),
        cmocka_unit_test(test_util_div_round_up),
        cmocka_unit_test(test_util_add_overflow),
        cmocka_unit_test(test_util_mul_overflow),
        cmocka_unit_test(test_util_be_roundtrip),
        cmocka_unit_test(test_util_le_roundtrip),
        cmocka_unit_test(test_util_min_max_array_size),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * vimg_parse_size / vimg_format_size against qemu-img 7.2.  Every expected
 * value below was checked with the real qemu-img 7.2: sizes through
 * `qemu-img create -f raw x.img SIZE` (its "Formatting ... size=N" line),
 * human sizes through `truncate -s N f; qemu-img info f`.
 */
#include "config.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <setjmp.h>
#include <cmocka.h>

#include "vimg/vimg.h"

/* Parse with default suffix def and return the value, failing the test on
 * an error. */
static uint64_t parse_ok(const char *s, char def)
{
    uint64_t v = 0xDEADBEEF;
    int ret = vimg_parse_size(s, def, &v);
    if (ret != 0) {
        fail_msg("vimg_parse_size(\"%s\", '%c') = %d, expected success", s, def, ret);
    }
    return v;
}

/* Expect an error; the output must stay untouched. */
static void parse_err(const char *s, char def, int expected)
{
    uint64_t v = 0xDEADBEEF;
    int ret = vimg_parse_size(s, def, &v);
    if (ret != expected) {
        fail_msg("vimg_parse_size(\"%s\", '%c') = %d, expected %d", s, def, ret, expected);
    }
    assert_int_equal(v, 0xDEADBEEF);
}

static void test_size_parse_suffixes(void **state)
{
    assert_int_equal(parse_ok("1G", 'B'), 1073741824ull);
    assert_int_equal(parse_ok("1g", 'B'), 1073741824ull);
    assert_int_equal(parse_ok("1k", 'B'), 1024);
    assert_int_equal(parse_ok("1K", 'B'), 1024);
    assert_int_equal(parse_ok("1M", 'B'), 1048576);
    assert_int_equal(parse_ok("2T", 'B'), 2ull << 40);
    assert_int_equal(parse_ok("3P", 'B'), 3ull << 50);
    assert_int_equal(parse_ok("1E", 'B'), 1ull << 60);
    assert_int_equal(parse_ok("15E", 'B'), 15ull << 60);
    assert_int_equal(parse_ok("1b", 'B'), 1);
    assert_int_equal(parse_ok("1B", 'B'), 1);
    assert_int_equal(parse_ok("0", 'B'), 0);
    assert_int_equal(parse_ok("0k", 'B'), 0);
}

static void test_size_parse_plain_default_suffix(void **state)
{
    assert_int_equal(parse_ok("100", 'B'), 100);
    assert_int_equal(parse_ok("1", 'M'), 1048576);
    assert_int_equal(parse_ok("1", 'k'), 1024);
    assert_int_equal(parse_ok("1.5", 'M'), 1572864);
    /* an explicit suffix beats the default one */
    assert_int_equal(parse_ok("1b", 'M'), 1);
    assert_int_equal(parse_ok("2k", 'M'), 2048);
}

static void test_size_parse_fractions(void **state)
{
    assert_int_equal(parse_ok("1.5M", 'B'), 1572864);
    assert_int_equal(parse_ok("0.5k", 'B'), 512);
    /* qemu accepts a dot without fraction digits */
    assert_int_equal(parse_ok("1.k", 'B'), 1024);
    assert_int_equal(parse_ok("1.", 'B'), 1);
    assert_int_equal(parse_ok("1.b", 'B'), 1);
    /* a zero fraction needs no unit */
    assert_int_equal(parse_ok("1.0", 'B'), 1);
    /* 0.1 KiB = 102.4 bytes: rounded to the nearest byte */
    assert_int_equal(parse_ok("0.1k", 'B'), 102);
    assert_int_equal(parse_ok("0.7k", 'B'), 717);
    assert_int_equal(parse_ok("0.123456789k", 'B'), 126);
    assert_int_equal(parse_ok("3.14159265358979G", 'B'), 3373259426ull);
    /* exactly half a byte rounds up, just below half rounds down */
    assert_int_equal(parse_ok("0.00048828125k", 'B'), 1);
    assert_int_equal(parse_ok("0.00048828126k", 'B'), 1);
    assert_int_equal(parse_ok("0.0004882812k", 'B'), 0);
    assert_int_equal(parse_ok("0.000244140625k", 'B'), 0);
    assert_int_equal(parse_ok("0.0000001k", 'B'), 0);
    assert_int_equal(parse_ok("1.000000000000000000001k", 'B'), 1024);
    /* 'e' after a fraction with nothing after it is the exa suffix */
    assert_int_equal(parse_ok("1.5e", 'B'), 1729382256910270464ull);
}

static void test_size_parse_hex(void **state)
{
    assert_int_equal(parse_ok("0x10", 'B'), 16);
    assert_int_equal(parse_ok("0X10", 'B'), 16);
    /* b and E are hex digits here, not suffixes */
    assert_int_equal(parse_ok("0x10b", 'B'), 267);
    assert_int_equal(parse_ok("0x1E", 'B'), 30);
    assert_int_equal(parse_ok("0xffffffffffffffff", 'B'), UINT64_MAX);
    /* qemu 7.2 still accepts a (deprecated) suffix on hex numbers */
    assert_int_equal(parse_ok("0x10k", 'B'), 16384);
    assert_int_equal(parse_ok("0x10K", 'B'), 16384);
    /* hex takes no fraction */
    parse_err("0x1.5", 'B', -EINVAL);
    parse_err("0x1.5k", 'B', -EINVAL);
    parse_err("0x", 'B', -EINVAL);
    parse_err("0xk", 'B', -EINVAL);
    parse_err("00x10", 'B', -EINVAL);
    parse_err("0x10000000000000000", 'B', -ERANGE);
}

static void test_size_parse_whitespace_and_sign(void **state)
{
    assert_int_equal(parse_ok(" 1k", 'B'), 1024);
    assert_int_equal(parse_ok("+1k", 'B'), 1024);
    parse_err("-1", 'B', -EINVAL);
    parse_err("-0", 'B', -EINVAL);
    parse_err(" -1k", 'B', -EINVAL);
    parse_err("1 k", 'B', -EINVAL);
    parse_err("1k ", 'B', -EINVAL);
    parse_err("+", 'B', -EINVAL);
    parse_err(" ", 'B', -EINVAL);
}

static void test_size_parse_invalid(void **state)
{
    parse_err("", 'B', -EINVAL);
    parse_err("abc", 'B', -EINVAL);
    parse_err("k", 'B', -EINVAL);
    parse_err(".5k", 'B', -EINVAL);
    /* a fraction of a byte needs a unit to scale it */
    parse_err("1.5", 'B', -EINVAL);
    parse_err("0.5", 'B', -EINVAL);
    parse_err("1.5b", 'B', -EINVAL);
    parse_err("2.5B", 'B', -EINVAL);
    /* an exponent makes the whole input invalid */
    parse_err("1.5e3", 'B', -EINVAL);
    parse_err("1.5E3", 'B', -EINVAL);
    parse_err("1e3", 'B', -EINVAL);
    /* two suffixes, junk after the suffix, two dots */
    parse_err("1kB", 'B', -EINVAL);
    parse_err("1kk", 'B', -EINVAL);
    parse_err("1x", 'B', -EINVAL);
    parse_err("1.5.5k", 'B', -EINVAL);
    parse_err("1Z", 'B', -EINVAL);
}

static void test_size_parse_range(void **state)
{
    assert_int_equal(parse_ok("18446744073709551615", 'B'), UINT64_MAX);
    assert_int_equal(parse_ok("9223372036854775807", 'B'), INT64_MAX);
    parse_err("18446744073709551616", 'B', -ERANGE);
    parse_err("99999999999999999999999", 'B', -ERANGE);
    parse_err("16E", 'B', -ERANGE);
    parse_err("16384P", 'B', -ERANGE);
    parse_err("17179869184G", 'B', -ERANGE);
    parse_err("18446744073709551615k", 'B', -ERANGE);
    /* the largest whole exbibyte count that fits */
    assert_int_equal(parse_ok("16383P", 'B'), 16383ull << 50);
    assert_int_equal(parse_ok("15.5E", 'B'), 15ull << 60 | 1ull << 59);
    /* the default suffix applies to the range check too */
    parse_err("16", 'E', -ERANGE);
    assert_int_equal(parse_ok("15", 'E'), 15ull << 60);
}

/* Return the formatted string in a static buffer for compact asserts. */
static const char *fmt(uint64_t v)
{
    static char buf[64];
    char *ret = vimg_format_size(v, buf, sizeof(buf));
    assert_ptr_equal(ret, buf);
    return buf;
}

static void test_size_format_exact_units(void **state)
{
    assert_string_equal(fmt(0), "0 B");
    assert_string_equal(fmt(1), "1 B");
    assert_string_equal(fmt(512), "512 B");
    assert_string_equal(fmt(4096), "4 KiB");
    assert_string_equal(fmt(1048576), "1 MiB");
    assert_string_equal(fmt(1073741824), "1 GiB");
    assert_string_equal(fmt(1ull << 40), "1 TiB");
    assert_string_equal(fmt(1ull << 50), "1 PiB");
    assert_string_equal(fmt(1ull << 60), "1 EiB");
    assert_string_equal(fmt(UINT64_MAX), "16 EiB");
}

static void test_size_format_three_digits(void **state)
{
    assert_string_equal(fmt(1572864), "1.5 MiB");
    assert_string_equal(fmt(1072693248), "0.999 GiB");
    assert_string_equal(fmt(1047552), "0.999 MiB");
    assert_string_equal(fmt(1048064), "1 MiB");
    assert_string_equal(fmt(1024000), "0.977 MiB");
    /* the unit switches once the integer part would reach 1000 */
    assert_string_equal(fmt(999), "999 B");
    assert_string_equal(fmt(1000), "0.977 KiB");
    assert_string_equal(fmt(1023), "0.999 KiB");
    assert_string_equal(fmt(1024), "1 KiB");
    assert_string_equal(fmt(200704), "196 KiB");
    assert_string_equal(fmt(1000ull * 1024), "0.977 MiB");
    assert_string_equal(fmt(999ull * 1024), "999 KiB");
    assert_string_equal(fmt(10737418240ull), "10 GiB");
}

static void test_size_format_truncates_to_buffer(void **state)
{
    char buf[4];
    memset(buf, 'x', sizeof(buf));
    assert_ptr_equal(vimg_format_size(1073741824, buf, sizeof(buf)), buf);
    assert_string_equal(buf, "1 G");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_size_parse_suffixes),
        cmocka_unit_test(test_size_parse_plain_default_suffix),
        cmocka_unit_test(test_size_parse_fractions),
        cmocka_unit_test(test_size_parse_hex),
        cmocka_unit_test(test_size_parse_whitespace_and_sign),
        cmocka_unit_test(test_size_parse_invalid),
        cmocka_unit_test(test_size_parse_range),
        cmocka_unit_test(test_size_format_exact_units),
        cmocka_unit_test(test_size_format_three_digits),
        cmocka_unit_test(test_size_format_truncates_to_buffer),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * qcow2 internals: packed refcount entries of every width (1..64 bits, LSB
 * first below 8 bits, big-endian above), and the compression codecs both
 * ways (raw deflate with a 4 KiB window, zstd), including qemu's rule that
 * trailing bytes after a full cluster are ignored.
 */
#include "config.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <cmocka.h>

#include "formats/qcow2/qcow2.h"

static void test_qcow2_refcount_widths(void **state)
{
    uint8_t rb[512];

    for (unsigned order = 0; order <= 6; order++) {
        struct qcow2_state s = { 0 };
        uint64_t entries = sizeof(rb) * 8 >> order;
        uint64_t max = 64 == (1u << order) ? UINT64_MAX : (1ull << (1u << order)) - 1;

        s.refcount_order = order;
        s.refcount_bits = 1u << order;
        memset(rb, 0, sizeof(rb));
        for (uint64_t i = 0; i < entries; i++) {
            qcow2_rb_set(&s, rb, i, (i * 7 + 3) & max);
        }
        for (uint64_t i = 0; i < entries; i++) {
            assert_int_equal((i * 7 + 3) & max, qcow2_rb_get(&s, rb, i));
        }
        qcow2_rb_set(&s, rb, 1, max);
        assert_int_equal(max, qcow2_rb_get(&s, rb, 1));
        assert_int_equal((0 * 7 + 3) & max, qcow2_rb_get(&s, rb, 0));
        assert_int_equal((2 * 7 + 3) & max, qcow2_rb_get(&s, rb, 2));
    }
    /* on-disk layout: bit 0 is the LSB of the byte; 16-bit is big-endian */
    {
        struct qcow2_state s = { .refcount_order = 0, .refcount_bits = 1 };
        memset(rb, 0, sizeof(rb));
        qcow2_rb_set(&s, rb, 0, 1);
        qcow2_rb_set(&s, rb, 9, 1);
        assert_int_equal(0x01, rb[0]);
        assert_int_equal(0x02, rb[1]);
    }
    {
        struct qcow2_state s = { .refcount_order = 4, .refcount_bits = 16 };
        memset(rb, 0, sizeof(rb));
        qcow2_rb_set(&s, rb, 1, 0x1234);
        assert_int_equal(0x12, rb[2]);
        assert_int_equal(0x34, rb[3]);
    }
}

static void roundtrip(int type, size_t cs)
{
    uint8_t *in = malloc(cs), *c = malloc(cs + 64), *out = malloc(cs);
    long n;

    for (size_t i = 0; i < cs; i++) {
        in[i] = (uint8_t)((i / 100) * 31);
    }
    n = qcow2_compress(type, c, cs - 1, in, cs);
    assert_true(n > 0 && (size_t)n < cs);
    /* qemu reads up to the end of the last sector: trailing junk is fine */
    memset(c + n, 0xee, 64);
    assert_int_equal(0, qcow2_decompress(type, out, cs, c, (size_t)n + 64));
    assert_memory_equal(in, out, cs);
    /* a truncated stream cannot fill the cluster */
    assert_true(qcow2_decompress(type, out, cs, c, (size_t)n / 2) < 0);
    /* incompressible data does not fit in cluster_size - 1 */
    srand(1);
    for (size_t i = 0; i < cs; i++) {
        in[i] = (uint8_t)rand();
    }
    assert_int_equal(-ENOSPC, qcow2_compress(type, c, cs - 1, in, cs));
    free(in);
    free(c);
    free(out);
}

static void test_qcow2_refcount_codecs(void **state)
{
    roundtrip(QCOW2_COMPRESS_ZLIB, 512);
    roundtrip(QCOW2_COMPRESS_ZLIB, 65536);
    roundtrip(QCOW2_COMPRESS_ZLIB, 2 << 20);
#if HAVE_ZSTD
    roundtrip(QCOW2_COMPRESS_ZSTD, 4096);
    roundtrip(QCOW2_COMPRESS_ZSTD, 65536);
#endif
    assert_true(qcow2_decompress(7, NULL, 0, NULL, 0) < 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_qcow2_refcount_widths),
        cmocka_unit_test(test_qcow2_refcount_codecs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * src/formats/zcodec.c: the DEFLATE helpers of qcow, qcow2 and vmdk.  zlib
 * is the reference (it is what qemu uses), so besides the plain cases every
 * answer is checked against zlib's own on many damaged streams: with
 * libdeflate built in, a stream must decode (or fail) exactly as with zlib.
 */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <cmocka.h>
#include <zlib.h>

#include "formats/zcodec.h"

#define CL 65536

/* Disk-like data: text, runs of zeros and a little noise. */
static void fill(uint8_t *p, size_t n, unsigned seed)
{
    static const char *w[] = { "int ", "return ", "struct ", "vimg ", "{\n", "}\n",
                               "qcow2 ", "0x1f, ", "static ", "#include ", "void ", "\n" };
    size_t i = 0;

    srand(seed);
    while (i < n) {
        int k = rand() % 16;
        if (k < 12) {
            for (const char *s = w[k]; *s && i < n; s++) {
                p[i++] = (uint8_t)*s;
            }
        } else if (k < 14) {
            for (int j = rand() % 300; j > 0 && i < n; j--) {
                p[i++] = 0;
            }
        } else {
            for (int j = rand() % 40; j > 0 && i < n; j--) {
                p[i++] = (uint8_t)rand();
            }
        }
    }
}

/* raw deflate with a 4 KiB window, as qemu's qcow2 writes it */
static size_t raw_deflate(uint8_t *dst, size_t cap, const uint8_t *src, size_t n)
{
    z_stream z;

    memset(&z, 0, sizeof(z));
    assert_int_equal(Z_OK, deflateInit2(&z, 6, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY));
    z.next_in = (Bytef *)src;
    z.avail_in = (uInt)n;
    z.next_out = dst;
    z.avail_out = (uInt)cap;
    assert_int_equal(Z_STREAM_END, deflate(&z, Z_FINISH));
    deflateEnd(&z);
    return cap - z.avail_out;
}

/* qemu's qcow2_decompress, with zlib only: the reference answer */
static int ref_inflate_raw(uint8_t *dst, size_t dlen, const uint8_t *src, size_t slen)
{
    z_stream z;
    int ret;

    memset(&z, 0, sizeof(z));
    assert_int_equal(Z_OK, inflateInit2(&z, -12));
    z.next_in = (Bytef *)src;
    z.avail_in = (uInt)slen;
    z.next_out = dst;
    z.avail_out = (uInt)dlen;
    ret = inflate(&z, Z_FINISH);
    inflateEnd(&z);
    return (Z_STREAM_END == ret || Z_BUF_ERROR == ret) && 0 == z.avail_out ? 0 : -EIO;
}

static void test_inflate_raw_cluster_with_sector_tail(void **state)
{
    uint8_t *in = malloc(CL), *c = malloc(2 * CL), *out = malloc(CL);
    size_t n;

    fill(in, CL, 1);
    n = raw_deflate(c, 2 * CL, in, CL);
    /* qcow2 stores the length rounded up to the sector: garbage follows */
    memset(c + n, 0xa5, 512);
    assert_int_equal(0, vimg_inflate_raw(out, CL, c, n + 511, 12));
    assert_memory_equal(in, out, CL);
    assert_int_equal(0, vimg_inflate_raw(out, CL, c, n, 12));
    assert_memory_equal(in, out, CL);
    free(in);
    free(c);
    free(out);
}

static void test_inflate_raw_longer_stream_fills_cluster(void **state)
{
    uint8_t *in = malloc(2 * CL), *c = malloc(3 * CL), *out = malloc(CL);
    size_t n;

    /* qemu accepts a stream that has more once the cluster is full */
    fill(in, 2 * CL, 2);
    n = raw_deflate(c, 3 * CL, in, CL + 4096);
    assert_int_equal(0, vimg_inflate_raw(out, CL, c, n, 12));
    assert_memory_equal(in, out, CL);
    free(in);
    free(c);
    free(out);
}

static void test_inflate_raw_short_or_cut_is_eio(void **state)
{
    uint8_t *in = malloc(CL), *c = malloc(2 * CL), *out = malloc(CL);
    size_t n;

    fill(in, CL, 3);
    n = raw_deflate(c, 2 * CL, in, CL - 1);
    assert_int_equal(-EIO, vimg_inflate_raw(out, CL, c, n, 12));
    n = raw_deflate(c, 2 * CL, in, CL);
    assert_int_equal(-EIO, vimg_inflate_raw(out, CL, c, n / 2, 12));
    assert_int_equal(-EIO, vimg_inflate_raw(out, CL, c, 0, 12));
    free(in);
    free(c);
    free(out);
}

/* Damaged streams decode exactly as zlib decodes them. */
static void test_inflate_raw_matches_zlib_on_damage(void **state)
{
    uint8_t *in = malloc(CL), *c = malloc(2 * CL), *m = malloc(2 * CL);
    uint8_t *a = malloc(CL), *b = malloc(CL);
    size_t n;
    unsigned ok = 0;

    fill(in, CL, 4);
    n = raw_deflate(c, 2 * CL, in, CL);
    srand(77);
    for (int i = 0; i < 3000; i++) {
        size_t len = n + 64;
        int flips = 1 + rand() % 3;
        memcpy(m, c, n);
        memset(m + n, rand() & 0xff, 64);
        for (int f = 0; f < flips; f++) {
            m[(size_t)rand() % n] ^= (uint8_t)(1u << (rand() % 8));
        }
        if (0 == i % 7) {
            len = (size_t)rand() % (n + 64);
        }
        memset(a, 0x11, CL);
        memset(b, 0x11, CL);
        int want = ref_inflate_raw(a, CL, m, len);
        int got = vimg_inflate_raw(b, CL, m, len, 12);
        assert_int_equal(want, got);
        if (0 == want) {
            assert_memory_equal(a, b, CL);
            ok++;
        }
    }
    /* the flips must leave some streams decodable, or the test is idle */
    assert_true(ok > 0);
    free(in);
    free(c);
    free(m);
    free(a);
    free(b);
}

static void test_zlib_uncompress_plain_tail_and_short(void **state)
{
    uint8_t *in = malloc(CL), *c = malloc(2 * CL), *out = malloc(CL);
    uLongf n = 2 * CL;
    size_t got = 0;

    fill(in, CL, 5);
    assert_int_equal(Z_OK, compress2(c, &n, in, CL, 6));
    memset(c + n, 0, 512);
    /* bytes after the stream (the rest of the sector) are ignored */
    assert_int_equal(0, vimg_zlib_uncompress(out, CL, &got, c, n + 500));
    assert_int_equal(CL, got);
    assert_memory_equal(in, out, CL);
    /* a grain may be shorter than the buffer (the last one of a disk) */
    n = 2 * CL;
    assert_int_equal(Z_OK, compress2(c, &n, in, 1000, 6));
    assert_int_equal(0, vimg_zlib_uncompress(out, CL, &got, c, n));
    assert_int_equal(1000, got);
    assert_memory_equal(in, out, 1000);
    /* too long for the buffer, cut, bad checksum */
    assert_int_equal(-EIO, vimg_zlib_uncompress(out, 999, &got, c, n));
    assert_int_equal(-EIO, vimg_zlib_uncompress(out, CL, &got, c, n - 1));
    c[n - 1] ^= 1;
    assert_int_equal(-EIO, vimg_zlib_uncompress(out, CL, &got, c, n));
    free(in);
    free(c);
    free(out);
}

static void test_zlib_uncompress_matches_zlib_on_damage(void **state)
{
    uint8_t *in = malloc(CL), *c = malloc(2 * CL), *m = malloc(2 * CL);
    uint8_t *a = malloc(CL), *b = malloc(CL);
    uLongf n = 2 * CL;

    fill(in, CL, 6);
    assert_int_equal(Z_OK, compress2(c, &n, in, CL, 6));
    srand(78);
    for (int i = 0; i < 2000; i++) {
        size_t len = n, got = 0;
        uLongf want_len = CL;
        memcpy(m, c, n);
        m[(size_t)rand() % n] ^= (uint8_t)(1u << (rand() % 8));
        if (0 == i % 5) {
            len = (size_t)rand() % n;
        }
        int want = Z_OK == uncompress(a, &want_len, m, len) ? 0 : -EIO;
        int r = vimg_zlib_uncompress(b, CL, &got, m, len);
        assert_int_equal(want, r);
        if (0 == want) {
            assert_int_equal(want_len, got);
            assert_memory_equal(a, b, got);
        }
    }
    free(in);
    free(c);
    free(m);
    free(a);
    free(b);
}

static void test_zlib_compress_round_trip_and_nospc(void **state)
{
    uint8_t *in = malloc(CL), *c = malloc(2 * CL), *out = malloc(CL);
    uLongf n = CL;
    long r;

    fill(in, CL, 7);
    r = vimg_zlib_compress(c, 2 * CL, in, CL);
    assert_true(r > 0 && r < CL);
    /* whatever encoded it, zlib (qemu's decoder) reads it back */
    assert_int_equal(Z_OK, uncompress(out, &n, c, (uLong)r));
    assert_int_equal(CL, n);
    assert_memory_equal(in, out, CL);
    assert_int_equal(-ENOSPC, vimg_zlib_compress(c, 16, in, CL));
    /* noise does not shrink; a bound's worth of room still takes it */
    for (size_t i = 0; i < CL; i++) {
        in[i] = (uint8_t)rand();
    }
    r = vimg_zlib_compress(c, compressBound(CL), in, CL);
    assert_true(r > CL);
    n = CL;
    assert_int_equal(Z_OK, uncompress(out, &n, c, (uLong)r));
    assert_memory_equal(in, out, CL);
    assert_int_equal(-ENOSPC, vimg_zlib_compress(c, CL, in, CL));
    free(in);
    free(c);
    free(out);
}

/* qcow/qcow2 clusters: what qemu's encoder (a fresh zlib stream, default
 * level, 4 KiB window, memLevel 9) gives, byte for byte, also when the
 * thread's encoder is reused and after a result that did not fit. */
static void test_deflate_raw_is_qemus(void **state)
{
    uint8_t *in = malloc(CL), *c = malloc(2 * CL), *ref = malloc(2 * CL);

    for (unsigned seed = 1; seed < 6; seed++) {
        fill(in, CL, seed);
        size_t n = raw_deflate(ref, 2 * CL, in, CL);
        assert_int_equal(-ENOSPC, vimg_deflate_raw(c, n / 2, in, CL, 12));
        long r = vimg_deflate_raw(c, CL - 1, in, CL, 12);
        assert_int_equal((long)n, r);
        assert_memory_equal(ref, c, n);
    }
    /* noise: refused at once when it must shrink, encoded when it may not */
    for (size_t i = 0; i < CL; i++) {
        in[i] = (uint8_t)rand();
    }
    assert_int_equal(-ENOSPC, vimg_deflate_raw(c, CL - 1, in, CL, 12));
    assert_true(vimg_deflate_raw(c, 2 * CL, in, CL, 12) >= CL);
    assert_int_equal(-EINVAL, vimg_deflate_raw(c, CL, in, CL, 16));
    free(in);
    free(c);
    free(ref);
}

/* vmdk grains: never bigger than zlib's default level (qemu's) on
 * disk-like data, and stored blocks for noise, which zlib reads back. */
static void test_zlib_compress_size_and_stored(void **state)
{
    uint8_t *in = malloc(CL), *c = malloc(2 * CL), *out = malloc(CL);
    size_t ours = 0, zl = 0;

    for (unsigned seed = 20; seed < 30; seed++) {
        uLongf z = 2 * CL;
        fill(in, CL, seed);
        long r = vimg_zlib_compress(c, 2 * CL, in, CL);
        assert_true(r > 0);
        ours += (size_t)r;
        assert_int_equal(Z_OK, compress2(c, &z, in, CL, Z_DEFAULT_COMPRESSION));
        zl += z;
    }
    assert_true(ours <= zl);
    for (size_t i = 0; i < CL; i++) {
        in[i] = (uint8_t)rand();
    }
    /* header, two stored blocks (65535 + 1 bytes), Adler-32 */
    assert_int_equal(2 + 5 + 65535 + 5 + 1 + 4, vimg_zlib_compress(c, 2 * CL, in, CL));
    assert_int_equal(-ENOSPC, vimg_zlib_compress(c, 2 + 5 + 65535 + 5 + 1 + 4 - 1, in, CL));
    assert_int_equal(2 + 5 + 65535 + 5 + 1 + 4, vimg_zlib_compress(c, 2 + 5 + 65535 + 5 + 1 + 4, in, CL));
    uLongf n = CL;
    assert_int_equal(Z_OK, uncompress(out, &n, c, 2 + 5 + 65535 + 5 + 1 + 4));
    assert_int_equal(CL, n);
    assert_memory_equal(in, out, CL);
    free(in);
    free(c);
    free(out);
}

/* Each thread has its own codec objects: run several at once (ASan/TSan
 * builds see any sharing) and let them exit (their objects are freed). */
static void *codec_thread(void *arg)
{
    uint8_t *in = malloc(CL), *c = malloc(2 * CL), *out = malloc(CL);
    unsigned seed = (unsigned)(uintptr_t)arg;
    intptr_t bad = 0;

    fill(in, CL, seed);
    for (int i = 0; i < 20; i++) {
        long r = vimg_zlib_compress(c, 2 * CL, in, CL);
        size_t got = 0;
        if (r <= 0 || vimg_zlib_uncompress(out, CL, &got, c, (size_t)r) || got != CL ||
            memcmp(in, out, CL)) {
            bad++;
        }
        long n = vimg_deflate_raw(c, 2 * CL, in, CL, 12);
        if (n <= 0 || vimg_inflate_raw(out, CL, c, (size_t)n, 12) || memcmp(in, out, CL)) {
            bad++;
        }
    }
    free(in);
    free(c);
    free(out);
    return (void *)bad;
}

/* The gate may only say "incompressible" where deflate indeed cannot get
 * below the cluster size; random data must be recognised. */
static void test_looks_incompressible(void **state)
{
    enum { CS = 65536 };
    uint8_t *g = malloc(CS), *c = malloc(2 * CS);
    uint32_t x = 12345;
    int judged = 0;

    assert_non_null(g);
    assert_non_null(c);
    for (int t = 0; t < 200; t++) {
        for (int i = 0; i < CS; i++) {
            x = x * 1103515245u + 12345u;
            g[i] = (uint8_t)(x >> 23);
        }
        /* a few zeros or copies in some of them */
        for (int k = 0; k < t % 40; k++) {
            g[(k * 7919 + t) % CS] = 0;
        }
        if (t % 10 == 9) {
            memcpy(g + 1000, g, 300);
        }
        bool inc = vimg_looks_incompressible(g, CS);
        judged += inc;
        if (inc) {
            assert_true(raw_deflate(c, 2 * CS, g, CS) >= CS - 1);
        }
    }
    assert_true(judged >= 150);
    /* structured data with every byte value equally often */
    for (int i = 0; i < CS; i += 2) {
        g[i] = (uint8_t)(i >> 8);
        g[i + 1] = (uint8_t)(i >> 1);
    }
    assert_false(vimg_looks_incompressible(g, CS));
    for (int i = 0; i < CS; i++) {
        g[i] = (uint8_t)((i / 100) * 31);
    }
    assert_false(vimg_looks_incompressible(g, CS));
    for (int i = 0; i < CS; i++) {
        g[i] = (uint8_t)i;
    }
    assert_false(vimg_looks_incompressible(g, CS));
    /* too short to judge */
    assert_false(vimg_looks_incompressible(g, 4096));
    free(g);
    free(c);
}

static void test_codecs_on_threads(void **state)
{
    pthread_t t[4];

    for (uintptr_t i = 0; i < 4; i++) {
        assert_int_equal(0, pthread_create(&t[i], NULL, codec_thread, (void *)(i + 10)));
    }
    for (int i = 0; i < 4; i++) {
        void *bad = (void *)1;
        assert_int_equal(0, pthread_join(t[i], &bad));
        assert_null(bad);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_inflate_raw_cluster_with_sector_tail),
        cmocka_unit_test(test_inflate_raw_longer_stream_fills_cluster),
        cmocka_unit_test(test_inflate_raw_short_or_cut_is_eio),
        cmocka_unit_test(test_inflate_raw_matches_zlib_on_damage),
        cmocka_unit_test(test_zlib_uncompress_plain_tail_and_short),
        cmocka_unit_test(test_zlib_uncompress_matches_zlib_on_damage),
        cmocka_unit_test(test_zlib_compress_round_trip_and_nospc),
        cmocka_unit_test(test_deflate_raw_is_qemus),
        cmocka_unit_test(test_zlib_compress_size_and_stored),
        cmocka_unit_test(test_looks_incompressible),
        cmocka_unit_test(test_codecs_on_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

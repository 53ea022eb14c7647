/*
 * src/formats/cow.c: UML cow files, checked against the published layouts
 * (Linux arch/um/drivers/cow_user.c, QEMU <= 2.1 block/cow.c), since no
 * qemu-img of today reads them.  The header parser on hand-built headers,
 * every layout fixture of tests/images (made by make_cow_fixtures.py) read
 * bit-exact, the hostile fixtures refused with one line, and create / write
 * / read round trips with and without a backing file.
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
#include <sys/time.h>
#include <unistd.h>
#include <setjmp.h>
#include <cmocka.h>

#include "test_tmp.h"

#include "core/image.h"
#include "formats/cow.h"
#include "util/util.h"
#include "vimg/vimg.h"

static char images[PATH_MAX - 64];

static int group_setup(void **state)
{
    char *slash;

    if (test_tmp_make("test_cow") < 0) {
        return -1;
    }
    snprintf(images, sizeof(images), "%s", __FILE__);
    slash = strrchr(images, '/');
    if (slash) {
        *slash = '\0';
    }
    slash = strrchr(images, '/');
    if (slash) {
        strcpy(slash, "/images");
    }
    /* backing paths are absolute: make the folder's name canonical */
    char *real = realpath(tmpdir, NULL);
    if (!real) {
        return -1;
    }
    snprintf(tmpdir, sizeof(tmpdir), "%s", real);
    free(real);
    return 0;
}

static int group_teardown(void **state)
{
    return test_tmp_remove();
}

/* ---- the header parser ---------------------------------------------------- */

static uint8_t hbuf[COW_PROBE_LEN];

static void v3_header(uint8_t *h, uint64_t size, uint32_t align, const char *name)
{
    memset(h, 0, COW_PROBE_LEN);
    vimg_st_be32(h, COW_MAGIC);
    vimg_st_be32(h + 4, 3);
    vimg_st_be32(h + 8, 1234);
    vimg_st_be64(h + 12, size);
    vimg_st_be32(h + 20, 512);
    vimg_st_be32(h + 24, align);
    vimg_st_be32(h + 28, 0);
    strcpy((char *)h + 32, name);
}

static int parse(uint64_t fsize, struct cow_layout *l, char *why)
{
    return vimg_internal_cow_parse(hbuf, fsize, l, why, 512);
}

static void test_cow_parse_v3(void **state)
{
    struct cow_layout l;
    char why[512];

    v3_header(hbuf, 1 << 20, 4096, "/base.img");
    assert_int_equal(parse(1 << 24, &l, why), 0);
    assert_int_equal(l.variant, COW_V3);
    assert_int_equal(l.size, 1 << 20);
    assert_int_equal(l.mtime, 1234);
    assert_int_equal(l.bitmap_off, 8192);
    /* 2048 sectors: 256 bitmap bytes, data on the next page */
    assert_int_equal(l.data_off, 12288);
    assert_int_equal(l.name_off, 32);

    /* no backing file: the zero word at 32 makes both layouts candidates,
     * and only the standard one makes sense */
    v3_header(hbuf, 1 << 20, 4096, "");
    assert_int_equal(parse(1 << 24, &l, why), 0);
    assert_int_equal(l.variant, COW_V3);

    /* the broken 64-bit layout: 4 bytes of padding after mtime */
    memset(hbuf, 0, sizeof(hbuf));
    vimg_st_be32(hbuf, COW_MAGIC);
    vimg_st_be32(hbuf + 4, 3);
    vimg_st_be32(hbuf + 8, 99);
    vimg_st_be64(hbuf + 16, 1 << 20);
    vimg_st_be32(hbuf + 24, 512);
    vimg_st_be32(hbuf + 28, 4096);
    strcpy((char *)hbuf + 36, "/base.img");
    assert_int_equal(parse(1 << 24, &l, why), 0);
    assert_int_equal(l.variant, COW_V3_BROKEN);
    assert_int_equal(l.size, 1 << 20);
    assert_int_equal(l.mtime, 99);
    assert_int_equal(l.name_off, 36);
    assert_int_equal(l.bitmap_off, 8192);

    /* alignment 0 would divide by zero in Linux */
    v3_header(hbuf, 1 << 20, 0, "/b");
    assert_int_equal(parse(1 << 24, &l, why), -EINVAL);
    assert_non_null(strstr(why, "alignment"));
    /* unknown cow_format */
    v3_header(hbuf, 1 << 20, 4096, "/b");
    vimg_st_be32(hbuf + 28, 1);
    assert_int_equal(parse(1 << 24, &l, why), -EINVAL);
    assert_non_null(strstr(why, "cow_format"));
    /* file shorter than its header */
    v3_header(hbuf, 1 << 20, 4096, "/b");
    assert_int_equal(parse(100, &l, why), -EINVAL);
    assert_non_null(strstr(why, "shorter"));
}

static void test_cow_parse_v1_v2(void **state)
{
    struct cow_layout l;
    char why[512];

    /* v1 written on a little-endian host: "MOOO", host-order fields */
    memset(hbuf, 0, sizeof(hbuf));
    vimg_st_le32(hbuf, COW_MAGIC);
    vimg_st_le32(hbuf + 4, 1);
    strcpy((char *)hbuf + 8, "/b");
    vimg_st_le32(hbuf + 264, 7);
    vimg_st_le64(hbuf + 268, 9 * 512);
    vimg_st_le32(hbuf + 276, 512);
    assert_int_equal(parse(1 << 20, &l, why), 0);
    assert_int_equal(l.variant, COW_V1);
    assert_int_equal(l.size, 9 * 512);
    assert_int_equal(l.mtime, 7);
    assert_int_equal(l.bitmap_off, 280);
    assert_int_equal(l.data_off, 512);
    /* the same on a big-endian host */
    memset(hbuf, 0, sizeof(hbuf));
    vimg_st_be32(hbuf, COW_MAGIC);
    vimg_st_be32(hbuf + 4, 1);
    vimg_st_be64(hbuf + 268, 9 * 512);
    vimg_st_be32(hbuf + 276, 512);
    assert_int_equal(parse(1 << 20, &l, why), 0);
    assert_int_equal(l.size, 9 * 512);

    /* Linux v2 */
    memset(hbuf, 0, sizeof(hbuf));
    vimg_st_be32(hbuf, COW_MAGIC);
    vimg_st_be32(hbuf + 4, 2);
    strcpy((char *)hbuf + 8, "/b");
    vimg_st_be64(hbuf + 4108, 1 << 20);
    vimg_st_be32(hbuf + 4116, 512);
    assert_int_equal(parse(1 << 20, &l, why), 0);
    assert_int_equal(l.variant, COW_V2_LINUX);
    assert_int_equal(l.bitmap_off, 4120);
    assert_int_equal(l.data_off, 4608);

    /* QEMU's v2, x86-64 and i386 */
    memset(hbuf, 0, sizeof(hbuf));
    vimg_st_be32(hbuf, COW_MAGIC);
    vimg_st_be32(hbuf + 4, 2);
    vimg_st_be64(hbuf + 1040, 1 << 20);
    vimg_st_be32(hbuf + 1048, 512);
    assert_int_equal(parse(1056 + 256, &l, why), 0);
    assert_int_equal(l.variant, COW_V2_QEMU64);
    assert_int_equal(l.bitmap_off, 1056);
    assert_int_equal(l.data_off, 1536);
    /* ... but not when the file is cut inside its bitmap */
    assert_int_equal(parse(1100, &l, why), -EINVAL);
    memset(hbuf, 0, sizeof(hbuf));
    vimg_st_be32(hbuf, COW_MAGIC);
    vimg_st_be32(hbuf + 4, 2);
    vimg_st_be64(hbuf + 1036, 1 << 20);
    vimg_st_be32(hbuf + 1044, 512);
    assert_int_equal(parse(1048 + 256, &l, why), 0);
    assert_int_equal(l.variant, COW_V2_QEMU32);
    assert_int_equal(l.bitmap_off, 1048);

    /* valid as Linux's and as QEMU's layout: refused, not guessed */
    vimg_st_be64(hbuf + 4108, 1 << 20);
    vimg_st_be32(hbuf + 4116, 512);
    assert_int_equal(parse(1 << 20, &l, why), -EINVAL);
    assert_non_null(strstr(why, "ambiguous"));

    /* bad magic, unknown version */
    memset(hbuf, 0, sizeof(hbuf));
    assert_int_equal(parse(1 << 20, &l, why), -EINVAL);
    vimg_st_be32(hbuf, COW_MAGIC);
    vimg_st_be32(hbuf + 4, 4);
    assert_int_equal(parse(1 << 20, &l, why), -ENOTSUP);
    assert_string_equal(why, "unsupported cow version 4");
}

static void test_cow_probe(void **state)
{
    uint8_t b[64] = { 0 };
    vimg_st_be32(b, COW_MAGIC);
    for (uint32_t v = 1; v <= 3; v++) {
        vimg_st_be32(b + 4, v);
        assert_string_equal(vimg_internal_probe(b, sizeof(b), "x")->name, "cow");
    }
    vimg_st_le32(b, COW_MAGIC);
    vimg_st_le32(b + 4, 1);
    assert_string_equal(vimg_internal_probe(b, sizeof(b), "x")->name, "cow");
    vimg_st_be32(b, COW_MAGIC);
    vimg_st_be32(b + 4, 7);
    assert_string_equal(vimg_internal_probe(b, sizeof(b), "x")->name, "raw");
}

/* ---- fixtures ------------------------------------------------------------- */

static uint8_t *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    uint8_t *buf;
    long n;

    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static void check_image(struct vimg_image *img, const uint8_t *want, size_t len)
{
    struct vimg_error err = { 0 };
    uint8_t *buf = malloc(len);
    assert_non_null(buf);
    assert_int_equal(vimg_size(img), len);
    assert_int_equal(vimg_pread(img, buf, len, 0, &err), 0);
    assert_memory_equal(buf, want, len);
    /* block status agrees: every run reads what it says */
    for (uint64_t off = 0; off < len;) {
        struct vimg_status st;
        assert_int_equal(vimg_block_status(img, off, len - off, &st, &err), 0);
        assert_true(st.length > 0);
        off += st.length;
    }
    free(buf);
}

static void test_cow_fixtures(void **state)
{
    static const char *const files[] = {
        "cow-v1-le.cow", "cow-v1-be.cow", "cow-v2-linux.cow", "cow-v2-qemu64.cow",
        "cow-v2-qemu32.cow", "cow-v3.cow", "cow-v3-align512.cow", "cow-v3-broken.cow",
    };
    char path[PATH_MAX];
    size_t len;
    uint8_t *want;

    snprintf(path, sizeof(path), "%s/cow-expected.raw", images);
    want = read_file(path, &len);
    for (size_t i = 0; i < VIMG_ARRAY_SIZE(files); i++) {
        struct vimg_image *img = NULL;
        struct vimg_error err = { 0 };
        snprintf(path, sizeof(path), "%s/%s", images, files[i]);
        if (vimg_open(&img, path, NULL, 0, NULL, &err) < 0) {
            print_error("%s: %s\n", files[i], err.msg);
        }
        assert_non_null(img);
        assert_string_equal(vimg_format(img), "cow");
        check_image(img, want, len);
        vimg_close(img);
    }
    free(want);

    /* Linux's v1/v2 rounding bug: the bitmap is a byte short, the bits are
     * still there */
    struct vimg_image *img = NULL;
    struct vimg_error err = { 0 };
    snprintf(path, sizeof(path), "%s/cow-v2-linux-roundbug.raw", images);
    want = read_file(path, &len);
    snprintf(path, sizeof(path), "%s/cow-v2-linux-roundbug.cow", images);
    assert_int_equal(vimg_open(&img, path, "cow", 0, NULL, &err), 0);
    check_image(img, want, len);
    vimg_close(img);
    free(want);
}

static void test_cow_hostile(void **state)
{
    static const struct {
        const char *file, *msg;
    } cases[] = {
        { "cow-v3-align0.cow", "alignment is not a power of two" },
        { "cow-v3-format1.cow", "unknown cow_format" },
        { "cow-v3-sectorsize.cow", "sector size is not a power of two" },
        { "cow-v3-huge.cow", "disk size is implausibly large" },
        { "cow-v3-tiny.cow", "disk size is smaller than one sector" },
        { "cow-v3-noterm.cow", "backing file name is not NUL-terminated" },
        { "cow-version9.cow", "unsupported cow version 9" },
        { "cow-short.cow", "the file is shorter than the header" },
        { "cow-v2-neither.cow", "fits neither the Linux layout" },
        { "cow-v2-ambiguous.cow", "ambiguous" },
        { "cow-v2-bitmap-overlap.cow", "the bitmap runs into the data area" },
        { "cow-v3-truncated.cow", "the file ends before the bitmap" },
    };
    for (size_t i = 0; i < VIMG_ARRAY_SIZE(cases); i++) {
        char path[PATH_MAX], prefix[PATH_MAX + 32];
        struct vimg_image *img = NULL;
        struct vimg_error err = { 0 };
        snprintf(path, sizeof(path), "%s/hostile/%s", images, cases[i].file);
        snprintf(prefix, sizeof(prefix), "Could not open '%s': ", path);
        assert_true(vimg_open(&img, path, "cow", 0, NULL, &err) < 0);
        assert_null(img);
        assert_int_equal(strncmp(err.msg, prefix, strlen(prefix)), 0);
        if (!strstr(err.msg, cases[i].msg)) {
            print_error("%s: %s\n", cases[i].file, err.msg);
        }
        assert_non_null(strstr(err.msg, cases[i].msg));
        assert_null(strchr(err.msg, '\n'));
    }
}

/* ---- create, write, read -------------------------------------------------- */

static int create_cow(const char *path, const char *size, const char *backing,
                      const char *version, struct vimg_error *err)
{
    struct vimg_opts *o = vimg_opts_new();
    int ret;
    if (size) {
        vimg_opts_set(o, "size", size);
    }
    if (backing) {
        vimg_opts_set(o, "backing_file", backing);
        vimg_opts_set(o, "backing_fmt", "raw");
    }
    if (version) {
        vimg_opts_set(o, "cow_version", version);
    }
    ret = vimg_create(path, "cow", o, err);
    vimg_opts_free(o);
    return ret;
}

static void write_model(struct vimg_image *img, uint8_t *model)
{
    static const struct {
        uint64_t off;
        size_t len;
    } writes[] = {
        { 0, 512 }, { 700, 10 }, { 4095, 2 }, { 8192, 65536 }, { 100000, 1000 },
    };
    struct vimg_error err = { 0 };
    uint8_t data[65536];
    for (size_t i = 0; i < VIMG_ARRAY_SIZE(writes); i++) {
        memset(data, 0xc0 + (int)i, writes[i].len);
        assert_int_equal(vimg_pwrite(img, data, writes[i].len, writes[i].off, &err), 0);
        memcpy(model + writes[i].off, data, writes[i].len);
    }
}

static void test_cow_create_no_backing(void **state)
{
    enum { SIZE = 256 * 1024 };
    static uint8_t model[SIZE];
    const char *versions[] = { NULL, "2" };
    for (size_t v = 0; v < 2; v++) {
        char path[PATH_MAX];
        struct vimg_image *img = NULL;
        struct vimg_error err = { 0 };
        struct stat st;

        memset(model, 0, sizeof(model));
        snprintf(path, sizeof(path), "%s/nb%zu.cow", tmpdir, v);
        assert_int_equal(create_cow(path, "256k", NULL, versions[v], &err), 0);
        assert_int_equal(stat(path, &st), 0);
        /* v3: header page, bitmap page, then the data (sparse);
         * QEMU's v2: header and bitmap only */
        assert_int_equal(st.st_size, v ? 1056 + 64 : 12288 + SIZE);
        assert_int_equal(vimg_open(&img, path, NULL, VIMG_OPEN_RDWR, NULL, &err), 0);
        assert_string_equal(vimg_format(img), "cow");
        check_image(img, model, SIZE);
        write_model(img, model);
        check_image(img, model, SIZE);
        vimg_close(img);
        assert_int_equal(vimg_open(&img, path, NULL, 0, NULL, &err), 0);
        check_image(img, model, SIZE);
        vimg_close(img);
    }
    /* size 0 and no backing file: refused */
    char path[PATH_MAX];
    struct vimg_error err = { 0 };
    snprintf(path, sizeof(path), "%s/zero.cow", tmpdir);
    assert_true(create_cow(path, "0", NULL, NULL, &err) < 0);
    assert_string_equal(err.msg, "Image size is too small, cannot be zero length");
}

static void test_cow_create_backing(void **state)
{
    enum { SIZE = 256 * 1024 };
    static uint8_t model[SIZE];
    char base[PATH_MAX], top[PATH_MAX];
    struct vimg_image *img = NULL;
    struct vimg_error err = { 0 };
    struct vimg_opts *o = vimg_opts_new();
    struct stat st;

    snprintf(base, sizeof(base), "%s/base.raw", tmpdir);
    snprintf(top, sizeof(top), "%s/top.cow", tmpdir);
    vimg_opts_set(o, "size", "256k");
    assert_int_equal(vimg_create(base, "raw", o, &err), 0);
    vimg_opts_free(o);
    for (size_t i = 0; i < SIZE; i++) {
        model[i] = (uint8_t)(i / 512 + 1);
    }
    assert_int_equal(vimg_open(&img, base, "raw", VIMG_OPEN_RDWR, NULL, &err), 0);
    assert_int_equal(vimg_pwrite(img, model, SIZE, 0, &err), 0);
    vimg_close(img);
    assert_int_equal(stat(base, &st), 0);

    /* relative name, no size: the size is the backing file's, the path is
     * stored absolute with its mtime, as UML's create_cow_file does */
    assert_int_equal(create_cow(top, NULL, "base.raw", NULL, &err), 0);
    {
        size_t len;
        uint8_t *h = read_file(top, &len);
        assert_int_equal(vimg_ld_be32(h + 4), 3);
        assert_int_equal(vimg_ld_be32(h + 8), (uint32_t)st.st_mtime);
        assert_int_equal(vimg_ld_be64(h + 12), SIZE);
        assert_int_equal(vimg_ld_be32(h + 20), 512);
        assert_int_equal(vimg_ld_be32(h + 24), 4096);
        assert_string_equal((char *)h + 32, base);
        free(h);
    }
    assert_int_equal(vimg_open(&img, top, NULL, VIMG_OPEN_RDWR, NULL, &err), 0);
    assert_non_null(vimg_backing(img));
    check_image(img, model, SIZE);
    write_model(img, model);
    check_image(img, model, SIZE);
    /* rewriting what the backing file holds allocates nothing */
    {
        struct vimg_status st;
        assert_int_equal(vimg_pwrite(img, model + 200 * 1024, 8192, 200 * 1024, &err), 0);
        assert_int_equal(vimg_block_status(img, 200 * 1024, 8192, &st, &err), 0);
        assert_int_equal(st.depth, 1);
        assert_int_equal(st.length, 8192);
        model[201 * 1024] ^= 0xff;
        assert_int_equal(vimg_pwrite(img, model + 200 * 1024, 8192, 200 * 1024, &err), 0);
        assert_int_equal(vimg_block_status(img, 200 * 1024, 8192, &st, &err), 0);
        assert_int_equal(st.depth, 1);
        assert_int_equal(st.length, 1024);
        assert_int_equal(vimg_block_status(img, 201 * 1024, 8192, &st, &err), 0);
        assert_int_equal(st.depth, 0);
        assert_int_equal(st.length, 512);
        check_image(img, model, SIZE);
    }
    vimg_close(img);

    /* a size other than the backing file's is refused */
    assert_true(create_cow(top, "1M", "base.raw", NULL, &err) < 0);
    assert_non_null(strstr(err.msg, "differs from the backing file's size"));
    vimg_error_clear(&err);

    /* the backing file changed (mtime): UML refuses the file; vimg reads it
     * but refuses to write */
    struct timeval tv[2] = { { st.st_mtime + 100, 0 }, { st.st_mtime + 100, 0 } };
    assert_int_equal(utimes(base, tv), 0);
    assert_int_equal(vimg_open(&img, top, NULL, VIMG_OPEN_RDWR, NULL, &err), 0);
    /* ... and warns at open, as UML does */
    assert_non_null(vimg_warning(img));
    assert_non_null(strstr(vimg_warning(img), "mtime mismatch"));
    check_image(img, model, SIZE);
    assert_true(vimg_pwrite(img, "x", 1, 0, &err) < 0);
    assert_non_null(strstr(err.msg, "mtime mismatch"));
    assert_non_null(strstr(err.msg, "refusing to write"));
    vimg_close(img);
}

/* raw -> cow -> raw through the library, compared byte for byte and (when
 * it is installed) with the real qemu-img compare */
static void test_cow_roundtrip_raw(void **state)
{
    char path[PATH_MAX], raw_in[PATH_MAX], raw_out[PATH_MAX], cmd[3 * PATH_MAX];
    size_t len;
    uint8_t *want, *buf;
    struct vimg_image *img = NULL, *out = NULL;
    struct vimg_error err = { 0 };
    struct vimg_opts *o;

    snprintf(raw_in, sizeof(raw_in), "%s/cow-expected.raw", images);
    want = read_file(raw_in, &len);
    snprintf(path, sizeof(path), "%s/rt.cow", tmpdir);
    assert_int_equal(create_cow(path, "32k", NULL, NULL, &err), 0);
    assert_int_equal(vimg_open(&img, path, "cow", VIMG_OPEN_RDWR, NULL, &err), 0);
    /* only the data sectors are written: the rest stays unallocated */
    for (size_t off = 0; off < len; off += 512) {
        bool zero = true;
        for (size_t i = 0; i < 512; i++) {
            zero = zero && !want[off + i];
        }
        if (!zero) {
            assert_int_equal(vimg_pwrite(img, want + off, 512, off, &err), 0);
        }
    }
    vimg_close(img);
    assert_int_equal(vimg_open(&img, path, "cow", 0, NULL, &err), 0);
    check_image(img, want, len);
    snprintf(raw_out, sizeof(raw_out), "%s/rt.raw", tmpdir);
    o = vimg_opts_new();
    vimg_opts_set(o, "size", "32k");
    assert_int_equal(vimg_create(raw_out, "raw", o, &err), 0);
    vimg_opts_free(o);
    assert_int_equal(vimg_open(&out, raw_out, "raw", VIMG_OPEN_RDWR, NULL, &err), 0);
    buf = malloc(len);
    assert_int_equal(vimg_pread(img, buf, len, 0, &err), 0);
    assert_int_equal(vimg_pwrite(out, buf, len, 0, &err), 0);
    vimg_close(out);
    vimg_close(img);
    free(buf);
    snprintf(cmd, sizeof(cmd), "cmp -s '%s' '%s'", raw_in, raw_out);
    assert_int_equal(system(cmd), 0);
    if (0 == access("/usr/bin/qemu-img", X_OK)) {
        snprintf(cmd, sizeof(cmd), "/usr/bin/qemu-img compare -q -f raw -F raw '%s' '%s'",
                 raw_in, raw_out);
        assert_int_equal(system(cmd), 0);
    }
    free(want);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cow_parse_v3),
        cmocka_unit_test(test_cow_parse_v1_v2),
        cmocka_unit_test(test_cow_probe),
        cmocka_unit_test(test_cow_fixtures),
        cmocka_unit_test(test_cow_hostile),
        cmocka_unit_test(test_cow_create_no_backing),
        cmocka_unit_test(test_cow_create_backing),
        cmocka_unit_test(test_cow_roundtrip_raw),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

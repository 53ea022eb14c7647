/*
 * src/formats/raw.c through the public API (include/vimg/vimg.h).  Expected
 * sizes, allocations and messages were checked against qemu-img 7.2
 * (`qemu-img create -f raw [-o preallocation=...]`, `stat -c '%s %b'`,
 * `qemu-img map --output=json`, `qemu-img info` of missing files,
 * directories and unknown drivers).
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
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

#include "vimg/vimg.h"

#define KiB 1024ull
#define MiB (1024ull * 1024)

static char img_path[PATH_MAX];

static int group_setup(void **state)
{
    return test_tmp_make("test_raw");
}

static int group_teardown(void **state)
{
    return test_tmp_remove();
}

/* Each test gets a fresh image path in img_path; *state holds an open
 * image (or NULL) that the teardown closes. */
static int img_setup(void **state)
{
    static int counter;
    snprintf(img_path, sizeof(img_path), "%s/img%d.raw", tmpdir, counter++);
    unlink(img_path);
    *state = NULL;
    return 0;
}

static int img_teardown(void **state)
{
    vimg_close(*state);
    *state = NULL;
    return 0;
}

static bool fs_has_holes(void)
{
    char p[PATH_MAX];
    bool ok;
    int fd;

    snprintf(p, sizeof(p), "%s/holeprobe", tmpdir);
    fd = open(p, O_CREAT | O_TRUNC | O_RDWR, 0644);
    assert_true(fd >= 0);
    assert_int_equal(ftruncate(fd, MiB), 0);
    assert_int_equal(pwrite(fd, "x", 1, MiB - 1), 1);
    ok = lseek(fd, 0, SEEK_DATA) > 0;
    close(fd);
    unlink(p);
    return ok;
}

static void create_raw(const char *path, const char *size, const char *prealloc)
{
    struct vimg_opts *o = vimg_opts_new();
    struct vimg_error err = { 0 };
    int ret;

    assert_non_null(o);
    assert_int_equal(vimg_opts_set(o, "size", size), 0);
    if (prealloc) {
        assert_int_equal(vimg_opts_set(o, "preallocation", prealloc), 0);
    }
    ret = vimg_create(path, "raw", o, &err);
    vimg_opts_free(o);
    if (ret < 0) {
        print_error("vimg_create: %s\n", err.msg);
    }
    assert_int_equal(ret, 0);
    assert_int_equal(err.code, 0);
}

static struct vimg_image *open_rw(void **state, const char *path)
{
    struct vimg_image *img = NULL;
    struct vimg_error err = { 0 };
    int ret = vimg_open(&img, path, "raw", VIMG_OPEN_RDWR, NULL, &err);
    if (ret < 0) {
        print_error("vimg_open: %s\n", err.msg);
    }
    assert_int_equal(ret, 0);
    assert_non_null(img);
    *state = img;
    return img;
}

static void file_stat(const char *path, struct stat *st)
{
    assert_int_equal(stat(path, st), 0);
}

static bool all_bytes(const uint8_t *p, size_t len, uint8_t v)
{
    for (size_t i = 0; i < len; i++) {
        if (p[i] != v) {
            return false;
        }
    }
    return true;
}

/* ---- create --------------------------------------------------------------- */

static void test_raw_create_prealloc_off(void **state)
{
    struct stat st;

    create_raw(img_path, "1M", NULL);
    file_stat(img_path, &st);
    assert_true(S_ISREG(st.st_mode));
    assert_int_equal(st.st_size, 1 * MiB);
    if (fs_has_holes()) {
        /* qemu-img writes the first block only: 1048576 bytes, 8 blocks */
        assert_int_equal((uint64_t)st.st_blocks * 512, 4096);
    }
    /* "off" spelled out is the same */
    create_raw(img_path, "64k", "off");
    file_stat(img_path, &st);
    assert_int_equal(st.st_size, 64 * KiB);
}

static void test_raw_create_prealloc_falloc(void **state)
{
    struct stat st;
    uint8_t buf[4096];

    create_raw(img_path, "1M", "falloc");
    file_stat(img_path, &st);
    assert_int_equal(st.st_size, 1 * MiB);
    assert_true((uint64_t)st.st_blocks * 512 >= 1 * MiB);

    struct vimg_image *img = open_rw(state, img_path);
    struct vimg_error err = { 0 };
    assert_int_equal(vimg_size(img), 1 * MiB);
    assert_int_equal(vimg_pread(img, buf, sizeof(buf), 1 * MiB - sizeof(buf), &err), 0);
    assert_true(all_bytes(buf, sizeof(buf), 0));
    assert_true(vimg_allocated_size(img) >= (int64_t)(1 * MiB));
}

static void test_raw_create_prealloc_full(void **state)
{
    struct stat st;
    struct vimg_status s;
    struct vimg_error err = { 0 };

    create_raw(img_path, "1M", "full");
    file_stat(img_path, &st);
    assert_int_equal(st.st_size, 1 * MiB);
    assert_true((uint64_t)st.st_blocks * 512 >= 1 * MiB);
    /* written zeros: one data run over the whole image (qemu-img map says
     * the same) */
    struct vimg_image *img = open_rw(state, img_path);
    assert_int_equal(vimg_block_status(img, 0, 1 * MiB, &s, &err), 0);
    assert_int_equal(s.length, 1 * MiB);
    assert_true(s.flags & VIMG_STATUS_DATA);
    assert_false(s.flags & VIMG_STATUS_ZERO);
}

static void test_raw_create_zero_size(void **state)
{
    struct stat st;
    create_raw(img_path, "0", NULL);
    file_stat(img_path, &st);
    assert_int_equal(st.st_size, 0);
    assert_int_equal(st.st_blocks, 0);
}

static void test_raw_create_replaces_existing(void **state)
{
    struct stat st;
    int fd = open(img_path, O_CREAT | O_WRONLY, 0644);
    assert_true(fd >= 0);
    assert_int_equal(pwrite(fd, "junkjunk", 8, 2 * MiB), 8);
    close(fd);
    create_raw(img_path, "4k", NULL);
    file_stat(img_path, &st);
    assert_int_equal(st.st_size, 4096);
    uint8_t buf[4096];
    fd = open(img_path, O_RDONLY);
    assert_int_equal(pread(fd, buf, sizeof(buf), 0), 4096);
    close(fd);
    assert_true(all_bytes(buf, sizeof(buf), 0));
}

/* qemu's file-posix create rounds the size up to whole sectors:
 * `qemu-img create -f raw x 5000` makes a 5120-byte file (also with
 * preallocation=full and falloc), `... x 100` a 512-byte one. */
static void test_raw_create_rounds_size_to_sector(void **state)
{
    static const char *const modes[] = { NULL, "falloc", "full" };
    for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
        struct stat st;
        create_raw(img_path, "5000", modes[i]);
        file_stat(img_path, &st);
        if (st.st_size != 5120) {
            fail_msg("preallocation=%s: size %lld, qemu makes 5120",
                     modes[i] ? modes[i] : "off", (long long)st.st_size);
        }
    }
    struct stat st;
    create_raw(img_path, "100", NULL);
    file_stat(img_path, &st);
    assert_int_equal(st.st_size, 512);
}

static void test_raw_create_errors(void **state)
{
    struct vimg_opts *o = vimg_opts_new();
    struct vimg_error err = { 0 };

    assert_non_null(o);
    assert_int_equal(vimg_opts_set(o, "size", "1M"), 0);
    assert_int_equal(vimg_create(img_path, "foo", o, &err), -EINVAL);
    assert_string_equal(err.msg, "Unknown file format 'foo'");

    vimg_error_clear(&err);
    assert_int_equal(vimg_opts_set(o, "preallocation", "bogus"), 0);
    assert_int_equal(vimg_create(img_path, "raw", o, &err), -EINVAL);
    assert_string_equal(err.msg, "invalid parameter value: bogus");

    vimg_error_clear(&err);
    assert_int_equal(vimg_opts_set(o, "preallocation", "off"), 0);
    assert_int_equal(vimg_opts_set(o, "backing_file", "x"), 0);
    assert_int_equal(vimg_create(img_path, "raw", o, &err), -EINVAL);
    assert_string_equal(err.msg, "Invalid parameter 'backing_file'");
    vimg_opts_free(o);

    /* a folder that does not exist */
    char p[PATH_MAX + 32];
    snprintf(p, sizeof(p), "%s/no/such/dir.raw", tmpdir);
    o = vimg_opts_new();
    assert_non_null(o);
    assert_int_equal(vimg_opts_set(o, "size", "1M"), 0);
    vimg_error_clear(&err);
    assert_int_equal(vimg_create(p, "raw", o, &err), -ENOENT);
    assert_int_equal(err.code, ENOENT);
    assert_non_null(strstr(err.msg, "No such file or directory"));
    vimg_opts_free(o);
}

/* `qemu-img create -f raw -o preallocation=metadata` fails with
 * "Unsupported preallocation mode: metadata". */
static void test_raw_create_metadata_prealloc_message(void **state)
{
    struct vimg_opts *o = vimg_opts_new();
    struct vimg_error err = { 0 };
    int ret;

    assert_non_null(o);
    assert_int_equal(vimg_opts_set(o, "size", "1M"), 0);
    assert_int_equal(vimg_opts_set(o, "preallocation", "metadata"), 0);
    ret = vimg_create(img_path, "raw", o, &err);
    vimg_opts_free(o);
    assert_true(ret < 0);
    assert_string_equal(err.msg, "Unsupported preallocation mode: metadata");
}

/* ---- open ------------------------------------------------------------------- */

static void test_raw_open_accessors(void **state)
{
    create_raw(img_path, "1M", NULL);
    struct vimg_image *img = open_rw(state, img_path);
    assert_int_equal(vimg_size(img), 1 * MiB);
    assert_string_equal(vimg_format(img), "raw");
    assert_string_equal(vimg_filename(img), img_path);
    assert_null(vimg_backing(img));
    assert_true(vimg_allocated_size(img) >= 0);
}

static void test_raw_open_rounds_size_to_512(void **state)
{
    struct vimg_image *img = NULL;
    struct vimg_error err = { 0 };
    struct vimg_status s;
    uint8_t buf[512];
    int fd = open(img_path, O_CREAT | O_TRUNC | O_WRONLY, 0644);

    assert_true(fd >= 0);
    assert_int_equal(write(fd, "abc", 3), 3);
    close(fd);
    assert_int_equal(vimg_open(&img, img_path, "raw", 0, NULL, &err), 0);
    *state = img;
    assert_int_equal(vimg_size(img), 512);
    memset(buf, 0xEE, sizeof(buf));
    assert_int_equal(vimg_pread(img, buf, sizeof(buf), 0, &err), 0);
    assert_memory_equal(buf, "abc", 3);
    assert_true(all_bytes(buf + 3, sizeof(buf) - 3, 0));
    assert_int_equal(vimg_pread(img, buf, 1, 512, &err), -EINVAL);

    /* qemu-img map: data [0,3), zero [3,512) */
    if (fs_has_holes()) {
        assert_int_equal(vimg_block_status(img, 0, 512, &s, &err), 0);
        assert_int_equal(s.length, 3);
        assert_true(s.flags & VIMG_STATUS_DATA);
        assert_int_equal(vimg_block_status(img, 3, 509, &s, &err), 0);
        assert_int_equal(s.length, 509);
        assert_true(s.flags & VIMG_STATUS_ZERO);
        assert_false(s.flags & VIMG_STATUS_DATA);
    }
    /* the file itself is not changed by opening or reading */
    struct stat st;
    file_stat(img_path, &st);
    assert_int_equal(st.st_size, 3);
}

static void test_raw_open_empty_file(void **state)
{
    struct vimg_image *img = NULL;
    struct vimg_error err = { 0 };
    struct vimg_status s;
    int fd = open(img_path, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(vimg_open(&img, img_path, NULL, 0, NULL, &err), 0);
    *state = img;
    assert_int_equal(vimg_size(img), 0);
    assert_string_equal(vimg_format(img), "raw");
    assert_int_equal(vimg_block_status(img, 0, 512, &s, &err), -EINVAL);
}

static void test_raw_open_probe_sets_warning_only_rdwr(void **state)
{
    struct vimg_image *img = NULL;
    struct vimg_error err = { 0 };
    int warn;

    create_raw(img_path, "64k", NULL);

    warn = -1;
    assert_int_equal(vimg_open(&img, img_path, NULL, VIMG_OPEN_RDWR, &warn, &err), 0);
    assert_string_equal(vimg_format(img), "raw");
    assert_int_equal(warn, 1);
    vimg_close(img);

    warn = -1;
    assert_int_equal(vimg_open(&img, img_path, NULL, 0, &warn, &err), 0);
    assert_string_equal(vimg_format(img), "raw");
    assert_int_equal(warn, 0);
    vimg_close(img);

    /* a given format never warns */
    warn = -1;
    assert_int_equal(vimg_open(&img, img_path, "raw", VIMG_OPEN_RDWR, &warn, &err), 0);
    assert_int_equal(warn, 0);
    vimg_close(img);

    /* a NULL pointer is allowed */
    assert_int_equal(vimg_open(&img, img_path, NULL, VIMG_OPEN_RDWR, NULL, &err), 0);
    vimg_close(img);
    assert_int_equal(err.code, 0);
}

static void test_raw_open_missing_file(void **state)
{
    struct vimg_image *img = (struct vimg_image *)0x1;
    struct vimg_error err = { 0 };
    char expected[3 * PATH_MAX];

    assert_int_equal(vimg_open(&img, img_path, "raw", 0, NULL, &err), -ENOENT);
    assert_int_equal(err.code, ENOENT);
    snprintf(expected, sizeof(expected),
             "Could not open '%s': Could not open '%s': No such file or directory",
             img_path, img_path);
    assert_string_equal(err.msg, expected);
    assert_ptr_equal(img, (struct vimg_image *)0x1);

    /* probing a missing file says the same */
    vimg_error_clear(&err);
    assert_int_equal(vimg_open(&img, img_path, NULL, 0, NULL, &err), -ENOENT);
    assert_string_equal(err.msg, expected);
}

static void test_raw_open_unknown_driver(void **state)
{
    struct vimg_image *img = NULL;
    struct vimg_error err = { 0 };
    char expected[2 * PATH_MAX];

    create_raw(img_path, "64k", NULL);
    assert_int_equal(vimg_open(&img, img_path, "foo", 0, NULL, &err), -EINVAL);
    assert_int_equal(err.code, EINVAL);
    snprintf(expected, sizeof(expected), "Could not open '%s': Unknown driver 'foo'",
             img_path);
    assert_string_equal(err.msg, expected);

    /* the driver is checked before the file: a missing file says the same */
    vimg_error_clear(&err);
    unlink(img_path);
    assert_int_equal(vimg_open(&img, img_path, "foo", 0, NULL, &err), -EINVAL);
    assert_string_equal(err.msg, expected);
}

static void test_raw_open_directory(void **state)
{
    struct vimg_image *img = NULL;
    struct vimg_error err = { 0 };
    char needle[2 * PATH_MAX], expected[3 * PATH_MAX];

    assert_true(vimg_open(&img, tmpdir, "raw", 0, NULL, &err) < 0);
    assert_int_equal(err.code, EINVAL);
    snprintf(needle, sizeof(needle), "'file' driver requires '%s' to be a regular file",
             tmpdir);
    assert_non_null(strstr(err.msg, needle));
    /* qemu-img 7.2: "Could not open 'D': 'file' driver requires 'D' to be a
     * regular file" */
    snprintf(expected, sizeof(expected), "Could not open '%s': %s", tmpdir, needle);
    assert_string_equal(err.msg, expected);
}

/* ---- I/O -------------------------------------------------------------------- */

static void test_raw_pread_pwrite(void **state)
{
    static uint8_t w[70000], r[70000];
    struct vimg_error err = { 0 };

    create_raw(img_path, "1M", NULL);
    struct vimg_image *img = open_rw(state, img_path);
    for (size_t i = 0; i < sizeof(w); i++) {
        w[i] = (uint8_t)(i % 251 + 1);
    }
    /* unaligned offset and length */
    assert_int_equal(vimg_pwrite(img, w, sizeof(w), 1001, &err), 0);
    assert_int_equal(vimg_pread(img, r, sizeof(r), 1001, &err), 0);
    assert_memory_equal(r, w, sizeof(w));
    assert_int_equal(vimg_pread(img, r, 1001, 0, &err), 0);
    assert_true(all_bytes(r, 1001, 0));
    /* the last byte of the image */
    assert_int_equal(vimg_pwrite(img, "Z", 1, 1 * MiB - 1, &err), 0);
    assert_int_equal(vimg_pread(img, r, 2, 1 * MiB - 2, &err), 0);
    assert_memory_equal(r, "\0Z", 2);
    /* zero-length requests are fine */
    assert_int_equal(vimg_pwrite(img, w, 0, 1 * MiB, &err), 0);
    assert_int_equal(vimg_flush(img, &err), 0);
    assert_int_equal(err.code, 0);

    /* the bytes are in the file, where the guest put them */
    int fd = open(img_path, O_RDONLY);
    assert_true(fd >= 0);
    assert_int_equal(pread(fd, r, sizeof(w), 1001), sizeof(w));
    close(fd);
    assert_memory_equal(r, w, sizeof(w));
}

static void test_raw_io_beyond_end(void **state)
{
    uint8_t b[512];
    struct vimg_error err = { 0 };

    create_raw(img_path, "64k", NULL);
    struct vimg_image *img = open_rw(state, img_path);
    assert_int_equal(vimg_pread(img, b, 512, 64 * KiB - 511, &err), -EINVAL);
    assert_int_equal(err.code, EINVAL);
    assert_non_null(strstr(err.msg, "beyond the end of the image"));
    vimg_error_clear(&err);
    assert_int_equal(vimg_pwrite(img, b, 1, 64 * KiB, &err), -EINVAL);
    vimg_error_clear(&err);
    assert_int_equal(vimg_write_zeroes(img, 0, 64 * KiB + 1, 0, &err), -EINVAL);
    vimg_error_clear(&err);
    assert_int_equal(vimg_discard(img, UINT64_MAX, 2, &err), -EINVAL);
    vimg_error_clear(&err);
    assert_int_equal(vimg_pread(img, b, 2, UINT64_MAX, &err), -EINVAL);
    /* the file did not grow */
    struct stat st;
    file_stat(img_path, &st);
    assert_int_equal(st.st_size, 64 * KiB);
}

static void test_raw_readonly_refuses_writes(void **state)
{
    struct vimg_image *img = NULL;
    struct vimg_error err = { 0 };
    uint8_t b[4] = { 1, 2, 3, 4 };

    create_raw(img_path, "64k", NULL);
    assert_int_equal(vimg_open(&img, img_path, "raw", 0, NULL, &err), 0);
    *state = img;
    assert_int_equal(vimg_pwrite(img, b, 4, 0, &err), -EBADF);
    assert_int_equal(err.code, EBADF);
    assert_non_null(strstr(err.msg, "read-only"));
    vimg_error_clear(&err);
    assert_int_equal(vimg_write_zeroes(img, 0, 512, 0, &err), -EBADF);
    vimg_error_clear(&err);
    assert_int_equal(vimg_discard(img, 0, 512, &err), -EBADF);
    vimg_error_clear(&err);
    assert_int_equal(vimg_truncate(img, 128 * KiB, VIMG_PREALLOC_OFF, 0, &err), -EBADF);
    vimg_error_clear(&err);
    assert_int_equal(vimg_preallocate(img, VIMG_PREALLOC_FALLOC, &err), -EBADF);
    /* flushing a read-only image is a no-op */
    vimg_error_clear(&err);
    assert_int_equal(vimg_flush(img, &err), 0);
    assert_int_equal(vimg_size(img), 64 * KiB);
}

static void test_raw_write_zeroes_and_discard(void **state)
{
    static uint8_t w[256 * 1024], r[256 * 1024];
    struct vimg_error err = { 0 };
    struct vimg_status s;

    create_raw(img_path, "256k", NULL);
    struct vimg_image *img = open_rw(state, img_path);
    memset(w, 0x5A, sizeof(w));
    assert_int_equal(vimg_pwrite(img, w, sizeof(w), 0, &err), 0);

    /* explicit zeroes, unaligned, without unmap */
    assert_int_equal(vimg_write_zeroes(img, 1000, 3000, 0, &err), 0);
    /* may unmap: aligned 64K range becomes a hole */
    assert_int_equal(vimg_write_zeroes(img, 64 * KiB, 64 * KiB, VIMG_ZERO_MAY_UNMAP,
                                       &err), 0);
    /* discard reads as zeros for raw too */
    assert_int_equal(vimg_discard(img, 192 * KiB, 32 * KiB, &err), 0);
    assert_int_equal(vimg_flush(img, &err), 0);

    assert_int_equal(vimg_pread(img, r, sizeof(r), 0, &err), 0);
    assert_true(all_bytes(r, 1000, 0x5A));
    assert_true(all_bytes(r + 1000, 3000, 0));
    assert_true(all_bytes(r + 4000, 64 * KiB - 4000, 0x5A));
    assert_true(all_bytes(r + 64 * KiB, 64 * KiB, 0));
    assert_true(all_bytes(r + 128 * KiB, 64 * KiB, 0x5A));
    assert_true(all_bytes(r + 192 * KiB, 32 * KiB, 0));
    assert_true(all_bytes(r + 224 * KiB, 32 * KiB, 0x5A));

    if (fs_has_holes()) {
        assert_int_equal(vimg_block_status(img, 64 * KiB, 192 * KiB, &s, &err), 0);
        assert_int_equal(s.length, 64 * KiB);
        assert_true(s.flags & VIMG_STATUS_ZERO);
        assert_int_equal(vimg_block_status(img, 192 * KiB, 64 * KiB, &s, &err), 0);
        assert_int_equal(s.length, 32 * KiB);
        assert_true(s.flags & VIMG_STATUS_ZERO);
    }
    assert_int_equal(err.code, 0);
}

/* ---- block status -------------------------------------------------------- */

static void test_raw_block_status_runs(void **state)
{
    static uint8_t w[64 * 1024];
    struct vimg_error err = { 0 };
    struct vimg_status s;

    if (!fs_has_holes()) {
        skip();
    }
    create_raw(img_path, "1M", NULL);
    struct vimg_image *img = open_rw(state, img_path);
    memset(w, 0x33, sizeof(w));
    /* qemu's create wrote the first 4K; data [0,64K) and [512K,576K) */
    assert_int_equal(vimg_pwrite(img, w, sizeof(w), 0, &err), 0);
    assert_int_equal(vimg_pwrite(img, w, sizeof(w), 512 * KiB, &err), 0);

    static const struct {
        uint64_t off, len;
        bool data;
    } runs[] = {
        { 0, 64 * KiB, true },
        { 64 * KiB, 448 * KiB, false },
        { 512 * KiB, 64 * KiB, true },
        { 576 * KiB, 448 * KiB, false },
    };
    uint64_t off = 0;
    for (size_t i = 0; i < sizeof(runs) / sizeof(runs[0]); i++) {
        assert_int_equal(vimg_block_status(img, off, 1 * MiB - off, &s, &err), 0);
        assert_int_equal(off, runs[i].off);
        assert_int_equal(s.length, runs[i].len);
        assert_int_equal(s.depth, 0);
        assert_true(s.flags & VIMG_STATUS_ALLOCATED);
        assert_true(s.flags & VIMG_STATUS_HOST_VALID);
        assert_int_equal(s.host_offset, off);
        assert_non_null(s.host_file);
        assert_string_equal(s.host_file, img_path);
        assert_false(s.flags & VIMG_STATUS_COMPRESSED);
        if (runs[i].data) {
            assert_true(s.flags & VIMG_STATUS_DATA);
            assert_false(s.flags & VIMG_STATUS_ZERO);
        } else {
            assert_true(s.flags & VIMG_STATUS_ZERO);
            assert_false(s.flags & VIMG_STATUS_DATA);
        }
        off += s.length;
    }
    assert_int_equal(off, 1 * MiB);

    /* max_len caps a run, inside data and inside a hole */
    assert_int_equal(vimg_block_status(img, 4096, 512, &s, &err), 0);
    assert_int_equal(s.length, 512);
    assert_true(s.flags & VIMG_STATUS_DATA);
    assert_int_equal(s.host_offset, 4096);
    assert_int_equal(vimg_block_status(img, 100 * KiB, 4096, &s, &err), 0);
    assert_int_equal(s.length, 4096);
    assert_true(s.flags & VIMG_STATUS_ZERO);
    /* a huge max_len is clipped to the image */
    assert_int_equal(vimg_block_status(img, 576 * KiB, UINT64_MAX, &s, &err), 0);
    assert_int_equal(s.length, 448 * KiB);

    /* at or past the end, or empty: an error */
    assert_int_equal(vimg_block_status(img, 1 * MiB, 512, &s, &err), -EINVAL);
    vimg_error_clear(&err);
    assert_int_equal(vimg_block_status(img, 0, 0, &s, &err), -EINVAL);
}

/* ---- truncate ------------------------------------------------------------ */

static void test_raw_truncate_grow_shrink(void **state)
{
    struct vimg_error err = { 0 };
    struct stat st;
    uint8_t b[8];

    create_raw(img_path, "64k", NULL);
    struct vimg_image *img = open_rw(state, img_path);
    assert_int_equal(vimg_pwrite(img, "abcdefgh", 8, 64 * KiB - 8, &err), 0);

    assert_int_equal(vimg_truncate(img, 1 * MiB, VIMG_PREALLOC_OFF, 0, &err), 0);
    assert_int_equal(vimg_size(img), 1 * MiB);
    file_stat(img_path, &st);
    assert_int_equal(st.st_size, 1 * MiB);
    assert_int_equal(vimg_pread(img, b, 8, 64 * KiB - 8, &err), 0);
    assert_memory_equal(b, "abcdefgh", 8);
    assert_int_equal(vimg_pread(img, b, 8, 1 * MiB - 8, &err), 0);
    assert_true(all_bytes(b, 8, 0));

    assert_int_equal(vimg_truncate(img, 64 * KiB - 4, VIMG_PREALLOC_OFF, 1, &err), 0);
    file_stat(img_path, &st);
    assert_int_equal(st.st_size, 64 * KiB - 4);
    /* the virtual size of raw is the file size rounded up to 512 */
    assert_int_equal(vimg_size(img), 64 * KiB);
    assert_int_equal(vimg_pread(img, b, 8, 64 * KiB - 8, &err), 0);
    assert_memory_equal(b, "abcd\0\0\0\0", 8);

    /* grow with falloc: blocks reserved, zeros read */
    assert_int_equal(vimg_truncate(img, 2 * MiB, VIMG_PREALLOC_FALLOC, 0, &err), 0);
    assert_int_equal(vimg_size(img), 2 * MiB);
    file_stat(img_path, &st);
    assert_true((uint64_t)st.st_blocks * 512 >= 2 * MiB - 64 * KiB);
    /* grow with full: written zeros */
    assert_int_equal(vimg_truncate(img, 3 * MiB, VIMG_PREALLOC_FULL, 0, &err), 0);
    assert_int_equal(vimg_size(img), 3 * MiB);
    file_stat(img_path, &st);
    assert_true((uint64_t)st.st_blocks * 512 >= 3 * MiB - 64 * KiB);
    assert_int_equal(vimg_pread(img, b, 8, 3 * MiB - 8, &err), 0);
    assert_true(all_bytes(b, 8, 0));
    assert_int_equal(err.code, 0);
}

static void test_raw_truncate_errors(void **state)
{
    struct vimg_error err = { 0 };

    create_raw(img_path, "1M", NULL);
    struct vimg_image *img = open_rw(state, img_path);
    assert_int_equal(vimg_truncate(img, 2 * MiB, VIMG_PREALLOC_METADATA, 0, &err),
                     -ENOTSUP);
    assert_string_equal(err.msg, "Unsupported preallocation mode: metadata");
    vimg_error_clear(&err);
    assert_int_equal(vimg_truncate(img, 512 * KiB, VIMG_PREALLOC_FALLOC, 1, &err),
                     -ENOTSUP);
    assert_string_equal(err.msg, "Cannot use preallocation for shrinking files");
    assert_int_equal(vimg_size(img), 1 * MiB);
}

/* vimg.h: "Shrinking needs allow_shrink" (driver.h: the core checks the
 * shrink permission before calling the driver). */
static void test_raw_truncate_shrink_needs_permission(void **state)
{
    struct vimg_error err = { 0 };
    struct stat st;

    create_raw(img_path, "1M", NULL);
    struct vimg_image *img = open_rw(state, img_path);
    int ret = vimg_truncate(img, 512 * KiB, VIMG_PREALLOC_OFF, 0, &err);
    file_stat(img_path, &st);
    assert_true(ret < 0);
    assert_true(err.code != 0);
    assert_int_equal(st.st_size, 1 * MiB);
    assert_int_equal(vimg_size(img), 1 * MiB);
}

/* ---- preallocate ---------------------------------------------------------- */

static void test_raw_preallocate_keeps_content(void **state)
{
    static uint8_t w[64 * 1024], r[1024 * 1024];
    struct vimg_error err = { 0 };
    struct stat st;

    for (int mode = 0; mode < 2; mode++) {
        enum vimg_prealloc p = mode ? VIMG_PREALLOC_FULL : VIMG_PREALLOC_FALLOC;
        create_raw(img_path, "1M", NULL);
        struct vimg_image *img = open_rw(state, img_path);
        memset(w, 0x6B, sizeof(w));
        assert_int_equal(vimg_pwrite(img, w, sizeof(w), 256 * KiB, &err), 0);
        assert_int_equal(vimg_preallocate(img, p, &err), 0);
        assert_int_equal(err.code, 0);
        file_stat(img_path, &st);
        assert_int_equal(st.st_size, 1 * MiB);
        assert_true((uint64_t)st.st_blocks * 512 >= 1 * MiB);
        assert_int_equal(vimg_pread(img, r, sizeof(r), 0, &err), 0);
        assert_true(all_bytes(r, 256 * KiB, 0));
        assert_true(all_bytes(r + 256 * KiB, 64 * KiB, 0x6B));
        assert_true(all_bytes(r + 320 * KiB, sizeof(r) - 320 * KiB, 0));
        vimg_close(img);
        *state = NULL;
    }
}

/* A file shorter than the virtual size (3 bytes: 512 virtual) is extended
 * to the virtual size first. */
static void test_raw_preallocate_short_file(void **state)
{
    struct vimg_image *img = NULL;
    struct vimg_error err = { 0 };
    struct stat st;
    uint8_t b[512];
    int fd = open(img_path, O_CREAT | O_TRUNC | O_WRONLY, 0644);

    assert_true(fd >= 0);
    assert_int_equal(write(fd, "abc", 3), 3);
    close(fd);
    assert_int_equal(vimg_open(&img, img_path, "raw", VIMG_OPEN_RDWR, NULL, &err), 0);
    *state = img;
    assert_int_equal(vimg_preallocate(img, VIMG_PREALLOC_FULL, &err), 0);
    file_stat(img_path, &st);
    assert_int_equal(st.st_size, 512);
    assert_int_equal(vimg_pread(img, b, sizeof(b), 0, &err), 0);
    assert_memory_equal(b, "abc", 3);
    assert_true(all_bytes(b + 3, sizeof(b) - 3, 0));
}

static void test_raw_prealloc_names(void **state)
{
    static const char *const names[] = { "off", "metadata", "falloc", "full" };
    enum vimg_prealloc p;

    for (int i = 0; i < 4; i++) {
        assert_int_equal(vimg_prealloc_parse(names[i], &p), 0);
        assert_int_equal(p, i);
        assert_string_equal(vimg_prealloc_name((enum vimg_prealloc)i), names[i]);
    }
    assert_int_equal(vimg_prealloc_parse("Full", &p), -EINVAL);
    assert_int_equal(vimg_prealloc_parse("", &p), -EINVAL);
    assert_string_equal(vimg_prealloc_name((enum vimg_prealloc)7), "?");
}

#define T(f) cmocka_unit_test_setup_teardown(f, img_setup, img_teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_raw_create_prealloc_off),
        T(test_raw_create_prealloc_falloc),
        T(test_raw_create_prealloc_full),
        T(test_raw_create_zero_size),
        T(test_raw_create_replaces_existing),
        T(test_raw_create_rounds_size_to_sector),
        T(test_raw_create_errors),
        T(test_raw_create_metadata_prealloc_message),
        T(test_raw_open_accessors),
        T(test_raw_open_rounds_size_to_512),
        T(test_raw_open_empty_file),
        T(test_raw_open_probe_sets_warning_only_rdwr),
        T(test_raw_open_missing_file),
        T(test_raw_open_unknown_driver),
        T(test_raw_open_directory),
        T(test_raw_pread_pwrite),
        T(test_raw_io_beyond_end),
        T(test_raw_readonly_refuses_writes),
        T(test_raw_write_zeroes_and_discard),
        T(test_raw_block_status_runs),
        T(test_raw_truncate_grow_shrink),
        T(test_raw_truncate_errors),
        T(test_raw_truncate_shrink_needs_permission),
        T(test_raw_preallocate_keeps_content),
        T(test_raw_preallocate_short_file),
        T(test_raw_prealloc_names),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

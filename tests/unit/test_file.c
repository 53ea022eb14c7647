/*
 * src/io/file.c and src/io/zero.c: posix host files, in-memory files and
 * the project's one zero detector.
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

#include "io/file.h"

#define KiB 1024ull
#define MiB (1024ull * 1024)


static int group_setup(void **state)
{
    return test_tmp_make("test_file");
}

static int group_teardown(void **state)
{
    return test_tmp_remove();
}

/* Each posix test gets a fresh file, opened read-write, in *state. */
static int file_setup(void **state)
{
    static int counter;
    char p[PATH_MAX];
    struct vimg_file *f = NULL;

    snprintf(p, sizeof(p), "%s/f%d", tmpdir, counter++);
    if (vimg_file_open_posix(&f, p, VIMG_FILE_RDWR | VIMG_FILE_CREATE |
                                        VIMG_FILE_TRUNC) < 0) {
        return -1;
    }
    *state = f;
    return 0;
}

static int file_teardown(void **state)
{
    struct vimg_file *f = *state;
    if (f) {
        unlink(f->name);
        vimg_file_close(f);
    }
    return 0;
}

/* Does the file system of tmpdir report holes through SEEK_DATA? */
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

static bool all_bytes(const uint8_t *p, size_t len, uint8_t v)
{
    for (size_t i = 0; i < len; i++) {
        if (p[i] != v) {
            return false;
        }
    }
    return true;
}

/* ---- posix --------------------------------------------------------------- */

static void test_file_posix_open_basics(void **state)
{
    struct vimg_file *f = *state;
    assert_non_null(f->ops);
    assert_true(f->fd >= 0);
    assert_true(f->writable);
    assert_non_null(strstr(f->name, tmpdir));
    assert_int_equal(vimg_file_size(f), 0);
}

static void test_file_posix_open_errors(void **state)
{
    struct vimg_file *f = (struct vimg_file *)0x1;
    char p[PATH_MAX];

    snprintf(p, sizeof(p), "%s/does-not-exist", tmpdir);
    assert_int_equal(vimg_file_open_posix(&f, p, 0), -ENOENT);
    assert_ptr_equal(f, (struct vimg_file *)0x1);
    assert_int_equal(vimg_file_open_posix(&f, tmpdir, 0), -EISDIR);
    /* a character device is not a regular file */
    assert_int_equal(vimg_file_open_posix(&f, "/dev/null", 0), -ENOTSUP);
    /* O_EXCL on an existing file */
    snprintf(p, sizeof(p), "%s/excl", tmpdir);
    assert_int_equal(vimg_file_open_posix(&f, p, VIMG_FILE_RDWR | VIMG_FILE_CREATE), 0);
    vimg_file_close(f);
    assert_int_equal(vimg_file_open_posix(&f, p, VIMG_FILE_RDWR | VIMG_FILE_CREATE |
                                                     VIMG_FILE_EXCL), -EEXIST);
    unlink(p);
    /* closing NULL is fine */
    vimg_file_close(NULL);
}

static void test_file_posix_roundtrip(void **state)
{
    struct vimg_file *f = *state;
    uint8_t w[10000], r[10000];

    for (size_t i = 0; i < sizeof(w); i++) {
        w[i] = (uint8_t)(i * 7 + 3);
    }
    assert_int_equal(vimg_file_pwrite(f, w, sizeof(w), 123), 0);
    assert_int_equal(vimg_file_size(f), 123 + sizeof(w));
    memset(r, 0xEE, sizeof(r));
    assert_int_equal(vimg_file_pread(f, r, sizeof(r), 123), 0);
    assert_memory_equal(r, w, sizeof(w));
    /* the gap before the write reads as zeros */
    assert_int_equal(vimg_file_pread(f, r, 123, 0), 0);
    assert_true(all_bytes(r, 123, 0));
    /* an unaligned sub-range */
    assert_int_equal(vimg_file_pread(f, r, 17, 123 + 4999), 0);
    assert_memory_equal(r, w + 4999, 17);
    assert_int_equal(vimg_file_sync(f), 0);
}

static void test_file_posix_pread_past_eof_zero_fills(void **state)
{
    struct vimg_file *f = *state;
    uint8_t r[4096];

    assert_int_equal(vimg_file_pwrite(f, "abcdef", 6, 0), 0);
    memset(r, 0xEE, sizeof(r));
    /* straddling EOF: the head from the file, the rest zeros */
    assert_int_equal(vimg_file_pread(f, r, sizeof(r), 2), 0);
    assert_memory_equal(r, "cdef", 4);
    assert_true(all_bytes(r + 4, sizeof(r) - 4, 0));
    /* wholly past EOF */
    memset(r, 0xEE, sizeof(r));
    assert_int_equal(vimg_file_pread(f, r, sizeof(r), 1 * MiB), 0);
    assert_true(all_bytes(r, sizeof(r), 0));
    /* reading does not change the size */
    assert_int_equal(vimg_file_size(f), 6);
}

static void test_file_posix_truncate(void **state)
{
    struct vimg_file *f = *state;
    uint8_t r[8];

    assert_int_equal(vimg_file_pwrite(f, "12345678", 8, 0), 0);
    assert_int_equal(f->ops->truncate(f, 3), 0);
    assert_int_equal(vimg_file_size(f), 3);
    assert_int_equal(f->ops->truncate(f, 1 * MiB), 0);
    assert_int_equal(vimg_file_size(f), 1 * MiB);
    memset(r, 0xEE, sizeof(r));
    assert_int_equal(vimg_file_pread(f, r, 8, 0), 0);
    /* the cut bytes do not come back when growing */
    assert_memory_equal(r, "123\0\0\0\0\0", 8);
    assert_int_equal(f->ops->truncate(f, (uint64_t)INT64_MAX + 1), -EFBIG);
    assert_int_equal(vimg_file_size(f), 1 * MiB);
}

static void test_file_posix_allocated(void **state)
{
    struct vimg_file *f = *state;
    static uint8_t buf[256 * 1024];

    assert_int_equal(f->ops->allocated(f), 0);
    memset(buf, 0x11, sizeof(buf));
    assert_int_equal(vimg_file_pwrite(f, buf, sizeof(buf), 0), 0);
    assert_int_equal(vimg_file_sync(f), 0);
    int64_t a = f->ops->allocated(f);
    struct stat st;
    assert_int_equal(fstat(f->fd, &st), 0);
    assert_int_equal(a, (int64_t)st.st_blocks * 512);
    assert_true(a >= (int64_t)sizeof(buf));
    /* a sparse tail adds no blocks */
    assert_int_equal(f->ops->truncate(f, 64 * MiB), 0);
    if (fs_has_holes()) {
        assert_true(f->ops->allocated(f) < (int64_t)(1 * MiB));
    }
}

static void test_file_posix_allocate_keeps_content(void **state)
{
    struct vimg_file *f = *state;
    uint8_t r[4096];

    assert_int_equal(vimg_file_pwrite(f, "data", 4, 0), 0);
    assert_int_equal(f->ops->allocate(f, 0, 1 * MiB, VIMG_ALLOC_FALLOC), 0);
    assert_int_equal(vimg_file_size(f), 1 * MiB);
    assert_true(f->ops->allocated(f) >= (int64_t)(1 * MiB));
    assert_int_equal(vimg_file_pread(f, r, sizeof(r), 0), 0);
    assert_memory_equal(r, "data", 4);
    assert_true(all_bytes(r + 4, sizeof(r) - 4, 0));
    assert_int_equal(f->ops->allocate(f, 2 * MiB, 4096, VIMG_ALLOC_FULL), 0);
    assert_int_equal(vimg_file_size(f), 2 * MiB + 4096);
    assert_int_equal(f->ops->allocate(f, 0, 0, VIMG_ALLOC_FULL), 0);
}

static void test_file_posix_zero_may_unmap(void **state)
{
    struct vimg_file *f = *state;
    static uint8_t buf[1024 * 1024];
    uint8_t r[4096];

    memset(buf, 0x77, sizeof(buf));
    assert_int_equal(vimg_file_pwrite(f, buf, sizeof(buf), 0), 0);
    assert_int_equal(vimg_file_sync(f), 0);
    int64_t before = f->ops->allocated(f);

    /* an unaligned range in the middle */
    assert_int_equal(f->ops->zero(f, 100, 512 * KiB, true), 0);
    assert_int_equal(vimg_file_size(f), 1 * MiB);
    memset(buf, 0xEE, sizeof(buf));
    assert_int_equal(vimg_file_pread(f, buf, sizeof(buf), 0), 0);
    assert_true(all_bytes(buf, 100, 0x77));
    assert_true(all_bytes(buf + 100, 512 * KiB, 0));
    assert_true(all_bytes(buf + 100 + 512 * KiB, sizeof(buf) - 100 - 512 * KiB, 0x77));
    if (fs_has_holes()) {
        /* whole blocks inside the range became a hole */
        assert_true(f->ops->allocated(f) < before);
        off_t d = lseek(f->fd, 4096, SEEK_DATA);
        assert_true(d >= (off_t)(512 * KiB));
    }

    /* without unmap: still zeros */
    assert_int_equal(f->ops->zero(f, 900 * KiB, 3, false), 0);
    assert_int_equal(vimg_file_pread(f, r, 8, 900 * KiB - 2), 0);
    assert_memory_equal(r, "\x77\x77\0\0\0\x77\x77\x77", 8);
    assert_int_equal(f->ops->zero(f, 0, 0, true), 0);
}

static void test_file_posix_extent_walk(void **state)
{
    struct vimg_file *f = *state;
    static uint8_t buf[64 * 1024];
    bool is_data = false;
    uint64_t run = 0;

    if (!fs_has_holes()) {
        skip();
    }
    /* 64K data, a 960K hole, 64K data */
    memset(buf, 0x42, sizeof(buf));
    assert_int_equal(vimg_file_pwrite(f, buf, sizeof(buf), 0), 0);
    assert_int_equal(vimg_file_pwrite(f, buf, sizeof(buf), 1 * MiB), 0);
    assert_int_equal(vimg_file_size(f), 1 * MiB + 64 * KiB);

    struct {
        uint64_t off, len;
        bool data;
    } walk[8];
    int n = 0;
    for (uint64_t off = 0; off < 1 * MiB + 64 * KiB;) {
        assert_int_equal(f->ops->extent(f, off, 1 * MiB + 64 * KiB - off, &is_data, &run), 0);
        assert_true(run > 0);
        assert_true(n < 8);
        walk[n].off = off;
        walk[n].len = run;
        walk[n].data = is_data;
        n++;
        off += run;
    }
    assert_int_equal(n, 3);
    assert_true(walk[0].data);
    assert_int_equal(walk[0].len, 64 * KiB);
    assert_false(walk[1].data);
    assert_int_equal(walk[1].off, 64 * KiB);
    assert_int_equal(walk[1].len, 960 * KiB);
    assert_true(walk[2].data);
    assert_int_equal(walk[2].len, 64 * KiB);

    /* len caps the run, in data and in holes */
    assert_int_equal(f->ops->extent(f, 4096, 100, &is_data, &run), 0);
    assert_true(is_data);
    assert_int_equal(run, 100);
    assert_int_equal(f->ops->extent(f, 128 * KiB, 4096, &is_data, &run), 0);
    assert_false(is_data);
    assert_int_equal(run, 4096);
    /* past EOF: a hole */
    assert_int_equal(f->ops->extent(f, 2 * MiB, 4096, &is_data, &run), 0);
    assert_false(is_data);
    assert_int_equal(run, 4096);
    /* a hole at the end of the file up to EOF */
    assert_int_equal(f->ops->truncate(f, 2 * MiB), 0);
    assert_int_equal(f->ops->extent(f, 1 * MiB + 64 * KiB, 1 * MiB, &is_data, &run), 0);
    assert_false(is_data);
    assert_int_equal(run, 1 * MiB);
}

static void test_file_posix_readonly(void **state)
{
    struct vimg_file *f = *state, *ro = NULL;
    uint8_t r[4];

    assert_int_equal(vimg_file_pwrite(f, "abcd", 4, 0), 0);
    assert_int_equal(vimg_file_open_posix(&ro, f->name, 0), 0);
    assert_false(ro->writable);
    assert_int_equal(vimg_file_pread(ro, r, 4, 0), 0);
    assert_memory_equal(r, "abcd", 4);
    assert_int_equal(vimg_file_pwrite(ro, "x", 1, 0), -EBADF);
    assert_int_equal(ro->ops->truncate(ro, 0), -EINVAL);
    vimg_file_close(ro);
    assert_int_equal(vimg_file_size(f), 4);
}

/* ---- in-memory ----------------------------------------------------------- */

static void test_file_mem_basics(void **state)
{
    struct vimg_file *m = NULL;
    uint8_t r[16];

    assert_int_equal(vimg_file_open_mem(&m, "mem", "hello", 5, 64, true), 0);
    assert_string_equal(m->name, "mem");
    assert_int_equal(m->fd, -1);
    assert_true(m->writable);
    assert_int_equal(vimg_file_size(m), 5);
    assert_int_equal(m->ops->allocated(m), 5);
    memset(r, 0xEE, sizeof(r));
    assert_int_equal(vimg_file_pread(m, r, sizeof(r), 3), 0);
    assert_memory_equal(r, "lo", 2);
    assert_true(all_bytes(r + 2, sizeof(r) - 2, 0));
    assert_int_equal(vimg_file_pread(m, r, 4, 1000), 0);
    assert_true(all_bytes(r, 4, 0));
    /* writes grow the file, the gap reads as zeros */
    assert_int_equal(vimg_file_pwrite(m, "XY", 2, 10), 0);
    assert_int_equal(vimg_file_size(m), 12);
    assert_int_equal(vimg_file_pread(m, r, 12, 0), 0);
    assert_memory_equal(r, "hello\0\0\0\0\0XY", 12);
    /* zero, truncate, sync, extent */
    assert_int_equal(m->ops->zero(m, 1, 2, true), 0);
    assert_int_equal(vimg_file_pread(m, r, 5, 0), 0);
    assert_memory_equal(r, "h\0\0lo", 5);
    assert_int_equal(m->ops->truncate(m, 2), 0);
    assert_int_equal(vimg_file_size(m), 2);
    assert_int_equal(m->ops->truncate(m, 8), 0);
    assert_int_equal(vimg_file_pread(m, r, 8, 0), 0);
    assert_memory_equal(r, "h\0\0\0\0\0\0\0", 8);
    assert_int_equal(vimg_file_sync(m), 0);
    bool is_data = false;
    uint64_t run = 0;
    assert_int_equal(m->ops->extent(m, 0, 8, &is_data, &run), 0);
    assert_true(is_data);
    assert_int_equal(run, 8);
    vimg_file_close(m);

    /* the data is copied: the caller's buffer is not used afterwards */
    char src[4] = "abc";
    assert_int_equal(vimg_file_open_mem(&m, "m2", src, 3, 0, true), 0);
    src[0] = 'z';
    assert_int_equal(vimg_file_pread(m, r, 3, 0), 0);
    assert_memory_equal(r, "abc", 3);
    vimg_file_close(m);

    /* an empty file */
    assert_int_equal(vimg_file_open_mem(&m, "empty", NULL, 0, 16, true), 0);
    assert_int_equal(vimg_file_size(m), 0);
    assert_int_equal(vimg_file_pwrite(m, "a", 1, 15), 0);
    assert_int_equal(vimg_file_size(m), 16);
    vimg_file_close(m);
}

static void test_file_mem_growth_bounded(void **state)
{
    struct vimg_file *m = NULL;
    uint8_t big[65];

    memset(big, 1, sizeof(big));
    assert_int_equal(vimg_file_open_mem(&m, "mem", "abc", 3, 64, true), 0);
    assert_int_equal(vimg_file_pwrite(m, big, 64, 0), 0);
    assert_int_equal(vimg_file_size(m), 64);
    assert_int_equal(vimg_file_pwrite(m, big, 1, 64), -EFBIG);
    assert_int_equal(vimg_file_pwrite(m, big, 65, 0), -EFBIG);
    assert_int_equal(vimg_file_pwrite(m, big, 1, UINT64_MAX), -EFBIG);
    assert_int_equal(m->ops->truncate(m, 65), -EFBIG);
    assert_int_equal(m->ops->zero(m, 60, 10, false), -EFBIG);
    assert_int_equal(m->ops->allocate(m, 0, 65, VIMG_ALLOC_FULL), -EFBIG);
    assert_int_equal(m->ops->allocate(m, UINT64_MAX, 2, VIMG_ALLOC_FULL), -EFBIG);
    /* nothing changed */
    assert_int_equal(vimg_file_size(m), 64);
    vimg_file_close(m);

    /* max_size below the initial length: the length is the bound */
    assert_int_equal(vimg_file_open_mem(&m, "mem", "abcdef", 6, 2, true), 0);
    assert_int_equal(vimg_file_pwrite(m, "x", 1, 5), 0);
    assert_int_equal(vimg_file_pwrite(m, "x", 1, 6), -EFBIG);
    vimg_file_close(m);
}

static void test_file_mem_readonly_refuses_writes(void **state)
{
    struct vimg_file *m = NULL;
    uint8_t r[3];

    assert_int_equal(vimg_file_open_mem(&m, "ro", "abc", 3, 64, false), 0);
    assert_false(m->writable);
    assert_int_equal(vimg_file_pwrite(m, "x", 1, 0), -EBADF);
    assert_int_equal(m->ops->truncate(m, 1), -EBADF);
    assert_int_equal(m->ops->zero(m, 0, 1, true), -EBADF);
    assert_int_equal(vimg_file_pread(m, r, 3, 0), 0);
    assert_memory_equal(r, "abc", 3);
    assert_int_equal(vimg_file_size(m), 3);
    vimg_file_close(m);
}

/* A posix file opened read-only fails fallocate with EBADF; the in-memory
 * file must not grow either. */
static void test_file_mem_readonly_refuses_allocate(void **state)
{
    struct vimg_file *m = NULL;

    assert_int_equal(vimg_file_open_mem(&m, "ro", "abc", 3, 64, false), 0);
    int ret = m->ops->allocate(m, 0, 32, VIMG_ALLOC_FULL);
    int64_t size = vimg_file_size(m);
    vimg_file_close(m);
    assert_int_equal(ret, -EBADF);
    assert_int_equal(size, 3);
}

/* ---- vimg_is_zero ------------------------------------------------------- */

static void test_file_is_zero(void **state)
{
    static const size_t lens[] = { 0, 1, 15, 16, 17, 31, 32, 33, 4096 };
    static uint8_t buf[4096 + 64];

    for (size_t li = 0; li < sizeof(lens) / sizeof(lens[0]); li++) {
        size_t len = lens[li];
        /* an unaligned start too */
        for (size_t shift = 0; shift < 2; shift++) {
            uint8_t *p = buf + shift;
            memset(buf, 0, sizeof(buf));
            /* nonzero bytes just outside the range do not count */
            if (shift) {
                buf[0] = 1;
            }
            p[len] = 1;
            assert_true(vimg_is_zero(p, len));

            /* one nonzero byte at every position class */
            size_t pos[] = { 0, 1, 7, 14, 15, 16, 17, 31, 32, len / 2, len - 2, len - 1 };
            for (size_t k = 0; k < sizeof(pos) / sizeof(pos[0]); k++) {
                if (0 == len || pos[k] >= len) {
                    continue;
                }
                for (int v = 1; v < 256; v += 127) {
                    p[pos[k]] = (uint8_t)v;
                    if (vimg_is_zero(p, len)) {
                        fail_msg("len %zu shift %zu: byte %zu = %d not seen", len, shift,
                                 pos[k], v);
                    }
                    p[pos[k]] = 0;
                }
            }
            assert_true(vimg_is_zero(p, len));
        }
    }
    /* a repeating nonzero pattern with period 16 and a zero head */
    memset(buf, 0, sizeof(buf));
    for (size_t i = 16; i < 4096; i += 16) {
        buf[i] = 0xAA;
    }
    assert_false(vimg_is_zero(buf, 4096));
    assert_true(vimg_is_zero(buf, 16));
    assert_false(vimg_is_zero(buf, 17));
}

#define F(t) cmocka_unit_test_setup_teardown(t, file_setup, file_teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        F(test_file_posix_open_basics),
        cmocka_unit_test(test_file_posix_open_errors),
        F(test_file_posix_roundtrip),
        F(test_file_posix_pread_past_eof_zero_fills),
        F(test_file_posix_truncate),
        F(test_file_posix_allocated),
        F(test_file_posix_allocate_keeps_content),
        F(test_file_posix_zero_may_unmap),
        F(test_file_posix_extent_walk),
        F(test_file_posix_readonly),
        cmocka_unit_test(test_file_mem_basics),
        cmocka_unit_test(test_file_mem_growth_bounded),
        cmocka_unit_test(test_file_mem_readonly_refuses_writes),
        cmocka_unit_test(test_file_mem_readonly_refuses_allocate),
        cmocka_unit_test(test_file_is_zero),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

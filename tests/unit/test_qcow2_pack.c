/*
 * Packing of compressed clusters (qcow2_alloc_bytes), the rules qemu 7.2
 * follows: data goes right after the previous compressed cluster and runs
 * on into the next host cluster when that is the next free one; every host
 * cluster touched gets one more reference; a cluster whose refcount is at
 * the maximum (1-bit refcounts: always) takes nothing more; a cluster
 * allocated in between breaks the run; a new refcount block does not leave
 * a hole.  Also the zero-length compressed write that aligns the file end.
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
#include <unistd.h>
#include <setjmp.h>
#include <cmocka.h>

#include "test_tmp.h"

#include "core/image.h"
#include "formats/qcow2/qcow2.h"
#include "io/file.h"
#include "util/util.h"
#include "vimg/vimg.h"

static unsigned serial;

static int group_setup(void **state)
{
    return test_tmp_make("test_qcow2_pack");
}

static int group_teardown(void **state)
{
    return test_tmp_remove();
}

/* A fresh qcow2 image with the given creation options, opened read-write. */
static struct vimg_image *fresh(const char *opts_text)
{
    char name[PATH_MAX], text[256];
    struct vimg_error err = { 0 };
    struct vimg_opts *opts = vimg_opts_new();
    struct vimg_image *img = NULL;

    snprintf(name, sizeof(name), "%s/img%u.qcow2", tmpdir, serial++);
    snprintf(text, sizeof(text), "size=64M,%s", opts_text);
    assert_non_null(opts);
    assert_int_equal(0, vimg_opts_parse(opts, text, &err));
    if (vimg_create(name, "qcow2", opts, &err) < 0) {
        fail_msg("create %s: %s", text, err.msg);
    }
    vimg_opts_free(opts);
    if (vimg_open(&img, name, "qcow2", VIMG_OPEN_RDWR, NULL, &err) < 0) {
        fail_msg("open: %s", err.msg);
    }
    return img;
}

static uint64_t alloc(struct vimg_image *img, uint64_t len)
{
    struct vimg_error err = { 0 };
    uint64_t off = 0;

    if (qcow2_alloc_bytes(img, len, &off, &err) < 0) {
        fail_msg("alloc_bytes(%llu): %s", (unsigned long long)len, err.msg);
    }
    return off;
}

static uint64_t refcount(struct vimg_image *img, uint64_t host_off)
{
    struct qcow2_state *s = qcow2_s(img);
    struct vimg_error err = { 0 };
    uint64_t rc = 0;

    assert_int_equal(0, qcow2_get_refcount(img, host_off >> s->cluster_bits, &rc, &err));
    return rc;
}

static void test_pack_spans_clusters(void **state)
{
    struct vimg_image *img = fresh("cluster_size=4096");
    struct vimg_error err = { 0 };
    const uint64_t cs = 4096;
    uint64_t a, b, c, d, e, plain;

    (void)state;
    a = alloc(img, 3000);
    assert_int_equal(0, a % cs);
    assert_int_equal(1, refcount(img, a));
    /* runs on into the next cluster: both clusters count it */
    b = alloc(img, 2000);
    assert_int_equal(a + 3000, b);
    assert_int_equal(2, refcount(img, a));
    assert_int_equal(1, refcount(img, a + cs));
    /* ends exactly at a cluster boundary */
    c = alloc(img, 2 * cs - 5000);
    assert_int_equal(a + 5000, c);
    assert_int_equal(2, refcount(img, a + cs));
    assert_int_equal(0, qcow2_s(img)->free_byte_off);
    d = alloc(img, 10);
    assert_int_equal(a + 2 * cs, d);
    /* a plain cluster in between: the next one cannot run on */
    assert_int_equal(0, qcow2_alloc_clusters(img, 1, &plain, &err));
    assert_int_equal(a + 3 * cs, plain);
    e = alloc(img, cs - 1);
    assert_int_equal(a + 4 * cs, e);
    assert_int_equal(1, refcount(img, d));
    assert_int_equal(1, refcount(img, e));
    /* but a small one still fits behind e */
    assert_int_equal(e + cs - 1, alloc(img, 1));
    assert_int_equal(2, refcount(img, e));
    vimg_close(img);
}

static void test_pack_refcount_max(void **state)
{
    struct vimg_image *img;
    uint64_t a;

    (void)state;
    /* 1-bit refcounts: one compressed cluster per host cluster */
    img = fresh("cluster_size=4096,refcount_bits=1");
    a = alloc(img, 100);
    assert_int_equal(a + 4096, alloc(img, 100));
    assert_int_equal(a + 2 * 4096, alloc(img, 4000));
    assert_int_equal(a + 3 * 4096, alloc(img, 4095));
    assert_int_equal(1, refcount(img, a + 3 * 4096));
    vimg_close(img);

    /* 2-bit refcounts: three share a cluster, the fourth starts a new one */
    img = fresh("cluster_size=4096,refcount_bits=2");
    a = alloc(img, 100);
    assert_int_equal(a + 100, alloc(img, 100));
    assert_int_equal(a + 200, alloc(img, 100));
    assert_int_equal(3, refcount(img, a));
    assert_int_equal(a + 4096, alloc(img, 100));
    /* a run into a fresh cluster never overflows the full one */
    assert_int_equal(a + 4196, alloc(img, 100));
    assert_int_equal(a + 4296, alloc(img, 4000));
    assert_int_equal(3, refcount(img, a + 4096));
    assert_int_equal(1, refcount(img, a + 2 * 4096));
    vimg_close(img);
}

/* Across refcount block boundaries (512-byte clusters, 64-bit refcounts:
 * 64 clusters a block): the data stays packed and no cluster is left
 * unused below the end, as with qemu, which retries from the cluster it
 * had picked. */
static void test_pack_new_refblocks(void **state)
{
    struct vimg_image *img = fresh("cluster_size=512,refcount_bits=64");
    struct qcow2_state *s = qcow2_s(img);
    uint64_t first, prev_end = 0, end = 0, rb_allocs = 0, rt0 = s->rt[1];

    (void)state;
    first = alloc(img, 300);
    prev_end = first + 300;
    for (unsigned i = 0; i < 2000; i++) {
        uint64_t len = 1 + (i * 7919u) % 511, off = alloc(img, len);

        if (off != prev_end) {
            /* only a new refcount block may break the run */
            assert_int_equal(0, off % 512);
            rb_allocs++;
        }
        prev_end = off + len;
        end = VIMG_MAX(end, prev_end);
    }
    assert_true(rt0 != s->rt[1]);
    assert_true(rb_allocs > 0);
    for (uint64_t c = first; c < end; c += 512) {
        if (0 == refcount(img, c)) {
            fail_msg("cluster at %#llx unused", (unsigned long long)c);
        }
    }
    vimg_close(img);
}

static void test_pack_eof_align(void **state)
{
    struct vimg_image *img = fresh("cluster_size=65536");
    struct vimg_error err = { 0 };
    uint8_t junk[777];
    int64_t size;

    (void)state;
    memset(junk, 0x5a, sizeof(junk));
    assert_int_equal(0, qcow2_write_compressed_data(img, junk, sizeof(junk), 65536, 0, &err));
    size = vimg_file_size(img->file);
    assert_true(size % 512 != 0);
    assert_int_equal(0, img->drv->write_compressed(img, NULL, 0, 0, &err));
    assert_int_equal(vimg_file_size(img->file), (size + 511) / 512 * 512);
    /* already aligned: nothing changes */
    assert_int_equal(0, img->drv->write_compressed(img, NULL, 0, 0, &err));
    assert_int_equal(vimg_file_size(img->file), (size + 511) / 512 * 512);
    vimg_close(img);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pack_spans_clusters),
        cmocka_unit_test(test_pack_refcount_max),
        cmocka_unit_test(test_pack_new_refblocks),
        cmocka_unit_test(test_pack_eof_align),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

/*
 * vimg preallocate on existing qcow2 images: the guest content must not
 * change (qemu-img compare against a raw copy taken before), the image
 * must stay clean (qemu-img check), and every guest cluster must then have
 * host space in the top image (qemu-img map: depth 0 everywhere, so the
 * backing file no longer shows through).  Skipped (77) without qemu-img.
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
#include <sys/stat.h>
#include <unistd.h>
#include <setjmp.h>
#include <cmocka.h>

#include "test_tmp.h"

#include "vimg/vimg.h"


static int sh(const char *fmt, ...)
{
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    int r = system(cmd);
    return WIFEXITED(r) ? WEXITSTATUS(r) : -1;
}

static int group_setup(void **state)
{
    return test_tmp_make("test_qcow2_prealloc");
}

static int group_teardown(void **state)
{
    (void)state;
    return test_tmp_remove();
}

/* Make img.qcow2 (create options, qemu-io commands), preallocate it with
 * vimg in mode, then check content, cleanliness and allocation. */
static void run_case(const char *name, const char *create_opts, const char *qio,
                     enum vimg_prealloc mode, bool backing)
{
    char img[PATH_MAX];
    struct vimg_error err = { 0 };
    struct vimg_image *v = NULL;

    snprintf(img, sizeof(img), "%s/%s.qcow2", tmpdir, name);
    if (backing) {
        assert_int_equal(0, sh("cd '%s' && qemu-img create -q -f qcow2 %s-base.qcow2 8M && "
                               "qemu-io -c 'write -P 0x33 0 3M' -c 'write -P 0x44 7M 100k' "
                               "%s-base.qcow2 >/dev/null && qemu-img create -q -f qcow2 %s "
                               "-b %s-base.qcow2 -F qcow2 '%s'", tmpdir, name, name,
                               create_opts, name, img));
    } else {
        assert_int_equal(0, sh("cd '%s' && qemu-img create -q -f qcow2 %s '%s' 8M", tmpdir,
                               create_opts, img));
    }
    assert_int_equal(0, sh("cd '%s' && qemu-io -f qcow2 %s '%s' >/dev/null", tmpdir, qio,
                           img));
    assert_int_equal(0, sh("cd '%s' && qemu-img convert -O raw '%s' %s-before.raw", tmpdir,
                           img, name));

    assert_int_equal(0, vimg_open(&v, img, "qcow2", VIMG_OPEN_RDWR, NULL, &err));
    assert_int_equal(0, vimg_preallocate(v, mode, &err));
    assert_int_equal(0, err.code);
    vimg_close(v);

    assert_int_equal(0, sh("qemu-img check -q '%s'", img));
    assert_int_equal(0, sh("cd '%s' && qemu-img compare -q %s-before.raw '%s'", tmpdir,
                           name, img));
    /* nothing left to the backing file or unallocated */
    assert_int_equal(0, sh("qemu-img map --output=json '%s' | "
                           "python3 -c 'import json,sys; m=json.load(sys.stdin); "
                           "sys.exit(any(e[\"depth\"] or not e[\"present\"] for e in m))'",
                           img));
}

static const char *const qio_mix =
    "-c 'write -P 0x11 0 1M' -c 'write -z 4M 1M' -c 'write -P 0x22 6M 100k' "
    "-c 'discard 6M 64k'";

static void test_prealloc_metadata(void **state)
{
    (void)state;
    run_case("meta", "", qio_mix, VIMG_PREALLOC_METADATA, false);
}

static void test_prealloc_falloc_full(void **state)
{
    (void)state;
    run_case("falloc", "", qio_mix, VIMG_PREALLOC_FALLOC, false);
    run_case("full", "-o cluster_size=4k", qio_mix, VIMG_PREALLOC_FULL, false);
}

static void test_prealloc_v2_small_clusters(void **state)
{
    (void)state;
    run_case("v2", "-o compat=0.10,cluster_size=512", qio_mix, VIMG_PREALLOC_METADATA,
             false);
}

/* Backing data is copied up; zero clusters of the overlay stay zero. */
static void test_prealloc_backing(void **state)
{
    (void)state;
    run_case("ov", "", "-c 'write -P 0x55 1M 64k' -c 'write -z 2M 64k'",
             VIMG_PREALLOC_FALLOC, true);
    run_case("ovext", "-o extended_l2=on", "-c 'write -P 0x55 1M 4k' -c 'write -z 2M 64k'",
             VIMG_PREALLOC_METADATA, true);
}

/* Compressed clusters keep their place; the rest is allocated around them. */
static void test_prealloc_compressed(void **state)
{
    (void)state;
    run_case("comp", "", "-c 'write -c -P 0x66 0 64k' -c 'write -P 0x77 128k 4k'",
             VIMG_PREALLOC_METADATA, false);
}

int main(void)
{
    if (sh("command -v qemu-img >/dev/null && command -v qemu-io >/dev/null") != 0) {
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prealloc_metadata),
        cmocka_unit_test(test_prealloc_falloc_full),
        cmocka_unit_test(test_prealloc_v2_small_clusters),
        cmocka_unit_test(test_prealloc_backing),
        cmocka_unit_test(test_prealloc_compressed),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

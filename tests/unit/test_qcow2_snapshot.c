/*
 * convert -l on qcow2 (qcow2_snapshot_load_tmp through
 * vimg_internal_snapshot_load_tmp): the snapshot's data is what reads
 * show, the names are recorded for other opens, and a snapshot entry whose
 * L1 table is misaligned, too large or past the end of the file is
 * refused with a message (qemu would read zeros past the end).  Images
 * come from the real qemu-img; without it the test is skipped.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
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
#include "util/util.h"
#include "vimg/vimg.h"

static char img_path[PATH_MAX];

static int setup(void **state)
{
    char cmd[3 * PATH_MAX];

    if (0 != system("command -v qemu-img >/dev/null && command -v qemu-io >/dev/null")) {
        return 0;
    }
    if (test_tmp_make("test_qcow2_snapshot") < 0) {
        return -1;
    }
    snprintf(img_path, sizeof(img_path), "%s/sn.qcow2", tmpdir);
    snprintf(cmd, sizeof(cmd),
             "cd '%s' && qemu-img create -q -f qcow2 sn.qcow2 4M && "
             "qemu-io -c 'write -P 0x11 0 1M' sn.qcow2 >/dev/null && "
             "qemu-img snapshot -c one sn.qcow2 && "
             "qemu-io -c 'write -P 0x22 0 1M' sn.qcow2 >/dev/null", tmpdir);
    return 0 == system(cmd) ? 0 : -1;
}

static int teardown(void **state)
{
    return test_tmp_remove();
}

/* A copy of the image whose first snapshot entry says l1 at off, size n. */
static void patched(const char *out, uint64_t off, uint32_t n)
{
    char cmd[3 * PATH_MAX];
    uint8_t h[72], e[12];
    int fd;

    snprintf(cmd, sizeof(cmd), "cp '%s' '%s'", img_path, out);
    assert_int_equal(0, system(cmd));
    fd = open(out, O_RDWR);
    assert_true(fd >= 0);
    assert_int_equal(sizeof(h), pread(fd, h, sizeof(h), 0));
    vimg_st_be64(e, off);
    vimg_st_be32(e + 8, n);
    assert_int_equal(sizeof(e), pwrite(fd, e, sizeof(e), (off_t)vimg_ld_be64(h + 64)));
    close(fd);
}

static int load(const char *path, unsigned flags, const char *id, const char *name,
                uint8_t *first, struct vimg_error *err)
{
    struct vimg_image *img;
    int ret = vimg_open(&img, path, "qcow2", flags, NULL, err);
    if (ret < 0) {
        return ret;
    }
    ret = vimg_internal_snapshot_load_tmp(img, id, name, err);
    if (0 == ret) {
        assert_true(!id || 0 == strcmp(id, img->tmp_snapshot_id));
        assert_true(!name || 0 == strcmp(name, img->tmp_snapshot_name));
        ret = vimg_pread(img, first, 1, 0, err);
    }
    vimg_close(img);
    return ret;
}

static void test_snapshot_load_tmp(void **state)
{
    struct vimg_error err = { 0 };
    char p[PATH_MAX];
    uint8_t b = 0;

    if (!tmpdir[0]) {
        skip();
    }
    assert_int_equal(0, load(img_path, 0, NULL, NULL, &b, &err) < 0 ? 0 : 1);
    assert_int_equal(0, load(img_path, 0, "1", NULL, &b, &err));
    assert_int_equal(0x11, b);
    assert_int_equal(0, load(img_path, 0, NULL, "one", &b, &err));
    assert_int_equal(0x11, b);
    assert_int_equal(-ENOENT, load(img_path, 0, "1", "two", &b, &err));
    assert_string_equal("Can't find snapshot", err.msg);
    vimg_error_clear(&err);
    assert_int_equal(-EINVAL, load(img_path, VIMG_OPEN_RDWR, "1", NULL, &b, &err));
    assert_string_equal("Device is not readonly", err.msg);
    vimg_error_clear(&err);

    snprintf(p, sizeof(p), "%s/bad.qcow2", tmpdir);
    patched(p, 65536 + 512, 1);
    assert_int_equal(-EINVAL, load(p, 0, "1", NULL, &b, &err));
    assert_string_equal("Snapshot L1 table offset invalid", err.msg);
    vimg_error_clear(&err);
    patched(p, 65536, 4194305);
    assert_int_equal(-EFBIG, load(p, 0, "1", NULL, &b, &err));
    assert_string_equal("Snapshot L1 table too large", err.msg);
    vimg_error_clear(&err);
    patched(p, 1ull << 40, 1);
    assert_int_equal(-EINVAL, load(p, 0, "1", NULL, &b, &err));
    assert_string_equal("Snapshot L1 table lies beyond the end of the file", err.msg);
    vimg_error_clear(&err);
    /* an empty L1: everything reads as zeros */
    patched(p, 0, 0);
    assert_int_equal(0, load(p, 0, "1", NULL, &b, &err));
    assert_int_equal(0, b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_snapshot_load_tmp),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

/*
 * qcow2 writes through the public API, checked against qemu: the same
 * operations are applied with qemu-io to a copy of the image, then
 * `qemu-img compare` must find both equal and `qemu-img check` must find
 * vimg's image clean.  Skipped (77) when qemu-img/qemu-io are missing.
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
    return test_tmp_make("test_qcow2_write");
}

static int group_teardown(void **state)
{
    return test_tmp_remove();
}

enum op_kind { OP_WRITE, OP_ZERO, OP_ZERO_UNMAP, OP_DISCARD };
struct op {
    enum op_kind kind;
    uint64_t off, len;
    int pattern;
};

/* Apply ops with qemu-io to q and with vimg to v; compare and check. */
static void run_case(const char *name, const char *create_opts, const char *prep,
                     const struct op *ops, size_t nops)
{
    char q[PATH_MAX], v[PATH_MAX], qio[8192];
    struct vimg_error err = { 0 };
    struct vimg_image *img;
    size_t used = 0;

    snprintf(q, sizeof(q), "%s/%s-q.qcow2", tmpdir, name);
    snprintf(v, sizeof(v), "%s/%s-v.qcow2", tmpdir, name);
    assert_int_equal(0, sh("cd '%s' && qemu-img create -q -f qcow2 %s '%s' 4M", tmpdir,
                           create_opts, q));
    if (prep && *prep) {
        assert_int_equal(0, sh("cd '%s' && %s '%s' >/dev/null", tmpdir, prep, q));
    }
    assert_int_equal(0, sh("cp '%s' '%s'", q, v));

    assert_int_equal(0, vimg_open(&img, v, "qcow2", VIMG_OPEN_RDWR, NULL, &err));
    qio[0] = 0;
    for (size_t i = 0; i < nops; i++) {
        const struct op *o = &ops[i];
        int ret = 0;
        switch (o->kind) {
        case OP_WRITE: {
            uint8_t *buf = malloc(o->len);
            memset(buf, o->pattern, o->len);
            ret = vimg_pwrite(img, buf, o->len, o->off, &err);
            free(buf);
            used += (size_t)snprintf(qio + used, sizeof(qio) - used,
                                     " -c 'write -P %d %llu %llu'", o->pattern,
                                     (unsigned long long)o->off,
                                     (unsigned long long)o->len);
            break;
        }
        case OP_ZERO:
        case OP_ZERO_UNMAP:
            ret = vimg_write_zeroes(img, o->off, o->len,
                                    OP_ZERO_UNMAP == o->kind ? VIMG_ZERO_MAY_UNMAP : 0,
                                    &err);
            used += (size_t)snprintf(qio + used, sizeof(qio) - used,
                                     " -c 'write -z %llu %llu'",
                                     (unsigned long long)o->off,
                                     (unsigned long long)o->len);
            break;
        case OP_DISCARD:
            ret = vimg_discard(img, o->off, o->len, &err);
            /* qemu-io discard leaves v2 clusters to the backing file;
             * only compare content where both define it */
            used += (size_t)snprintf(qio + used, sizeof(qio) - used,
                                     " -c 'discard %llu %llu'",
                                     (unsigned long long)o->off,
                                     (unsigned long long)o->len);
            break;
        }
        if (ret < 0) {
            fail_msg("%s: op %zu: %s", name, i, err.msg);
        }
    }
    assert_int_equal(0, vimg_flush(img, &err));
    vimg_close(img);
    assert_int_equal(0, sh("cd '%s' && qemu-io -f qcow2 %s '%s' >/dev/null", tmpdir, qio, q));
    if (sh("qemu-img check -q '%s'", v)) {
        sh("qemu-img check '%s' >&2", v);
        fail_msg("%s: qemu-img check failed", name);
    }
    if (sh("cd '%s' && qemu-img compare -q '%s' '%s'", tmpdir, q, v)) {
        fail_msg("%s: content differs from qemu-io's", name);
    }
}

static const struct op mixed_ops[] = {
    { OP_WRITE, 0, 65536, 0x11 },
    { OP_WRITE, 1000, 3000, 0x22 },
    { OP_WRITE, 65536 * 3 + 512, 70000, 0x33 },
    { OP_ZERO, 65536 * 5, 65536, 0 },
    { OP_ZERO_UNMAP, 65536 * 6, 65536 * 2, 0 },
    { OP_ZERO, 65536 * 9 + 4096, 8192, 0 },
    { OP_WRITE, 2 * 1024 * 1024 - 100, 200, 0x44 },
    { OP_WRITE, 4 * 1024 * 1024 - 4096, 4096, 0x55 },
    { OP_WRITE, 0, 512, 0x66 },
    { OP_ZERO_UNMAP, 0, 65536, 0 },
    { OP_WRITE, 65536 * 12, 65536 * 3, 0x77 },
};

static const char *const variants[][2] = {
    { "default", "" },
    { "v2", "-o compat=0.10" },
    { "c512", "-o cluster_size=512" },
    { "c4k-r1", "-o cluster_size=4k,refcount_bits=1" },
    { "c512-r64", "-o cluster_size=512,refcount_bits=64" },
    { "c2m", "-o cluster_size=2M" },
    { "extl2", "-o extended_l2=on" },
    { "zstd", "-o compression_type=zstd" },
    { "lazy", "-o lazy_refcounts=on" },
};

static bool have_qemu(void)
{
    return 0 == sh("qemu-img --version >/dev/null 2>&1 && qemu-io --version >/dev/null 2>&1");
}

static void test_qcow2_write_fresh(void **state)
{
    for (size_t i = 0; i < sizeof(variants) / sizeof(variants[0]); i++) {
        run_case(variants[i][0], variants[i][1], NULL, mixed_ops,
                 sizeof(mixed_ops) / sizeof(mixed_ops[0]));
    }
}

static void test_qcow2_write_over_existing(void **state)
{
    /* data, compressed clusters and zero clusters made by qemu first */
    const char *prep = "qemu-io -f qcow2 -c 'write -P 1 0 1M' -c 'write -c -P 2 1M 128k' "
                       "-c 'write -z 2M 128k' -c 'write -P 3 3M 64k'";
    static const struct op ops[] = {
        { OP_WRITE, 4096, 4096, 0x21 },
        { OP_WRITE, 1024 * 1024 + 100, 50, 0x22 },
        { OP_WRITE, 1024 * 1024 + 65536, 65536, 0x23 },
        { OP_WRITE, 2 * 1024 * 1024 + 10, 10, 0x24 },
        { OP_ZERO, 3 * 1024 * 1024, 65536, 0 },
        { OP_DISCARD, 0, 131072, 0 },
    };
    for (size_t i = 0; i < sizeof(variants) / sizeof(variants[0]); i++) {
        char name[64];
        snprintf(name, sizeof(name), "ex-%s", variants[i][0]);
        if (strstr(variants[i][1], "compat=0.10") || strstr(variants[i][1], "2M")) {
            /* v2: discard semantics differ; 2M: compressed writes need whole
             * clusters */
            continue;
        }
        run_case(name, variants[i][1], prep, ops, sizeof(ops) / sizeof(ops[0]));
    }
}

static void test_qcow2_write_snapshot_cow(void **state)
{
    static const struct op ops[] = {
        { OP_WRITE, 4096, 4096, 0x31 },
        { OP_WRITE, 2 * 1024 * 1024, 65536, 0x32 },
        { OP_ZERO_UNMAP, 65536, 65536, 0 },
    };
    run_case("snap", "", "f() { qemu-io -f qcow2 -c 'write -P 1 0 2M' "
             "-c 'write -c -P 2 2M 128k' \"$1\" >/dev/null && qemu-img snapshot -c s1 \"$1\"; }; f",
             ops, sizeof(ops) / sizeof(ops[0]));
}

static void test_qcow2_write_backing(void **state)
{
    static const struct op ops[] = {
        { OP_WRITE, 100, 100, 0x41 },
        { OP_WRITE, 65536 + 4096, 4096, 0x42 },
        { OP_ZERO, 3 * 65536, 65536, 0 },
        { OP_DISCARD, 5 * 65536, 65536, 0 },
    };
    assert_int_equal(0, sh("cd '%s' && qemu-img create -q -f qcow2 base.qcow2 4M && "
                           "qemu-io -c 'write -P 9 0 4M' base.qcow2 >/dev/null", tmpdir));
    run_case("backing", "-b base.qcow2 -F qcow2", NULL, ops, sizeof(ops) / sizeof(ops[0]));
    run_case("backing-el2", "-o extended_l2=on -b base.qcow2 -F qcow2", NULL, ops,
             sizeof(ops) / sizeof(ops[0]));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_qcow2_write_fresh),
        cmocka_unit_test(test_qcow2_write_over_existing),
        cmocka_unit_test(test_qcow2_write_snapshot_cow),
        cmocka_unit_test(test_qcow2_write_backing),
    };
    if (!have_qemu()) {
        return 77;
    }
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}

/*
 * src/core/qobj.c: qemu 7.2's QObject output.  The expected texts are copied
 * from the real qemu-img 7.2 (`qemu-img info --output=json`, `qemu-img info`,
 * `qemu-img measure --output=json`), including a qcow2 image with bitmaps and
 * a LUKS-encrypted qcow2 with an external data file; the string escapes from
 * `qemu-img info --output=json` of files with odd names.
 */
#include "config.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <setjmp.h>
#include <cmocka.h>

#include "core/qobj.h"

/* Top-level objects of a test: a failing assert longjmps out of the test,
 * so whatever is still tracked is freed by the teardown. */
static struct vimg_qobj *tracked[32];

static struct vimg_qobj *track(struct vimg_qobj *o)
{
    assert_non_null(o);
    for (size_t i = 0; i < sizeof(tracked) / sizeof(tracked[0]); i++) {
        if (!tracked[i]) {
            tracked[i] = o;
            return o;
        }
    }
    fail_msg("too many tracked objects");
    return o;
}

static void release(struct vimg_qobj *o)
{
    for (size_t i = 0; i < sizeof(tracked) / sizeof(tracked[0]); i++) {
        if (tracked[i] == o) {
            tracked[i] = NULL;
        }
    }
    vimg_q_free(o);
}

static int teardown(void **state)
{
    for (size_t i = 0; i < sizeof(tracked) / sizeof(tracked[0]); i++) {
        vimg_q_free(tracked[i]);
        tracked[i] = NULL;
    }
    return 0;
}

/* Compare, free, and only then fail, so a failure leaks nothing. */
static void check_text(char *got, const char *expected, const char *what)
{
    bool same;
    assert_non_null(got);
    same = 0 == strcmp(got, expected);
    if (!same) {
        print_error("%s differs.\n--- got ---\n%s\n--- expected ---\n%s\n", what, got,
                    expected);
    }
    free(got);
    assert_true(same);
}

static void assert_json(const struct vimg_qobj *o, const char *expected)
{
    check_text(vimg_q_to_json(o), expected, "JSON");
}

static void assert_human(const struct vimg_qobj *o, int indent, const char *expected)
{
    check_text(vimg_q_to_human(o, indent), expected, "human output");
}

/* The JSON of a single string: only the escaping is under test. */
static void assert_json_str(const char *in, const char *expected)
{
    struct vimg_qobj *o = vimg_q_str(in);
    char *got;
    assert_non_null(o);
    got = vimg_q_to_json(o);
    vimg_q_free(o);
    check_text(got, expected, "escaped string");
}

/* ---- a raw image's info ------------------------------------------------- */

static struct vimg_qobj *raw_info(const int *order)
{
    struct vimg_qobj *d = vimg_q_dict();
    for (int i = 0; i < 5; i++) {
        switch (order[i]) {
        case 0: vimg_q_put(d, "virtual-size", vimg_q_uint(1048576)); break;
        case 1: vimg_q_put(d, "filename", vimg_q_str("f")); break;
        case 2: vimg_q_put(d, "format", vimg_q_str("raw")); break;
        case 3: vimg_q_put(d, "actual-size", vimg_q_int(0)); break;
        case 4: vimg_q_put(d, "dirty-flag", vimg_q_bool(false)); break;
        }
    }
    return d;
}

static void test_qobj_raw_info_json_byte_exact(void **state)
{
    static const char expected[] =
        "{\n"
        "    \"virtual-size\": 1048576,\n"
        "    \"filename\": \"f\",\n"
        "    \"format\": \"raw\",\n"
        "    \"actual-size\": 0,\n"
        "    \"dirty-flag\": false\n"
        "}";
    static const int orders[][5] = {
        { 0, 1, 2, 3, 4 }, { 4, 3, 2, 1, 0 }, { 2, 4, 0, 3, 1 }, { 3, 0, 4, 1, 2 },
    };
    for (size_t i = 0; i < sizeof(orders) / sizeof(orders[0]); i++) {
        struct vimg_qobj *d = track(raw_info(orders[i]));
        assert_int_equal(vimg_q_count(d), 5);
        assert_json(d, expected);
        release(d);
    }
}

/* ---- qcow2 format-specific data ----------------------------------------- */

static struct vimg_qobj *bitmap(const char *name, uint64_t gran, bool autoflag)
{
    struct vimg_qobj *b = vimg_q_dict();
    struct vimg_qobj *flags = vimg_q_list();
    if (autoflag) {
        vimg_q_append(flags, vimg_q_str("auto"));
    }
    /* qemu's visitor order: name, granularity, flags */
    vimg_q_put(b, "name", vimg_q_str(name));
    vimg_q_put(b, "granularity", vimg_q_uint(gran));
    vimg_q_put(b, "flags", flags);
    return b;
}

static void put_qcow2_key(struct vimg_qobj *d, int which)
{
    switch (which) {
    case 0: vimg_q_put(d, "compat", vimg_q_str("1.1")); break;
    case 1: vimg_q_put(d, "compression-type", vimg_q_str("zlib")); break;
    case 2: vimg_q_put(d, "lazy-refcounts", vimg_q_bool(true)); break;
    case 3: {
        struct vimg_qobj *l = vimg_q_list();
        vimg_q_append(l, bitmap("b1", 65536, true));
        vimg_q_append(l, bitmap("b2", 131072, false));
        vimg_q_put(d, "bitmaps", l);
        break;
    }
    case 4: vimg_q_put(d, "refcount-bits", vimg_q_int(16)); break;
    case 5: vimg_q_put(d, "corrupt", vimg_q_bool(false)); break;
    case 6: vimg_q_put(d, "extended-l2", vimg_q_bool(false)); break;
    }
}

static const char qcow2_data_json[] =
    "{\n"
    "    \"compat\": \"1.1\",\n"
    "    \"compression-type\": \"zlib\",\n"
    "    \"lazy-refcounts\": true,\n"
    "    \"bitmaps\": [\n"
    "        {\n"
    "            \"flags\": [\n"
    "                \"auto\"\n"
    "            ],\n"
    "            \"name\": \"b1\",\n"
    "            \"granularity\": 65536\n"
    "        },\n"
    "        {\n"
    "            \"flags\": [\n"
    "            ],\n"
    "            \"name\": \"b2\",\n"
    "            \"granularity\": 131072\n"
    "        }\n"
    "    ],\n"
    "    \"refcount-bits\": 16,\n"
    "    \"corrupt\": false,\n"
    "    \"extended-l2\": false\n"
    "}";

static const char qcow2_data_human[] =
    "    compat: 1.1\n"
    "    compression type: zlib\n"
    "    lazy refcounts: true\n"
    "    bitmaps:\n"
    "        [0]:\n"
    "            flags:\n"
    "                [0]: auto\n"
    "            name: b1\n"
    "            granularity: 65536\n"
    "        [1]:\n"
    "            flags:\n"
    "            name: b2\n"
    "            granularity: 131072\n"
    "    refcount bits: 16\n"
    "    corrupt: false\n"
    "    extended l2: false\n";

static void test_qobj_qcow2_specific_json_and_human(void **state)
{
    static const int orders[][7] = {
        { 0, 1, 2, 3, 4, 5, 6 }, { 6, 5, 4, 3, 2, 1, 0 }, { 3, 0, 6, 2, 5, 1, 4 },
        /* qemu's own visitor order (the QAPI struct's member order) */
        { 0, 4, 2, 6, 5, 3, 1 },
    };
    for (size_t i = 0; i < sizeof(orders) / sizeof(orders[0]); i++) {
        struct vimg_qobj *d = track(vimg_q_dict());
        for (int k = 0; k < 7; k++) {
            put_qcow2_key(d, orders[i][k]);
        }
        assert_json(d, qcow2_data_json);
        assert_human(d, 1, qcow2_data_human);
        release(d);
    }
}

/* The whole `qemu-img info --output=json` of the qcow2 image above. */
static void test_qobj_qcow2_info_nested_json(void **state)
{
    static const char expected[] =
        "{\n"
        "    \"virtual-size\": 1048576,\n"
        "    \"filename\": \"q.qcow2\",\n"
        "    \"cluster-size\": 65536,\n"
        "    \"format\": \"qcow2\",\n"
        "    \"actual-size\": 225280,\n"
        "    \"format-specific\": {\n"
        "        \"type\": \"qcow2\",\n"
        "        \"data\": {\n"
        "            \"compat\": \"1.1\",\n"
        "            \"compression-type\": \"zlib\",\n"
        "            \"lazy-refcounts\": true,\n"
        "            \"bitmaps\": [\n"
        "                {\n"
        "                    \"flags\": [\n"
        "                        \"auto\"\n"
        "                    ],\n"
        "                    \"name\": \"b1\",\n"
        "                    \"granularity\": 65536\n"
        "                },\n"
        "                {\n"
        "                    \"flags\": [\n"
        "                    ],\n"
        "                    \"name\": \"b2\",\n"
        "                    \"granularity\": 131072\n"
        "                }\n"
        "            ],\n"
        "            \"refcount-bits\": 16,\n"
        "            \"corrupt\": false,\n"
        "            \"extended-l2\": false\n"
        "        }\n"
        "    },\n"
        "    \"dirty-flag\": false\n"
        "}";
    struct vimg_qobj *top = track(vimg_q_dict());
    struct vimg_qobj *spec = vimg_q_dict();
    struct vimg_qobj *data = vimg_q_dict();

    for (int k = 0; k < 7; k++) {
        put_qcow2_key(data, k);
    }
    vimg_q_put(spec, "type", vimg_q_str("qcow2"));
    vimg_q_put(spec, "data", data);
    vimg_q_put(top, "dirty-flag", vimg_q_bool(false));
    vimg_q_put(top, "format-specific", spec);
    vimg_q_put(top, "actual-size", vimg_q_int(225280));
    vimg_q_put(top, "format", vimg_q_str("qcow2"));
    vimg_q_put(top, "cluster-size", vimg_q_int(65536));
    vimg_q_put(top, "filename", vimg_q_str("q.qcow2"));
    vimg_q_put(top, "virtual-size", vimg_q_int(1048576));
    assert_json(top, expected);
    release(top);
}

/* All eleven qcow2 keys, including data-file, encrypt and data-file-raw. */
static void put_full_qcow2_key(struct vimg_qobj *d, int which)
{
    switch (which) {
    case 0: vimg_q_put(d, "compat", vimg_q_str("1.1")); break;
    case 1: vimg_q_put(d, "compression-type", vimg_q_str("zlib")); break;
    case 2: vimg_q_put(d, "lazy-refcounts", vimg_q_bool(false)); break;
    case 3: {
        struct vimg_qobj *l = vimg_q_list();
        vimg_q_append(l, bitmap("b1", 65536, true));
        vimg_q_put(d, "bitmaps", l);
        break;
    }
    case 4: vimg_q_put(d, "refcount-bits", vimg_q_int(16)); break;
    case 5: vimg_q_put(d, "data-file", vimg_q_str("e.data")); break;
    case 6: {
        struct vimg_qobj *e = vimg_q_dict();
        struct vimg_qobj *slots = vimg_q_list();
        struct vimg_qobj *s0 = vimg_q_dict();
        struct vimg_qobj *s1 = vimg_q_dict();
        vimg_q_put(s0, "stripes", vimg_q_int(4000));
        vimg_q_put(s0, "key-offset", vimg_q_int(4096));
        vimg_q_put(s0, "iters", vimg_q_int(40404));
        vimg_q_put(s0, "active", vimg_q_bool(true));
        vimg_q_put(s1, "active", vimg_q_bool(false));
        vimg_q_put(s1, "key-offset", vimg_q_int(262144));
        vimg_q_append(slots, s0);
        vimg_q_append(slots, s1);
        vimg_q_put(e, "format", vimg_q_str("luks"));
        vimg_q_put(e, "cipher-alg", vimg_q_str("aes-256"));
        vimg_q_put(e, "cipher-mode", vimg_q_str("xts"));
        vimg_q_put(e, "ivgen-alg", vimg_q_str("plain64"));
        vimg_q_put(e, "hash-alg", vimg_q_str("sha256"));
        vimg_q_put(e, "payload-offset", vimg_q_int(2068480));
        vimg_q_put(e, "master-key-iters", vimg_q_int(10129));
        vimg_q_put(e, "uuid", vimg_q_str("f8ffc524-df90-4b7f-90d4-d6e5093447f7"));
        vimg_q_put(e, "slots", slots);
        vimg_q_put(d, "encrypt", e);
        break;
    }
    case 7: vimg_q_put(d, "data-file-raw", vimg_q_bool(true)); break;
    case 8: vimg_q_put(d, "corrupt", vimg_q_bool(false)); break;
    case 9: vimg_q_put(d, "extended-l2", vimg_q_bool(false)); break;
    }
}

static void test_qobj_qcow2_all_keys_order(void **state)
{
    static const char expected[] =
        "{\n"
        "    \"compat\": \"1.1\",\n"
        "    \"compression-type\": \"zlib\",\n"
        "    \"lazy-refcounts\": false,\n"
        "    \"bitmaps\": [\n"
        "        {\n"
        "            \"flags\": [\n"
        "                \"auto\"\n"
        "            ],\n"
        "            \"name\": \"b1\",\n"
        "            \"granularity\": 65536\n"
        "        }\n"
        "    ],\n"
        "    \"refcount-bits\": 16,\n"
        "    \"data-file\": \"e.data\",\n"
        "    \"encrypt\": {\n"
        "        \"ivgen-alg\": \"plain64\",\n"
        "        \"hash-alg\": \"sha256\",\n"
        "        \"cipher-alg\": \"aes-256\",\n"
        "        \"uuid\": \"f8ffc524-df90-4b7f-90d4-d6e5093447f7\",\n"
        "        \"format\": \"luks\",\n"
        "        \"cipher-mode\": \"xts\",\n"
        "        \"slots\": [\n"
        "            {\n"
        "                \"active\": true,\n"
        "                \"iters\": 40404,\n"
        "                \"key-offset\": 4096,\n"
        "                \"stripes\": 4000\n"
        "            },\n"
        "            {\n"
        "                \"active\": false,\n"
        "                \"key-offset\": 262144\n"
        "            }\n"
        "        ],\n"
        "        \"payload-offset\": 2068480,\n"
        "        \"master-key-iters\": 10129\n"
        "    },\n"
        "    \"data-file-raw\": true,\n"
        "    \"corrupt\": false,\n"
        "    \"extended-l2\": false\n"
        "}";
    static const char expected_human[] =
        "    compat: 1.1\n"
        "    compression type: zlib\n"
        "    lazy refcounts: false\n"
        "    bitmaps:\n"
        "        [0]:\n"
        "            flags:\n"
        "                [0]: auto\n"
        "            name: b1\n"
        "            granularity: 65536\n"
        "    refcount bits: 16\n"
        "    data file: e.data\n"
        "    encrypt:\n"
        "        ivgen alg: plain64\n"
        "        hash alg: sha256\n"
        "        cipher alg: aes-256\n"
        "        uuid: f8ffc524-df90-4b7f-90d4-d6e5093447f7\n"
        "        format: luks\n"
        "        cipher mode: xts\n"
        "        slots:\n"
        "            [0]:\n"
        "                active: true\n"
        "                iters: 40404\n"
        "                key offset: 4096\n"
        "                stripes: 4000\n"
        "            [1]:\n"
        "                active: false\n"
        "                key offset: 262144\n"
        "        payload offset: 2068480\n"
        "        master key iters: 10129\n"
        "    data file raw: true\n"
        "    corrupt: false\n"
        "    extended l2: false\n";
    static const int orders[][10] = {
        { 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 },
        { 9, 8, 7, 6, 5, 4, 3, 2, 1, 0 },
        { 5, 9, 0, 7, 3, 1, 8, 6, 2, 4 },
    };
    for (size_t i = 0; i < sizeof(orders) / sizeof(orders[0]); i++) {
        struct vimg_qobj *d = track(vimg_q_dict());
        for (int k = 0; k < 10; k++) {
            put_full_qcow2_key(d, orders[i][k]);
        }
        assert_int_equal(vimg_q_count(d), 10);
        assert_json(d, expected);
        assert_human(d, 1, expected_human);
        release(d);
    }
}

static void test_qobj_measure_key_order(void **state)
{
    struct vimg_qobj *d = track(vimg_q_dict());

    vimg_q_put(d, "fully-allocated", vimg_q_uint(1376256));
    vimg_q_put(d, "required", vimg_q_uint(327680));
    assert_json(d, "{\n"
                   "    \"required\": 327680,\n"
                   "    \"fully-allocated\": 1376256\n"
                   "}");
    vimg_q_put(d, "bitmaps", vimg_q_uint(327680));
    assert_json(d, "{\n"
                   "    \"bitmaps\": 327680,\n"
                   "    \"required\": 327680,\n"
                   "    \"fully-allocated\": 1376256\n"
                   "}");
    release(d);

    d = track(vimg_q_dict());
    vimg_q_put(d, "required", vimg_q_uint(1));
    vimg_q_put(d, "bitmaps", vimg_q_uint(2));
    vimg_q_put(d, "fully-allocated", vimg_q_uint(3));
    assert_json(d, "{\n"
                   "    \"bitmaps\": 2,\n"
                   "    \"required\": 1,\n"
                   "    \"fully-allocated\": 3\n"
                   "}");
    release(d);
}

static void test_qobj_check_key_order(void **state)
{
    /* `qemu-img check --output=json` of a clean qcow2 */
    struct vimg_qobj *d = track(vimg_q_dict());
    vimg_q_put(d, "format", vimg_q_str("qcow2"));
    vimg_q_put(d, "filename", vimg_q_str("q.qcow2"));
    vimg_q_put(d, "check-errors", vimg_q_int(0));
    vimg_q_put(d, "total-clusters", vimg_q_int(16));
    vimg_q_put(d, "image-end-offset", vimg_q_int(589824));
    assert_json(d, "{\n"
                   "    \"image-end-offset\": 589824,\n"
                   "    \"total-clusters\": 16,\n"
                   "    \"check-errors\": 0,\n"
                   "    \"filename\": \"q.qcow2\",\n"
                   "    \"format\": \"qcow2\"\n"
                   "}");
    release(d);
}

/* Two keys in one QDict bucket iterate newest first, as in qemu. */
static void test_qobj_same_bucket_newest_first(void **state)
{
    char a[16] = "", b[16] = "";
    unsigned bucket[4096];
    bool found = false;

    for (int i = 0; i < 4096 && !found; i++) {
        char k[16];
        snprintf(k, sizeof(k), "k%d", i);
        bucket[i] = vimg_q_hash(k) % 512;
        for (int j = 0; j < i; j++) {
            if (bucket[j] == bucket[i]) {
                snprintf(a, sizeof(a), "k%d", j);
                snprintf(b, sizeof(b), "k%d", i);
                found = true;
                break;
            }
        }
    }
    assert_true(found);

    char exp_ab[64], exp_ba[64];
    snprintf(exp_ab, sizeof(exp_ab), "{\n    \"%s\": 2,\n    \"%s\": 1\n}", b, a);
    snprintf(exp_ba, sizeof(exp_ba), "{\n    \"%s\": 1,\n    \"%s\": 2\n}", a, b);

    struct vimg_qobj *d = track(vimg_q_dict());
    vimg_q_put(d, a, vimg_q_int(1));
    vimg_q_put(d, b, vimg_q_int(2));
    assert_json(d, exp_ab);
    release(d);

    d = track(vimg_q_dict());
    vimg_q_put(d, b, vimg_q_int(2));
    vimg_q_put(d, a, vimg_q_int(1));
    assert_json(d, exp_ba);
    /* replacing a value keeps the key's place */
    vimg_q_put(d, b, vimg_q_int(3));
    snprintf(exp_ba, sizeof(exp_ba), "{\n    \"%s\": 1,\n    \"%s\": 3\n}", a, b);
    assert_json(d, exp_ba);
    release(d);
}

static void test_qobj_hash_matches_qemu_tdb_hash(void **state)
{
    /* tdb_hash of qobject/qdict.c, written out independently */
    static const char *const keys[] = { "", "a", "format", "virtual-size",
                                        "a-rather-long-key-name-beyond-24-chars",
                                        "\xff\x80" };
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        const char *k = keys[i];
        unsigned v = 0x238F13AFu * (unsigned)strlen(k);
        for (unsigned j = 0; k[j]; j++) {
            v = v + ((unsigned)((const unsigned char *)k)[j] << (j * 5 % 24));
        }
        assert_int_equal(vimg_q_hash(k), 1103515243u * v + 12345u);
    }
}

/* ---- scalars, lists, empty containers ------------------------------------ */

static void test_qobj_scalars_json(void **state)
{
    struct vimg_qobj *o;

    o = track(vimg_q_int(-42));
    assert_json(o, "-42");
    assert_int_equal(vimg_q_type(o), VIMG_Q_INT);
    assert_int_equal(vimg_q_get_int(o), -42);
    release(o);

    o = track(vimg_q_int(INT64_MIN));
    assert_json(o, "-9223372036854775808");
    release(o);

    o = track(vimg_q_uint(UINT64_MAX));
    assert_json(o, "18446744073709551615");
    assert_int_equal(vimg_q_type(o), VIMG_Q_UINT);
    release(o);

    o = track(vimg_q_bool(true));
    assert_json(o, "true");
    assert_true(vimg_q_get_bool(o));
    release(o);

    o = track(vimg_q_bool(false));
    assert_json(o, "false");
    assert_false(vimg_q_get_bool(o));
    release(o);

    o = track(vimg_q_str(NULL));
    assert_json(o, "\"\"");
    assert_string_equal(vimg_q_get_str(o), "");
    release(o);
}

static void test_qobj_empty_containers(void **state)
{
    struct vimg_qobj *l = vimg_q_list();
    struct vimg_qobj *d = track(vimg_q_dict());

    assert_json(l, "[\n]");
    assert_json(d, "{\n}");
    assert_int_equal(vimg_q_count(l), 0);
    assert_null(vimg_q_index(l, 0));

    /* nested: the closing bracket is indented to the member's level */
    vimg_q_put(d, "snapshots", l);
    vimg_q_put(d, "children", vimg_q_dict());
    char *s = vimg_q_to_json(d);
    assert_non_null(s);
    assert_non_null(strstr(s, "\"snapshots\": [\n    ]"));
    assert_non_null(strstr(s, "\"children\": {\n    }"));
    free(s);
    release(d);
}

static void test_qobj_list_of_scalars(void **state)
{
    struct vimg_qobj *l = track(vimg_q_list());
    vimg_q_append(l, vimg_q_int(1));
    vimg_q_append(l, vimg_q_str("two"));
    vimg_q_append(l, vimg_q_bool(true));
    vimg_q_append(l, NULL);   /* ignored */
    assert_int_equal(vimg_q_count(l), 3);
    assert_int_equal(vimg_q_get_int(vimg_q_index(l, 0)), 1);
    assert_string_equal(vimg_q_get_str(vimg_q_index(l, 1)), "two");
    assert_null(vimg_q_index(l, 3));
    assert_json(l, "[\n    1,\n    \"two\",\n    true\n]");
    assert_human(l, 0, "[0]: 1\n[1]: two\n[2]: true\n");
    release(l);
}

static void test_qobj_get_and_getters(void **state)
{
    struct vimg_qobj *d = track(vimg_q_dict());
    vimg_q_put(d, "n", vimg_q_uint(7));
    vimg_q_put(d, "s", vimg_q_str("x"));
    vimg_q_put(d, "b", vimg_q_bool(true));
    vimg_q_put(d, "ignored", NULL);

    assert_int_equal(vimg_q_count(d), 3);
    assert_null(vimg_q_get(d, "ignored"));
    assert_null(vimg_q_get(d, "missing"));
    assert_int_equal(vimg_q_type(d), VIMG_Q_DICT);
    assert_int_equal(vimg_q_get_int(vimg_q_get(d, "n")), 7);
    assert_string_equal(vimg_q_get_str(vimg_q_get(d, "s")), "x");
    assert_true(vimg_q_get_bool(vimg_q_get(d, "b")));
    /* wrong type or NULL: the neutral value */
    assert_int_equal(vimg_q_get_int(vimg_q_get(d, "s")), 0);
    assert_string_equal(vimg_q_get_str(vimg_q_get(d, "n")), "");
    assert_false(vimg_q_get_bool(vimg_q_get(d, "n")));
    assert_int_equal(vimg_q_get_int(NULL), 0);
    assert_string_equal(vimg_q_get_str(NULL), "");
    assert_false(vimg_q_get_bool(NULL));
    assert_int_equal(vimg_q_count(NULL), 0);

    /* replacing keeps the count */
    vimg_q_put(d, "n", vimg_q_int(-1));
    assert_int_equal(vimg_q_count(d), 3);
    assert_int_equal(vimg_q_get_int(vimg_q_get(d, "n")), -1);
    release(d);
}

/* ---- string escaping ------------------------------------------------------ */

static void test_qobj_json_escape_basic(void **state)
{
    /* a file named q"b\s<LF>n<TAB>t<0x01>c, as qemu-img info prints it */
    assert_json_str("q\"b\\s\nn\tt\x01" "c", "\"q\\\"b\\\\s\\nn\\tt\\u0001c\"");
    assert_json_str("r\r\b\f.", "\"r\\r\\b\\f.\"");
    assert_json_str("\x1f", "\"\\u001F\"");
    assert_json_str("d\x7f.", "\"d\\u007F.\"");
    assert_json_str("/", "\"/\"");
    /* non-ASCII: uppercase hex, BMP in one escape */
    assert_json_str("c\xc3\xa9.", "\"c\\u00E9.\"");
    assert_json_str("\xe2\x82\xac", "\"\\u20AC\"");
    /* a 4-byte character becomes a surrogate pair */
    assert_json_str("e\xf0\x9f\x98\x80!", "\"e\\uD83D\\uDE00!\"");
    assert_json_str("\xf4\x8f\xbf\xbd", "\"\\uDBFF\\uDFFD\"");
    /* a byte that starts nothing: U+FFFD */
    assert_json_str("i\xffv", "\"i\\uFFFDv\"");
    assert_json_str("y\x80.", "\"y\\uFFFD.\"");
    assert_json_str("\xfe", "\"\\uFFFD\"");
}

static void test_qobj_json_escape_in_keys(void **state)
{
    struct vimg_qobj *d = track(vimg_q_dict());
    vimg_q_put(d, "a\"b", vimg_q_int(1));
    assert_json(d, "{\n    \"a\\\"b\": 1\n}");
    release(d);
}

/*
 * qemu decodes with mod_utf8_codepoint(): a broken multi-byte sequence is
 * ONE replacement character covering the bytes it consumed, "\xC0\x80" is
 * NUL (modified UTF-8), and noncharacters (U+FDD0..U+FDEF, U+xxFFFE/F),
 * surrogates and code points above U+10FFFF become U+FFFD.  All of these
 * were printed by the real qemu-img 7.2 for files with such names.
 */
static void test_qobj_json_escape_invalid_sequences_as_qemu(void **state)
{
    static const struct {
        const char *in, *json;
    } cases[] = {
        /* truncated 3-byte sequence followed by ASCII */
        { "t\xe2\x82X", "\"t\\uFFFDX\"" },
        /* modified UTF-8 NUL */
        { "o\xc0\x80z", "\"o\\u0000z\"" },
        /* noncharacters */
        { "n\xef\xbf\xbe.", "\"n\\uFFFD.\"" },
        { "f\xef\xb7\x90.", "\"f\\uFFFD.\"" },
        { "h\xf0\x9f\xbf\xbf.", "\"h\\uFFFD.\"" },
        /* an encoded surrogate */
        { "s\xed\xa0\x80.", "\"s\\uFFFD.\"" },
        /* beyond U+10FFFF */
        { "b\xf4\x90\x80\x80.", "\"b\\uFFFD.\"" },
        /* a 5-byte form */
        { "x\xf8\x88\x80\x80\x80.", "\"x\\uFFFD.\"" },
    };
    int bad = 0;

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct vimg_qobj *o = vimg_q_str(cases[i].in);
        char *got;
        assert_non_null(o);
        got = vimg_q_to_json(o);
        vimg_q_free(o);
        assert_non_null(got);
        if (strcmp(got, cases[i].json)) {
            print_error("case %zu: got %s, qemu prints %s\n", i, got, cases[i].json);
            bad++;
        }
        free(got);
    }
    assert_int_equal(bad, 0);
}

/* ---- the human dump ------------------------------------------------------- */

static void test_qobj_human_format(void **state)
{
    struct vimg_qobj *d = track(vimg_q_dict());
    struct vimg_qobj *inner = vimg_q_dict();
    struct vimg_qobj *l = vimg_q_list();
    struct vimg_qobj *ld = vimg_q_dict();

    /* single keys, so the hash order does not matter inside the nests */
    vimg_q_put(inner, "cipher-alg", vimg_q_str("aes-256"));
    vimg_q_put(ld, "key-offset", vimg_q_int(4096));
    vimg_q_append(l, vimg_q_str("plain \"string\"\n"));
    vimg_q_append(l, ld);
    vimg_q_append(l, vimg_q_list());
    vimg_q_put(d, "encrypt", inner);
    assert_human(d, 0, "encrypt:\n    cipher alg: aes-256\n");
    assert_human(d, 2, "        encrypt:\n            cipher alg: aes-256\n");

    release(d);
    d = track(vimg_q_dict());
    vimg_q_put(d, "bit-maps", l);
    /* strings are printed raw, lists count from [0], dicts indent 4 */
    assert_human(d, 1,
                 "    bit maps:\n"
                 "        [0]: plain \"string\"\n\n"
                 "        [1]:\n"
                 "            key offset: 4096\n"
                 "        [2]:\n");
    release(d);

    d = track(vimg_q_dict());
    vimg_q_put(d, "a-b-c", vimg_q_int(-5));
    vimg_q_put(d, "u", vimg_q_uint(UINT64_MAX));
    char *s = vimg_q_to_human(d, 0);
    assert_non_null(s);
    assert_non_null(strstr(s, "a b c: -5\n"));
    assert_non_null(strstr(s, "u: 18446744073709551615\n"));
    free(s);
    release(d);

    /* an empty dict prints nothing at all */
    d = track(vimg_q_dict());
    assert_human(d, 1, "");
    release(d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_qobj_raw_info_json_byte_exact, teardown),
        cmocka_unit_test_teardown(test_qobj_qcow2_specific_json_and_human, teardown),
        cmocka_unit_test_teardown(test_qobj_qcow2_info_nested_json, teardown),
        cmocka_unit_test_teardown(test_qobj_qcow2_all_keys_order, teardown),
        cmocka_unit_test_teardown(test_qobj_measure_key_order, teardown),
        cmocka_unit_test_teardown(test_qobj_check_key_order, teardown),
        cmocka_unit_test_teardown(test_qobj_same_bucket_newest_first, teardown),
        cmocka_unit_test_teardown(test_qobj_hash_matches_qemu_tdb_hash, teardown),
        cmocka_unit_test_teardown(test_qobj_scalars_json, teardown),
        cmocka_unit_test_teardown(test_qobj_empty_containers, teardown),
        cmocka_unit_test_teardown(test_qobj_list_of_scalars, teardown),
        cmocka_unit_test_teardown(test_qobj_get_and_getters, teardown),
        cmocka_unit_test_teardown(test_qobj_json_escape_basic, teardown),
        cmocka_unit_test_teardown(test_qobj_json_escape_in_keys, teardown),
        cmocka_unit_test_teardown(test_qobj_json_escape_invalid_sequences_as_qemu, teardown),
        cmocka_unit_test_teardown(test_qobj_human_format, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

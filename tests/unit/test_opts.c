/*
 * src/core/opts.c: qemu's "-o key=value,..." lists and their checks against
 * typed option tables.  Expected behaviour and messages were checked with
 * `qemu-img create -f raw -o ... z.img 1M` of qemu-img 7.2.
 */
#include "config.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <setjmp.h>
#include <cmocka.h>

#include "core/image.h"
#include "core/opts.h"

static const char size_msg[] =
    "Parameter 'size' expects a non-negative number below 2^64\n"
    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
    "and exabytes, respectively.";

static int setup(void **state)
{
    struct vimg_opts *o = vimg_opts_new();
    if (!o) {
        return -1;
    }
    *state = o;
    return 0;
}

static int teardown(void **state)
{
    vimg_opts_free(*state);
    return 0;
}

static const struct vimg_opt_desc *raw_table(void)
{
    const struct vimg_driver *raw = vimg_internal_find_driver("raw");
    assert_non_null(raw);
    return vimg_internal_create_opts(raw);
}

/* Parse text into the fixture's list, expecting success. */
static struct vimg_opts *parse(void **state, const char *text)
{
    struct vimg_opts *o = *state;
    struct vimg_error err = { 0 };
    assert_int_equal(vimg_opts_parse(o, text, &err), 0);
    assert_int_equal(err.code, 0);
    return o;
}

static void test_opts_parse_pairs(void **state)
{
    struct vimg_opts *o = parse(state, "a=b,c=d");
    assert_int_equal(o->n, 2);
    assert_string_equal(o->keys[0], "a");
    assert_string_equal(o->keys[1], "c");
    assert_string_equal(vimg_opts_get(o, "a"), "b");
    assert_string_equal(vimg_opts_get(o, "c"), "d");
    assert_null(vimg_opts_get(o, "b"));
    assert_null(vimg_opts_get(NULL, "a"));
}

static void test_opts_parse_comma_escape(void **state)
{
    struct vimg_opts *o = parse(state, "backing_file=a,,b,size=1M");
    assert_int_equal(o->n, 2);
    assert_string_equal(vimg_opts_get(o, "backing_file"), "a,b");
    assert_string_equal(vimg_opts_get(o, "size"), "1M");

    /* ",,,," is two commas; a value may end with an escaped comma */
    o = parse(state, "x=,,,,y,z=,,");
    assert_string_equal(vimg_opts_get(o, "x"), ",,y");
    assert_string_equal(vimg_opts_get(o, "z"), ",");
}

static void test_opts_parse_value_keeps_equals(void **state)
{
    struct vimg_opts *o = parse(state, "preallocation=fu=ll,empty=");
    assert_string_equal(vimg_opts_get(o, "preallocation"), "fu=ll");
    assert_string_equal(vimg_opts_get(o, "empty"), "");
}

static void test_opts_parse_repeated_key_last_wins(void **state)
{
    struct vimg_opts *o = parse(state, "preallocation=off,size=1M,preallocation=full");
    assert_int_equal(o->n, 2);
    assert_string_equal(vimg_opts_get(o, "preallocation"), "full");
    /* the key keeps its first place */
    assert_string_equal(o->keys[0], "preallocation");
    assert_string_equal(o->keys[1], "size");

    /* a second parse into the same list replaces and appends */
    o = parse(state, "size=2M,nocow=on");
    assert_int_equal(o->n, 3);
    assert_string_equal(vimg_opts_get(o, "size"), "2M");
    assert_string_equal(o->keys[2], "nocow");
}

/*
 * A bare name is a flag: "foo" is foo=on, and "nofoo" is foo=off.  So a bare
 * "nocow" is cow=off, exactly as in qemu, which then fails with
 * "Invalid parameter 'cow'" (checked with qemu-img 7.2).
 */
static void test_opts_parse_bare_flags(void **state)
{
    struct vimg_opts *o = parse(state, "nocow");
    struct vimg_error err = { 0 };

    assert_int_equal(o->n, 1);
    assert_string_equal(vimg_opts_get(o, "cow"), "off");
    assert_null(vimg_opts_get(o, "nocow"));
    assert_int_equal(vimg_internal_opts_validate(o, raw_table(), &err), -EINVAL);
    assert_string_equal(err.msg, "Invalid parameter 'cow'");

    o = parse(state, "foo,help,?,nohelp");
    assert_string_equal(vimg_opts_get(o, "foo"), "on");
    /* "help" first on, then nohelp turns it off */
    assert_string_equal(vimg_opts_get(o, "help"), "off");
    assert_string_equal(vimg_opts_get(o, "?"), "on");
}

static void test_opts_parse_empty_and_trailing(void **state)
{
    struct vimg_opts *o = parse(state, "");
    assert_int_equal(o->n, 0);
    o = parse(state, "a=b,");
    assert_int_equal(o->n, 1);
    assert_string_equal(vimg_opts_get(o, "a"), "b");
}

/* An empty name parses; validation then reports it in list order, so that
 * "a,,b=c" fails on 'a' first as in qemu. */
static void test_opts_parse_empty_name_fails(void **state)
{
    struct vimg_error err = { 0 };
    static const struct vimg_opt_desc table[] = {
        { "size", VIMG_OPT_SIZE, "Virtual disk size", NULL },
        { NULL },
    };
    assert_int_equal(vimg_opts_parse(*state, "=x", &err), 0);
    assert_int_equal(vimg_internal_opts_validate(*state, table, &err), -EINVAL);
    assert_int_equal(err.code, EINVAL);
    assert_string_equal(err.msg, "Invalid parameter ''");
}

/* qemu takes a name up to the first '=' or ',': ",," is no escape inside a
 * name.  `qemu-img create -o a,,b=c` says "Invalid parameter 'a'". */
static void test_opts_parse_name_has_no_comma_escape(void **state)
{
    struct vimg_opts *o = *state;
    struct vimg_error err = { 0 };

    vimg_opts_parse(o, "a,,b=c", &err);
    assert_null(vimg_opts_get(o, "a,b"));
    assert_string_equal(vimg_opts_get(o, "a"), "on");
}

static void test_opts_set_get_unset(void **state)
{
    struct vimg_opts *o = *state;

    assert_int_equal(vimg_opts_set(o, "k1", "v1"), 0);
    assert_int_equal(vimg_opts_set(o, "k2", "v2"), 0);
    assert_int_equal(vimg_opts_set(o, "k1", "v3"), 0);
    assert_int_equal(o->n, 2);
    assert_string_equal(vimg_opts_get(o, "k1"), "v3");
    assert_int_equal(vimg_opts_unset(o, "k1"), 0);
    assert_null(vimg_opts_get(o, "k1"));
    assert_string_equal(vimg_opts_get(o, "k2"), "v2");
    assert_int_equal(o->n, 1);
    assert_int_equal(vimg_opts_unset(o, "k1"), -ENOENT);
    /* grow past the first allocation */
    for (int i = 0; i < 40; i++) {
        char k[8];
        snprintf(k, sizeof(k), "x%d", i);
        assert_int_equal(vimg_opts_set(o, k, k), 0);
    }
    assert_int_equal(o->n, 41);
    assert_string_equal(vimg_opts_get(o, "x39"), "x39");
    assert_string_equal(vimg_opts_get(o, "k2"), "v2");
}

static void test_opts_wants_help(void **state)
{
    assert_true(vimg_internal_opts_wants_help("help"));
    assert_true(vimg_internal_opts_wants_help("?"));
    assert_true(vimg_internal_opts_wants_help("size=1M,help"));
    assert_true(vimg_internal_opts_wants_help("x,?"));
    assert_true(vimg_internal_opts_wants_help("help,size=1M"));
    assert_false(vimg_internal_opts_wants_help(""));
    assert_false(vimg_internal_opts_wants_help("size=1M"));
    assert_false(vimg_internal_opts_wants_help("helpme"));
    assert_false(vimg_internal_opts_wants_help("size=help"));
    assert_false(vimg_internal_opts_wants_help("help=on"));
    assert_false(vimg_internal_opts_wants_help("nohelp"));
}

/* qemu's has_help_option() splits with ",," escaping: "foo=a,,help" is the
 * single item foo="a,help", so `qemu-img create -o foo=a,,help` reports
 * "Invalid parameter 'foo'" instead of printing the help. */
static void test_opts_wants_help_honours_comma_escape(void **state)
{
    assert_false(vimg_internal_opts_wants_help("foo=a,,help"));
    assert_false(vimg_internal_opts_wants_help("backing_file=x,,?"));
    assert_true(vimg_internal_opts_wants_help("backing_file=x,,y,help"));
}

static void test_opts_validate_ok(void **state)
{
    struct vimg_opts *o = parse(state, "size=1.5M,nocow=off,preallocation=falloc,"
                                       "extent_size_hint=0");
    struct vimg_error err = { 0 };
    assert_int_equal(vimg_internal_opts_validate(o, raw_table(), &err), 0);
    assert_int_equal(err.code, 0);
    assert_string_equal(err.msg, "");
    /* strings are not checked here: the driver reports bad values */
    o = parse(state, "preallocation=bogus");
    assert_int_equal(vimg_internal_opts_validate(o, raw_table(), &err), 0);
}

static void test_opts_validate_unknown(void **state)
{
    struct vimg_opts *o = parse(state, "size=1M,foo=1");
    struct vimg_error err = { 0 };
    assert_int_equal(vimg_internal_opts_validate(o, raw_table(), &err), -EINVAL);
    assert_int_equal(err.code, EINVAL);
    assert_string_equal(err.msg, "Invalid parameter 'foo'");
}

static void test_opts_validate_first_error_wins(void **state)
{
    struct vimg_opts *o = parse(state, "nocow=maybe,foo=1");
    struct vimg_error err = { 0 };
    assert_int_equal(vimg_internal_opts_validate(o, raw_table(), &err), -EINVAL);
    assert_string_equal(err.msg, "Parameter 'nocow' expects 'on' or 'off'");
    /* a second failure does not overwrite the first message */
    vimg_opts_free(o);
    *state = o = vimg_opts_new();
    assert_non_null(o);
    assert_int_equal(vimg_opts_parse(o, "foo=1", NULL), 0);
    assert_int_equal(vimg_internal_opts_validate(o, raw_table(), &err), -EINVAL);
    assert_string_equal(err.msg, "Parameter 'nocow' expects 'on' or 'off'");
}

static void test_opts_validate_bool(void **state)
{
    static const char *const bad[] = { "ON", "1", "", "maybe", "on,x" };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct vimg_opts *o = *state;
        struct vimg_error err = { 0 };
        assert_int_equal(vimg_opts_set(o, "nocow", bad[i]), 0);
        assert_int_equal(vimg_internal_opts_validate(o, raw_table(), &err), -EINVAL);
        assert_int_equal(err.code, EINVAL);
        assert_string_equal(err.msg, "Parameter 'nocow' expects 'on' or 'off'");
    }
    struct vimg_error err = { 0 };
    struct vimg_opts *o = parse(state, "nocow=on");
    assert_int_equal(vimg_internal_opts_validate(o, raw_table(), &err), 0);
    o = parse(state, "nocow=off");
    assert_int_equal(vimg_internal_opts_validate(o, raw_table(), &err), 0);
}

/* qemu's qapi_bool_parse() also takes yes/no, true/false and y/n:
 * `qemu-img create -f raw -o nocow=yes` succeeds. */
static void test_opts_bool_accepts_qemu_synonyms(void **state)
{
    static const struct {
        const char *v;
        bool val;
    } cases[] = {
        { "yes", true }, { "true", true }, { "y", true },
        { "no", false }, { "false", false }, { "n", false },
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct vimg_opts *o = *state;
        struct vimg_error err = { 0 };
        assert_int_equal(vimg_opts_set(o, "nocow", cases[i].v), 0);
        assert_int_equal(vimg_internal_opts_validate(o, raw_table(), &err), 0);
        assert_int_equal(vimg_internal_opt_bool(o, "nocow", !cases[i].val), cases[i].val);
    }
}

static void test_opts_validate_size(void **state)
{
    static const char *const bad[] = { "-1", "", "abc", "1.5", "1.5e3", "0x1.5",
                                       "1kB" };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct vimg_opts *o = *state;
        struct vimg_error err = { 0 };
        assert_int_equal(vimg_opts_set(o, "size", bad[i]), 0);
        assert_int_equal(vimg_internal_opts_validate(o, raw_table(), &err), -EINVAL);
        assert_int_equal(err.code, EINVAL);
        assert_true(0 == strncmp(err.msg,
                                 "Parameter 'size' expects a non-negative number below 2^64",
                                 strlen("Parameter 'size' expects a non-negative number "
                                        "below 2^64")));
        /* the whole text, as qemu-img prints it */
        assert_string_equal(err.msg, size_msg);
    }
    struct vimg_opts *o = *state;
    struct vimg_error err = { 0 };
    assert_int_equal(vimg_opts_set(o, "size", "1.5"), 0);
    assert_int_equal(vimg_opts_set(o, "extent_size_hint", "1.5"), 0);
    assert_int_equal(vimg_opts_set(o, "size", "1"), 0);
    assert_int_equal(vimg_internal_opts_validate(o, raw_table(), &err), -EINVAL);
    assert_non_null(strstr(err.msg, "Parameter 'extent_size_hint' expects"));
}

/* A size that does not fit in 64 bits has its own message in qemu
 * (parse_option_size on -ERANGE): `qemu-img create -f raw -o size=16E z.img`
 * prints "Value '16E' is out of range for parameter 'size'". */
static void test_opts_validate_size_out_of_range(void **state)
{
    static const char *const big[] = { "16E", "18446744073709551616" };
    for (size_t i = 0; i < sizeof(big) / sizeof(big[0]); i++) {
        struct vimg_opts *o = *state;
        struct vimg_error err = { 0 };
        char expected[128];
        assert_int_equal(vimg_opts_set(o, "size", big[i]), 0);
        assert_int_equal(vimg_internal_opts_validate(o, raw_table(), &err), -EINVAL);
        snprintf(expected, sizeof(expected),
                 "Value '%s' is out of range for parameter 'size'", big[i]);
        assert_string_equal(err.msg, expected);
    }
}

static const struct vimg_opt_desc number_table[] = {
    { "n", VIMG_OPT_NUMBER, "a number", NULL },
    { NULL },
};

static void test_opts_validate_number(void **state)
{
    static const char *const good[] = { "0", "42", "0x10", "010", "18446744073709551615" };
    static const char *const bad[] = { "", "x", "1k", "1 ", "1.5" };
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        struct vimg_error err = { 0 };
        assert_int_equal(vimg_opts_set(*state, "n", good[i]), 0);
        assert_int_equal(vimg_internal_opts_validate(*state, number_table, &err), 0);
    }
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct vimg_error err = { 0 };
        assert_int_equal(vimg_opts_set(*state, "n", bad[i]), 0);
        assert_int_equal(vimg_internal_opts_validate(*state, number_table, &err), -EINVAL);
        assert_string_equal(err.msg, "Parameter 'n' expects a number");
    }
}

/* qemu's parse_option_number(): qemu_strtou64 wraps "-1" (qcow2 then
 * rejects refcount_bits=-1 with its own message), and an overflow says
 * "Value '99999999999999999999' is too large for parameter 'refcount_bits'"
 * (both checked with qemu-img 7.2). */
static void test_opts_validate_number_as_qemu(void **state)
{
    struct vimg_error err = { 0 };

    assert_int_equal(vimg_opts_set(*state, "n", "99999999999999999999"), 0);
    assert_int_equal(vimg_internal_opts_validate(*state, number_table, &err), -EINVAL);
    assert_string_equal(err.msg, "Value '99999999999999999999' is too large for parameter 'n'");

    vimg_error_clear(&err);
    assert_int_equal(vimg_opts_set(*state, "n", "-1"), 0);
    assert_int_equal(vimg_internal_opts_validate(*state, number_table, &err), 0);
}

static void test_opts_raw_create_table_order(void **state)
{
    const struct vimg_opt_desc *t = raw_table();
    static const char *const names[] = { "size", "nocow", "preallocation",
                                         "extent_size_hint" };
    static const enum vimg_opt_type types[] = { VIMG_OPT_SIZE, VIMG_OPT_BOOL,
                                                VIMG_OPT_STRING, VIMG_OPT_SIZE };
    size_t n = 0;

    for (; t[n].name; n++) {
        assert_true(n < 4);
        assert_string_equal(t[n].name, names[n]);
        assert_int_equal(t[n].type, types[n]);
    }
    assert_int_equal(n, 4);
    assert_string_equal(t[1].help, "Turn off copy-on-write (valid only on btrfs)");
    assert_string_equal(t[2].help, "Preallocation mode (allowed values: off, falloc, full)");
    assert_string_equal(t[3].help, "Extent size hint for the image file, 0 to disable");
    assert_string_equal(t[0].help, "Virtual disk size");
    /* cached: the same table every time */
    assert_ptr_equal(raw_table(), t);
    assert_ptr_equal(vimg_internal_opt_find(t, "nocow"), &t[1]);
    assert_null(vimg_internal_opt_find(t, "backing_file"));
    assert_null(vimg_internal_opt_find(NULL, "size"));
}

static void test_opts_typed_getters(void **state)
{
    struct vimg_opts *o = parse(state, "size=1.5M,nocow=on,preallocation=full");

    assert_int_equal(vimg_internal_opt_size(o, "size", 7), 1572864);
    assert_int_equal(vimg_internal_opt_size(o, "extent_size_hint", 7), 7);
    assert_true(vimg_internal_opt_bool(o, "nocow", false));
    assert_false(vimg_internal_opt_bool(o, "missing", false));
    assert_true(vimg_internal_opt_bool(o, "missing", true));
    assert_string_equal(vimg_internal_opt_str(o, "preallocation", "off"), "full");
    assert_string_equal(vimg_internal_opt_str(o, "missing", "dflt"), "dflt");
    o = parse(state, "nocow=off");
    assert_false(vimg_internal_opt_bool(o, "nocow", true));
}

#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)

int main(void)
{
    const struct CMUnitTest tests[] = {
        T(test_opts_parse_pairs),
        T(test_opts_parse_comma_escape),
        T(test_opts_parse_value_keeps_equals),
        T(test_opts_parse_repeated_key_last_wins),
        T(test_opts_parse_bare_flags),
        T(test_opts_parse_empty_and_trailing),
        T(test_opts_parse_empty_name_fails),
        T(test_opts_parse_name_has_no_comma_escape),
        T(test_opts_set_get_unset),
        T(test_opts_wants_help),
        T(test_opts_wants_help_honours_comma_escape),
        T(test_opts_validate_ok),
        T(test_opts_validate_unknown),
        T(test_opts_validate_first_error_wins),
        T(test_opts_validate_bool),
        T(test_opts_bool_accepts_qemu_synonyms),
        T(test_opts_validate_size),
        T(test_opts_validate_size_out_of_range),
        T(test_opts_validate_number),
        T(test_opts_validate_number_as_qemu),
        T(test_opts_raw_create_table_order),
        T(test_opts_typed_getters),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}

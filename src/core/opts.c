#include "config.h"

#include <inttypes.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "core/opts.h"
#include "util/util.h"

const struct vimg_opt_desc vimg_internal_file_create_opts[] = {
    { "size", VIMG_OPT_SIZE, "Virtual disk size", NULL },
    { "nocow", VIMG_OPT_BOOL, "Turn off copy-on-write (valid only on btrfs)", NULL },
    { "preallocation", VIMG_OPT_STRING,
      "Preallocation mode (allowed values: off, falloc, full)", NULL },
    { "extent_size_hint", VIMG_OPT_SIZE,
      "Extent size hint for the image file, 0 to disable", NULL },
    { NULL },
};

struct vimg_opts *vimg_opts_new(void)
{
    return calloc(1, sizeof(struct vimg_opts));
}

void vimg_opts_free(struct vimg_opts *opts)
{
    if (!opts) {
        return;
    }
    for (size_t i = 0; i < opts->n; i++) {
        free(opts->keys[i]);
        free(opts->vals[i]);
    }
    free(opts->keys);
    free(opts->vals);
    free(opts);
}

static ssize_t opts_index(const struct vimg_opts *opts, const char *key)
{
    for (size_t i = 0; i < opts->n; i++) {
        if (0 == strcmp(opts->keys[i], key)) {
            return (ssize_t)i;
        }
    }
    return -1;
}

int vimg_opts_unset(struct vimg_opts *opts, const char *key)
{
    ssize_t i = opts_index(opts, key);
    if (i < 0) {
        return -ENOENT;
    }
    free(opts->keys[i]);
    free(opts->vals[i]);
    memmove(&opts->keys[i], &opts->keys[i + 1], (opts->n - i - 1) * sizeof(char *));
    memmove(&opts->vals[i], &opts->vals[i + 1], (opts->n - i - 1) * sizeof(char *));
    opts->n--;
    return 0;
}

int vimg_opts_set(struct vimg_opts *opts, const char *key, const char *value)
{
    char *v = strdup(value);
    ssize_t i = opts_index(opts, key);

    if (!v) {
        return -ENOMEM;
    }
    if (i >= 0) {
        free(opts->vals[i]);
        opts->vals[i] = v;
        return 0;
    }
    if (opts->n == opts->cap) {
        size_t cap = opts->cap ? opts->cap * 2 : 8;
        char **k = realloc(opts->keys, cap * sizeof(char *));
        if (!k) {
            free(v);
            return -ENOMEM;
        }
        opts->keys = k;
        char **vv = realloc(opts->vals, cap * sizeof(char *));
        if (!vv) {
            free(v);
            return -ENOMEM;
        }
        opts->vals = vv;
        opts->cap = cap;
    }
    opts->keys[opts->n] = strdup(key);
    if (!opts->keys[opts->n]) {
        free(v);
        return -ENOMEM;
    }
    opts->vals[opts->n++] = v;
    return 0;
}

const char *vimg_opts_get(const struct vimg_opts *opts, const char *key)
{
    ssize_t i = opts ? opts_index(opts, key) : -1;
    return i >= 0 ? opts->vals[i] : NULL;
}

/* Copy one item of "a=b,,c,d" up to an unescaped delimiter; ",," is a comma. */
static const char *opts_take(const char *p, const char *delims, char *out, size_t outlen)
{
    size_t n = 0;
    while (*p) {
        if (',' == *p && ',' == p[1]) {
            p++;
        } else if (strchr(delims, *p)) {
            break;
        }
        if (n + 1 < outlen) {
            out[n++] = *p;
        }
        p++;
    }
    out[n] = '\0';
    return p;
}

int vimg_opts_parse(struct vimg_opts *opts, const char *text, struct vimg_error *err)
{
    /* room for the whole text, or for the "on"/"off" of a bare flag */
    size_t len = strlen(text) + 4;
    char *key = malloc(len);
    char *val = malloc(len);
    const char *p = text;
    int ret = 0;

    if (!key || !val) {
        ret = -ENOMEM;
        goto out;
    }
    while (*p) {
        /* a name ends at the first '=' or ',' (",," escapes only values) */
        size_t k = strcspn(p, "=,");
        memcpy(key, p, k);
        key[k] = '\0';
        p += k;
        if ('=' == *p) {
            p = opts_take(p + 1, ",", val, len);
        } else {
            /* A bare name means name=on, "noname" name=off (qemu's flags). */
            if (0 == strcmp(key, "help") || 0 == strcmp(key, "?")) {
                strcpy(val, "on");
            } else if (0 == strncmp(key, "no", 2)) {
                memmove(key, key + 2, strlen(key + 2) + 1);
                strcpy(val, "off");
            } else {
                strcpy(val, "on");
            }
        }
        if (',' == *p) {
            p++;
        }
        /* An empty name is kept: validation reports it in its turn, as
         * qemu reports the first bad item of the list. */
        ret = vimg_opts_set(opts, key, val);
        if (ret < 0) {
            vimg_error_set(err, -ret, "out of memory");
            goto out;
        }
    }
out:
    free(key);
    free(val);
    return ret;
}

bool vimg_internal_opts_wants_help(const char *text)
{
    size_t len = strlen(text) + 1;
    char *item = malloc(len);
    bool found = false;

    for (const char *p = text; item && *p;) {
        p = opts_take(p, ",", item, len);
        if (0 == strcmp(item, "help") || 0 == strcmp(item, "?")) {
            found = true;
        }
        if (',' == *p) {
            p++;
        }
    }
    free(item);
    return found;
}

const struct vimg_opt_desc *vimg_internal_opt_find(const struct vimg_opt_desc *table,
                                                   const char *name)
{
    for (; table && table->name; table++) {
        if (0 == strcmp(table->name, name)) {
            return table;
        }
    }
    return NULL;
}

#define VIMG_MAX_MERGED_OPTS 48
struct merged_cache {
    const struct vimg_driver *drv;
    struct vimg_opt_desc table[VIMG_MAX_MERGED_OPTS];
};

const struct vimg_opt_desc *vimg_internal_create_opts(const struct vimg_driver *drv)
{
    /* A handful of drivers: a small static cache, filled on first use. */
    static struct merged_cache cache[16];
    size_t i, n = 0;

    for (i = 0; i < VIMG_ARRAY_SIZE(cache) && cache[i].drv; i++) {
        if (cache[i].drv == drv) {
            return cache[i].table;
        }
    }
    if (i == VIMG_ARRAY_SIZE(cache)) {
        return drv->create_opts;
    }
    struct merged_cache *c = &cache[i];
    for (const struct vimg_opt_desc *d = drv->create_opts; d && d->name; d++) {
        if (n + 1 < VIMG_MAX_MERGED_OPTS) {
            c->table[n++] = *d;
        }
    }
    for (const struct vimg_opt_desc *d = vimg_internal_file_create_opts; d->name; d++) {
        if (!vimg_internal_opt_find(drv->create_opts, d->name) &&
            n + 1 < VIMG_MAX_MERGED_OPTS) {
            c->table[n++] = *d;
        }
    }
    c->drv = drv;
    return c->table;
}

/* qemu's boolean spellings: 1 true, 0 false, -1 neither. */
static int opt_bool_value(const char *v)
{
    static const char *const yes[] = { "on", "yes", "true", "y" };
    static const char *const no[] = { "off", "no", "false", "n" };
    for (size_t i = 0; i < VIMG_ARRAY_SIZE(yes); i++) {
        if (0 == strcmp(v, yes[i])) {
            return 1;
        }
        if (0 == strcmp(v, no[i])) {
            return 0;
        }
    }
    return -1;
}

static int opt_check_value(const struct vimg_opt_desc *d, const char *v,
                           struct vimg_error *err)
{
    uint64_t n;
    char *end;

    switch (d->type) {
    case VIMG_OPT_BOOL:
        if (opt_bool_value(v) < 0) {
            vimg_error_set(err, EINVAL, "Parameter '%s' expects 'on' or 'off'", d->name);
            return -EINVAL;
        }
        return 0;
    case VIMG_OPT_SIZE:
        if (-ERANGE == vimg_parse_size(v, 'B', &n)) {
            vimg_error_set(err, EINVAL, "Value '%s' is out of range for parameter '%s'",
                           v, d->name);
            return -EINVAL;
        }
        if (vimg_parse_size(v, 'B', &n) < 0) {
            vimg_error_set(err, EINVAL,
                           "Parameter '%s' expects a non-negative number below 2^64\n"
                           "Optional suffix k, M, G, T, P or E means kilo-, mega-, "
                           "giga-, tera-, peta-\nand exabytes, respectively.",
                           d->name);
            return -EINVAL;
        }
        return 0;
    case VIMG_OPT_NUMBER:
        /* strtoull semantics, as qemu: "-1" wraps around, overflow is an error */
        errno = 0;
        strtoull(v, &end, 0);
        if (ERANGE == errno) {
            vimg_error_set(err, EINVAL, "Value '%s' is too large for parameter '%s'", v,
                           d->name);
            return -EINVAL;
        }
        if (end == v || *end) {
            vimg_error_set(err, EINVAL, "Parameter '%s' expects a number", d->name);
            return -EINVAL;
        }
        return 0;
    case VIMG_OPT_STRING:
        return 0;
    }
    return 0;
}

int vimg_internal_opts_validate(const struct vimg_opts *opts,
                                const struct vimg_opt_desc *table,
                                struct vimg_error *err)
{
    for (size_t i = 0; i < opts->n; i++) {
        const struct vimg_opt_desc *d = vimg_internal_opt_find(table, opts->keys[i]);
        if (!d) {
            vimg_error_set(err, EINVAL, "Invalid parameter '%s'", opts->keys[i]);
            return -EINVAL;
        }
        int ret = opt_check_value(d, opts->vals[i], err);
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

uint64_t vimg_internal_opt_size(const struct vimg_opts *opts, const char *key,
                                uint64_t def)
{
    const char *v = vimg_opts_get(opts, key);
    uint64_t n;
    return v && 0 == vimg_parse_size(v, 'B', &n) ? n : def;
}

bool vimg_internal_opt_bool(const struct vimg_opts *opts, const char *key, bool def)
{
    const char *v = vimg_opts_get(opts, key);
    return v ? 1 == opt_bool_value(v) : def;
}

const char *vimg_internal_opt_str(const struct vimg_opts *opts, const char *key,
                                  const char *def)
{
    const char *v = vimg_opts_get(opts, key);
    return v ? v : def;
}


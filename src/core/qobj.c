#include "config.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/qobj.h"

#define QDICT_BUCKETS 512

struct vimg_qobj {
    enum vimg_qtype type;
    union {
        int64_t i;
        uint64_t u;
        bool b;
        char *s;
    } v;
    /* dict and list members, in insertion order */
    size_t n, cap;
    char **keys;
    struct vimg_qobj **items;
};

static struct vimg_qobj *q_new(enum vimg_qtype t)
{
    struct vimg_qobj *o = calloc(1, sizeof(*o));
    if (o) {
        o->type = t;
    }
    return o;
}

struct vimg_qobj *vimg_q_int(int64_t v)
{
    struct vimg_qobj *o = q_new(VIMG_Q_INT);
    if (o) {
        o->v.i = v;
    }
    return o;
}

struct vimg_qobj *vimg_q_uint(uint64_t v)
{
    struct vimg_qobj *o = q_new(VIMG_Q_UINT);
    if (o) {
        o->v.u = v;
    }
    return o;
}

struct vimg_qobj *vimg_q_bool(bool v)
{
    struct vimg_qobj *o = q_new(VIMG_Q_BOOL);
    if (o) {
        o->v.b = v;
    }
    return o;
}

struct vimg_qobj *vimg_q_str(const char *s)
{
    struct vimg_qobj *o = q_new(VIMG_Q_STR);
    if (o) {
        o->v.s = strdup(s ? s : "");
        if (!o->v.s) {
            free(o);
            return NULL;
        }
    }
    return o;
}

struct vimg_qobj *vimg_q_dict(void)
{
    return q_new(VIMG_Q_DICT);
}

struct vimg_qobj *vimg_q_list(void)
{
    return q_new(VIMG_Q_LIST);
}

void vimg_q_free(struct vimg_qobj *o)
{
    if (!o) {
        return;
    }
    for (size_t i = 0; i < o->n; i++) {
        if (o->keys) {
            free(o->keys[i]);
        }
        vimg_q_free(o->items[i]);
    }
    free(o->keys);
    free(o->items);
    if (VIMG_Q_STR == o->type) {
        free(o->v.s);
    }
    free(o);
}

static bool q_grow(struct vimg_qobj *o)
{
    if (o->n < o->cap) {
        return true;
    }
    size_t cap = o->cap ? o->cap * 2 : 8;
    struct vimg_qobj **items = realloc(o->items, cap * sizeof(*items));
    if (!items) {
        return false;
    }
    o->items = items;
    if (VIMG_Q_DICT == o->type) {
        char **keys = realloc(o->keys, cap * sizeof(*keys));
        if (!keys) {
            return false;
        }
        o->keys = keys;
    }
    o->cap = cap;
    return true;
}

void vimg_q_put(struct vimg_qobj *dict, const char *key, struct vimg_qobj *val)
{
    if (!val) {
        return;
    }
    for (size_t i = 0; i < dict->n; i++) {
        if (0 == strcmp(dict->keys[i], key)) {
            vimg_q_free(dict->items[i]);
            dict->items[i] = val;
            return;
        }
    }
    char *k = strdup(key);
    if (!k || !q_grow(dict)) {
        free(k);
        vimg_q_free(val);
        return;
    }
    dict->keys[dict->n] = k;
    dict->items[dict->n++] = val;
}

void vimg_q_append(struct vimg_qobj *list, struct vimg_qobj *val)
{
    if (!val) {
        return;
    }
    if (!q_grow(list)) {
        vimg_q_free(val);
        return;
    }
    list->items[list->n++] = val;
}

enum vimg_qtype vimg_q_type(const struct vimg_qobj *o)
{
    return o->type;
}

struct vimg_qobj *vimg_q_get(const struct vimg_qobj *dict, const char *key)
{
    for (size_t i = 0; dict && i < dict->n; i++) {
        if (0 == strcmp(dict->keys[i], key)) {
            return dict->items[i];
        }
    }
    return NULL;
}

size_t vimg_q_count(const struct vimg_qobj *o)
{
    return o ? o->n : 0;
}

struct vimg_qobj *vimg_q_index(const struct vimg_qobj *list, size_t i)
{
    return list && i < list->n ? list->items[i] : NULL;
}

int64_t vimg_q_get_int(const struct vimg_qobj *o)
{
    if (!o) {
        return 0;
    }
    return VIMG_Q_INT == o->type ? o->v.i : VIMG_Q_UINT == o->type ? (int64_t)o->v.u : 0;
}

const char *vimg_q_get_str(const struct vimg_qobj *o)
{
    return o && VIMG_Q_STR == o->type ? o->v.s : "";
}

bool vimg_q_get_bool(const struct vimg_qobj *o)
{
    return o && VIMG_Q_BOOL == o->type && o->v.b;
}

unsigned vimg_q_hash(const char *key)
{
    uint32_t v = 0x238F13AFu * (uint32_t)strlen(key);
    for (uint32_t i = 0; key[i]; i++) {
        v += (uint32_t)(unsigned char)key[i] << ((i * 5) % 24);
    }
    return 1103515243u * v + 12345u;
}

/* Member order of a dict as qemu iterates it: ascending bucket, and inside a
 * bucket the newest key first. */
static size_t *q_order(const struct vimg_qobj *d)
{
    size_t *idx = malloc((d->n ? d->n : 1) * sizeof(size_t));
    size_t k = 0;
    if (!idx) {
        return NULL;
    }
    for (unsigned b = 0; b < QDICT_BUCKETS; b++) {
        for (size_t i = d->n; i-- > 0;) {
            if (vimg_q_hash(d->keys[i]) % QDICT_BUCKETS == b) {
                idx[k++] = i;
            }
        }
    }
    return idx;
}

struct sbuf {
    char *p;
    size_t len, cap;
};

static void sb_put(struct sbuf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) {
            cap *= 2;
        }
        char *p = realloc(b->p, cap);
        if (!p) {
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_str(struct sbuf *b, const char *s)
{
    sb_put(b, s, strlen(s));
}

static void sb_printf(struct sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(struct sbuf *b, const char *fmt, ...)
{
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    sb_put(b, tmp, n < (int)sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

static void sb_indent(struct sbuf *b, int level)
{
    for (int i = 0; i < level; i++) {
        sb_str(b, "    ");
    }
}

/* Decode one sequence of qemu's "modified UTF-8" (\xC0\x80 is NUL).
 * Returns the code point or -1, and sets *used: an invalid sequence
 * consumes the bytes read up to the point it went wrong, so it turns into a
 * single U+FFFD as in qemu's output. */
static int32_t utf8_decode(const unsigned char *s, size_t *used)
{
    static const uint32_t min_for_len[7] = { 0, 0, 0x80, 0x800, 0x10000, 0x200000,
                                             0x4000000 };
    unsigned lead = s[0];
    unsigned len = 0;
    uint32_t cp;

    *used = 1;
    if (lead < 0x80) {
        return (int32_t)lead;
    }
    if (lead >= 0xFE || !(lead & 0x40)) {
        return -1;      /* 0xFE/0xFF, or a stray continuation byte */
    }
    while (lead & (0x80u >> len)) {
        len++;
    }
    cp = lead & ((0x80u >> len) - 1);
    for (unsigned i = 1; i < len; i++) {
        if (0x80 != (s[i] & 0xC0)) {
            *used = i;
            return -1;
        }
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    *used = len;
    if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF) ||
        (cp >= 0xFDD0 && cp <= 0xFDEF) || 0xFFFE == (cp & 0xFFFE)) {
        return -1;
    }
    if (cp < min_for_len[len] && !(0 == cp && 2 == len)) {
        return -1;      /* overlong */
    }
    return (int32_t)cp;
}

static void sb_json_string(struct sbuf *b, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    sb_str(b, "\"");
    while (*p) {
        size_t n;
        int32_t dec = utf8_decode(p, &n);
        uint32_t cp = dec < 0 ? 0xFFFD : (uint32_t)dec;
        p += n;
        switch (cp) {
        case '"': sb_str(b, "\\\""); continue;
        case '\\': sb_str(b, "\\\\"); continue;
        case '\b': sb_str(b, "\\b"); continue;
        case '\f': sb_str(b, "\\f"); continue;
        case '\n': sb_str(b, "\\n"); continue;
        case '\r': sb_str(b, "\\r"); continue;
        case '\t': sb_str(b, "\\t"); continue;
        }
        if (cp >= 0x20 && cp < 0x7F) {
            char c = (char)cp;
            sb_put(b, &c, 1);
        } else if (cp >= 0x10000) {
            cp -= 0x10000;
            sb_printf(b, "\\u%04X\\u%04X", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
        } else {
            sb_printf(b, "\\u%04X", cp);
        }
    }
    sb_str(b, "\"");
}

static void q_json(struct sbuf *b, const struct vimg_qobj *o, int level)
{
    switch (o->type) {
    case VIMG_Q_INT:
        sb_printf(b, "%" PRId64, o->v.i);
        break;
    case VIMG_Q_UINT:
        sb_printf(b, "%" PRIu64, o->v.u);
        break;
    case VIMG_Q_BOOL:
        sb_str(b, o->v.b ? "true" : "false");
        break;
    case VIMG_Q_NULL:
        sb_str(b, "null");
        break;
    case VIMG_Q_STR:
        sb_json_string(b, o->v.s);
        break;
    case VIMG_Q_DICT: {
        size_t *idx = q_order(o);
        sb_str(b, "{");
        for (size_t k = 0; idx && k < o->n; k++) {
            sb_str(b, k ? ",\n" : "\n");
            sb_indent(b, level + 1);
            sb_json_string(b, o->keys[idx[k]]);
            sb_str(b, ": ");
            q_json(b, o->items[idx[k]], level + 1);
        }
        sb_str(b, "\n");
        sb_indent(b, level);
        sb_str(b, "}");
        free(idx);
        break;
    }
    case VIMG_Q_LIST:
        sb_str(b, "[");
        for (size_t k = 0; k < o->n; k++) {
            sb_str(b, k ? ",\n" : "\n");
            sb_indent(b, level + 1);
            q_json(b, o->items[k], level + 1);
        }
        sb_str(b, "\n");
        sb_indent(b, level);
        sb_str(b, "]");
        break;
    }
}

char *vimg_q_to_json(const struct vimg_qobj *o)
{
    struct sbuf b = { 0 };
    q_json(&b, o, 0);
    return b.p;
}

static void q_human_scalar(struct sbuf *b, const struct vimg_qobj *o)
{
    switch (o->type) {
    case VIMG_Q_INT: sb_printf(b, "%" PRId64, o->v.i); break;
    case VIMG_Q_UINT: sb_printf(b, "%" PRIu64, o->v.u); break;
    case VIMG_Q_BOOL: sb_str(b, o->v.b ? "true" : "false"); break;
    case VIMG_Q_STR: sb_str(b, o->v.s); break;
    case VIMG_Q_NULL: sb_str(b, "null"); break;
    default: break;
    }
}

static void q_human(struct sbuf *b, const struct vimg_qobj *o, int indent);

static void q_human_member(struct sbuf *b, const char *key, const struct vimg_qobj *v,
                           int indent)
{
    bool composite = VIMG_Q_DICT == v->type || VIMG_Q_LIST == v->type;
    sb_indent(b, indent);
    for (const char *c = key; *c; c++) {
        char ch = '-' == *c ? ' ' : *c;
        sb_put(b, &ch, 1);
    }
    if (composite) {
        sb_str(b, ":\n");
        q_human(b, v, indent + 1);
    } else {
        sb_str(b, ": ");
        q_human_scalar(b, v);
        sb_str(b, "\n");
    }
}

static void q_human(struct sbuf *b, const struct vimg_qobj *o, int indent)
{
    if (VIMG_Q_DICT == o->type) {
        size_t *idx = q_order(o);
        for (size_t k = 0; idx && k < o->n; k++) {
            q_human_member(b, o->keys[idx[k]], o->items[idx[k]], indent);
        }
        free(idx);
    } else if (VIMG_Q_LIST == o->type) {
        for (size_t k = 0; k < o->n; k++) {
            char key[32];
            snprintf(key, sizeof(key), "[%zu]", k);
            q_human_member(b, key, o->items[k], indent);
        }
    }
}

char *vimg_q_to_human(const struct vimg_qobj *o, int indent)
{
    struct sbuf b = { 0 };
    sb_str(&b, "");
    q_human(&b, o, indent);
    return b.p;
}

/*
 * The vmdk text descriptor, parsed the way qemu 7.2 parses it (substring
 * look-ups, fixed field widths) so that the same files open and fail with
 * the same messages, but bounded: lines are scanned one at a time, never
 * across a newline, and the number of lines and extents is capped.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/vmdk/vmdk.h"
#include "util/util.h"

int vmdk_probe_text(const uint8_t *buf, size_t len)
{
    const char *p = (const char *)buf, *end = p + len;
    static const char *const ok[] = {
        "version=1\n", "version=2\n", "version=3\n",
        "version=1\r\n", "version=2\r\n", "version=3\r\n",
    };

    if (len < 4) {
        return 0;
    }
    if (VMDK4_MAGIC == vimg_ld_be32(buf) || VMDK3_MAGIC == vimg_ld_be32(buf)) {
        return 100;
    }
    while (p < end) {
        if ('#' == *p) {
            while (p < end && '\n' != *p) {
                p++;
            }
            p++;
            continue;
        }
        if (' ' == *p) {
            while (p < end && ' ' == *p) {
                p++;
            }
            if (p < end && '\r' == *p) {
                p++;
            }
            if (p == end || '\n' != *p) {
                return 0;
            }
            p++;
            continue;
        }
        for (size_t i = 0; i < VIMG_ARRAY_SIZE(ok); i++) {
            size_t n = strlen(ok[i]);
            if ((size_t)(end - p) >= n && 0 == memcmp(p, ok[i], n)) {
                return 100;
            }
        }
        return 0;
    }
    return 0;
}

int vmdk_desc_cid(const char *area, bool parent, uint32_t *out)
{
    const char *key = parent ? "parentCID" : "CID";
    const char *p = strstr(area, key);
    unsigned int v;

    if (!p) {
        return -EINVAL;
    }
    /* qemu skips the key and one more character, assumed to be '=' */
    p += strlen(key);
    if (!*p) {
        return -EINVAL;
    }
    p++;
    if (1 != sscanf(p, "%x", &v)) {
        return -EINVAL;
    }
    *out = v;
    return 0;
}

int vmdk_desc_hint(const char *area, char **hint)
{
    const char *key = "parentFileNameHint";
    const char *p = strstr(area, key), *q;
    size_t n;

    *hint = NULL;
    if (!p) {
        return 0;
    }
    /* key, '=' and the opening quote, whatever they are */
    for (int i = 0; i < 20; i++) {
        if (!*p) {
            return -EINVAL;
        }
        p++;
    }
    q = strchr(p, '"');
    if (!q) {
        return -EINVAL;
    }
    n = (size_t)(q - p);
    if (n > VMDK_HINT_MAX) {
        return -EINVAL;
    }
    *hint = strndup(p, n);
    return *hint ? 0 : -ENOMEM;
}

int vmdk_desc_create_type(const char *text, char *out, size_t outlen)
{
    const char *key = "createType";
    const char *p = strstr(text, key), *end = text + strlen(text), *q;

    if (!p) {
        return -EINVAL;
    }
    p += strlen(key) + 2;
    if (p >= end) {
        return -EINVAL;
    }
    q = p;
    while (q < end && '"' != *q) {
        q++;
    }
    if (q == end || outlen < (size_t)(q - p) + 1) {
        return -EINVAL;
    }
    memcpy(out, p, (size_t)(q - p));
    out[q - p] = '\0';
    return 0;
}

static bool vmdk_type_usable(const char *t)
{
    return 0 == strcmp(t, "FLAT") || 0 == strcmp(t, "SPARSE") || 0 == strcmp(t, "VMFS") ||
           0 == strcmp(t, "VMFSSPARSE") || 0 == strcmp(t, "SESPARSE");
}

void vmdk_desc_free(struct vmdk_desc *d)
{
    free(d->extents);
    d->extents = NULL;
    d->n_extents = 0;
}

/* One line, NUL-terminated, without its LF. */
static int vmdk_desc_line(char *line, struct vmdk_desc *d, size_t *cap,
                          struct vimg_error *err)
{
    struct vmdk_desc_extent x = { .offset = -1 };
    int64_t sectors = 0, off = -1;
    int m;

    m = sscanf(line, "%10s %" SCNd64 " %10s \"%511[^\n\r\"]\" %" SCNd64, x.access,
               &sectors, x.type, x.fname, &off);
    if (m < 4 || 0 != strcmp(x.access, "RW")) {
        if (m >= 4) {
            d->n_skipped++;
        }
        return 0;
    }
    if (0 == strcmp(x.type, "FLAT")) {
        if (5 != m || off < 0) {
            goto invalid;
        }
    } else if (0 == strcmp(x.type, "VMFS")) {
        if (4 != m) {
            goto invalid;
        }
        off = 0;
    } else if (4 != m) {
        goto invalid;
    }
    if (sectors <= 0 || !vmdk_type_usable(x.type)) {
        d->n_skipped++;
        return 0;
    }
    if (d->n_extents >= VMDK_MAX_EXTENTS) {
        vimg_error_set(err, EFBIG, "descriptor names more than %u extents",
                       VMDK_MAX_EXTENTS);
        return -EFBIG;
    }
    if (d->n_extents == *cap) {
        size_t ncap = *cap ? *cap * 2 : 4;
        struct vmdk_desc_extent *n = realloc(d->extents, ncap * sizeof(*n));
        if (!n) {
            vimg_error_set(err, ENOMEM, "out of memory");
            return -ENOMEM;
        }
        d->extents = n;
        *cap = ncap;
    }
    x.sectors = sectors;
    x.offset = off;
    d->extents[d->n_extents++] = x;
    return 0;

invalid:
    vimg_error_set(err, EINVAL, "Invalid extent line: %s", line);
    return -EINVAL;
}

int vmdk_desc_parse(const char *text, struct vmdk_desc *d, struct vimg_error *err)
{
    static const char *const standalone[] = {
        "monolithicFlat", "vmfs", "vmfsSparse", "seSparse", "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    };
    size_t len = strnlen(text, VMDK_DESC_READ_MAX + 1);
    size_t cap = 0, lines = 0;
    char *copy;
    bool known = false;
    int ret = 0;

    memset(d, 0, sizeof(*d));
    if (len > VMDK_DESC_READ_MAX) {
        vimg_error_set(err, EFBIG, "descriptor is larger than %u bytes",
                       VMDK_DESC_READ_MAX);
        return -EFBIG;
    }
    if (vmdk_desc_create_type(text, d->create_type, sizeof(d->create_type)) < 0) {
        vimg_error_set(err, EINVAL, "invalid VMDK image descriptor");
        return -EINVAL;
    }
    for (size_t i = 0; i < VIMG_ARRAY_SIZE(standalone); i++) {
        known |= 0 == strcmp(d->create_type, standalone[i]);
    }
    if (!known) {
        vimg_error_set(err, ENOTSUP, "Unsupported image type '%s'", d->create_type);
        return -ENOTSUP;
    }
    copy = malloc(len + 1);
    if (!copy) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    memcpy(copy, text, len + 1);
    for (char *p = copy; *p && 0 == ret;) {
        char *nl = strchr(p, '\n');
        if (++lines > VMDK_DESC_MAX_LINES) {
            vimg_error_set(err, EFBIG, "descriptor has more than %u lines",
                           VMDK_DESC_MAX_LINES);
            ret = -EFBIG;
            break;
        }
        if (nl) {
            *nl = '\0';
        }
        ret = vmdk_desc_line(p, d, &cap, err);
        p = nl ? nl + 1 : p + strlen(p);
    }
    free(copy);
    if (ret < 0) {
        vmdk_desc_free(d);
    }
    return ret;
}

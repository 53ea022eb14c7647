#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <inttypes.h>
#include <string.h>

#include "vimg/vimg.h"

void vimg_error_set(struct vimg_error *err, int code, const char *fmt, ...)
{
    va_list ap;

    if (!err || err->code) {
        return;
    }
    err->code = code ? code : 1;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    va_end(ap);
}

void vimg_error_prefix(struct vimg_error *err, const char *fmt, ...)
{
    char prefix[512];
    char old[sizeof(err->msg)];
    char tmp[sizeof(err->msg) + sizeof(prefix)];
    va_list ap;

    if (!err || !err->code) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof(prefix), fmt, ap);
    va_end(ap);
    memcpy(old, err->msg, sizeof(old));
    snprintf(tmp, sizeof(tmp), "%s%s", prefix, old);
    snprintf(err->msg, sizeof(err->msg), "%.1023s", tmp);
}

void vimg_error_clear(struct vimg_error *err)
{
    if (err) {
        err->code = 0;
        err->msg[0] = '\0';
    }
}

const char *vimg_version(void)
{
    return VIMG_VERSION;
}

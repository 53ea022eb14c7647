/* qemu's size strings (qemu_strtosz) and human sizes (size_to_str). */
#include "config.h"

#include <ctype.h>
#include <inttypes.h>
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vimg/vimg.h"

static int size_suffix_shift(char c)
{
    switch (tolower((unsigned char)c)) {
    case 'b': return 0;
    case 'k': return 10;
    case 'm': return 20;
    case 'g': return 30;
    case 't': return 40;
    case 'p': return 50;
    case 'e': return 60;
    default: return -1;
    }
}

int vimg_parse_size(const char *s, char default_suffix, uint64_t *out)
{
    const char *p = s;
    uint64_t val = 0;
    uint64_t valf = 0;      /* fraction as 0.64 fixed point */
    unsigned __int128 total;
    bool hex = false;
    bool digits = false;
    int shift;

    while (isspace((unsigned char)*p)) {
        p++;
    }
    /* strtoull would take "-1" as a huge number; sizes are never negative. */
    if ('-' == *p) {
        return -EINVAL;
    }
    if ('+' == *p) {
        p++;
    }
    if ('0' == p[0] && ('x' == p[1] || 'X' == p[1]) && isxdigit((unsigned char)p[2])) {
        hex = true;
        p += 2;
    }
    for (;; p++) {
        unsigned d;
        if (isdigit((unsigned char)*p)) {
            d = (unsigned)(*p - '0');
        } else if (hex && isxdigit((unsigned char)*p)) {
            d = (unsigned)(tolower((unsigned char)*p) - 'a' + 10);
        } else {
            break;
        }
        digits = true;
        if (val > (UINT64_MAX - d) / (hex ? 16 : 10)) {
            return -ERANGE;
        }
        val = val * (hex ? 16 : 10) + d;
    }
    if (!digits) {
        return -EINVAL;
    }
    if ('.' == *p) {
        /* Only decimal digits may follow, and "1.k" is fine; hex takes no
         * fraction, and an exponent makes the whole input invalid. */
        double scale = 0.1, frac = 0;
        if (hex) {
            return -EINVAL;
        }
        for (p++; isdigit((unsigned char)*p); p++) {
            frac += (*p - '0') * scale;
            scale /= 10;
        }
        /* a fraction that rounds up to 1.0 would overflow the cast */
        valf = frac * 0x1p64 >= 0x1p64 ? UINT64_MAX : (uint64_t)(frac * 0x1p64);
    }
    if (*p && (shift = size_suffix_shift(*p)) >= 0) {
        p++;
    } else {
        shift = size_suffix_shift(default_suffix);
        if (shift < 0) {
            shift = 0;
        }
    }
    if (*p) {
        return -EINVAL;
    }
    if (0 == shift) {
        /* A fraction needs a unit to scale it. */
        if (valf) {
            return -EINVAL;
        }
        *out = val;
        return 0;
    }
    /* Exact 64.64 fixed-point product, rounding half a byte up. */
    total = ((unsigned __int128)val << shift)
            + (((unsigned __int128)valf << shift) >> 64)
            + ((((unsigned __int128)valf << shift) >> 63) & 1);
    if (total >> 64) {
        return -ERANGE;
    }
    *out = (uint64_t)total;
    return 0;
}

char *vimg_format_size(uint64_t val, char *buf, size_t buflen)
{
    static const char *const suffixes[] = { "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei" };
    int exp;
    int i;

    /* Choose the unit so that the integer part stays below 1000 (hence the
     * 1000/1024 correction), then print three significant digits. */
    frexp((double)val / (1000.0 / 1024.0), &exp);
    i = (exp - 1) / 10;
    if (i < 0) {
        i = 0;
    }
    if (i > 6) {
        i = 6;
    }
    snprintf(buf, buflen, "%0.3g %sB", (double)val / (double)(1ull << (i * 10)),
             suffixes[i]);
    return buf;
}

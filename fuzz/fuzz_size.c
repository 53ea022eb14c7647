/* The size parser and the human size printer. */
#include "config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vimg/vimg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);
    uint64_t v;
    char buf[64];

    if (!s) {
        return 0;
    }
    memcpy(s, data, size);
    s[size] = '\0';
    if (0 == vimg_parse_size(s, 'B', &v)) {
        vimg_format_size(v, buf, sizeof(buf));
    }
    vimg_parse_size(s, 'M', &v);
    free(s);
    return 0;
}

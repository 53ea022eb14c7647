#include "config.h"

#include <string.h>

#include "io/file.h"

bool vimg_is_zero(const void *buf, size_t len)
{
    const unsigned char *p = buf;
    size_t head = len < 16 ? len : 16;

    /* Check a short head byte by byte, then compare the buffer with itself
     * shifted by 16: if the head is zero and every byte equals the one 16
     * before it, all are zero.  memcmp is vectorised; this beats a loop. */
    for (size_t i = 0; i < head; i++) {
        if (p[i]) {
            return false;
        }
    }
    return len <= 16 || 0 == memcmp(p, p + 16, len - 16);
}

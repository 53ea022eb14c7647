#include "config.h"

#include <inttypes.h>
#include <string.h>

#include "core/image.h"

extern const struct vimg_driver vimg_driver_raw;
extern const struct vimg_driver vimg_driver_vmdk;
extern const struct vimg_driver vimg_driver_qcow2;
extern const struct vimg_driver vimg_driver_qcow;
extern const struct vimg_driver vimg_driver_cow;

/* Probing order does not matter (the best score wins); raw stays last so it
 * only wins when nothing else claims the file. */
const struct vimg_driver *const vimg_internal_drivers[] = {
    &vimg_driver_qcow2,
    &vimg_driver_qcow,
    &vimg_driver_cow,
    &vimg_driver_vmdk,
    &vimg_driver_raw,
    NULL,
};

const struct vimg_driver *vimg_internal_find_driver(const char *name)
{
    for (size_t i = 0; vimg_internal_drivers[i]; i++) {
        if (0 == strcmp(vimg_internal_drivers[i]->name, name)) {
            return vimg_internal_drivers[i];
        }
    }
    return NULL;
}

const struct vimg_driver *vimg_internal_probe(const uint8_t *buf, size_t len,
                                              const char *filename)
{
    const struct vimg_driver *best = &vimg_driver_raw;
    int best_score = 0;

    for (size_t i = 0; vimg_internal_drivers[i]; i++) {
        const struct vimg_driver *d = vimg_internal_drivers[i];
        int score = d->probe ? d->probe(buf, len, filename) : 0;
        if (score > best_score) {
            best_score = score;
            best = d;
        }
    }
    return best;
}

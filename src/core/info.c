/* qemu's ImageInfo, built as a dict so --output=json keeps qemu's key order. */
#include "config.h"

#include <inttypes.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/image.h"
#include "core/info.h"

int vimg_internal_image_info(struct vimg_image *img, struct vimg_qobj **out,
                             struct vimg_error *err)
{
    struct vimg_qobj *d = vimg_q_dict();
    struct vimg_qobj *spec = NULL;
    int64_t actual;
    int ret;

    if (!d) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    /* Insertion order matters within a hash bucket: follow qemu's. */
    vimg_q_put(d, "virtual-size", vimg_q_int((int64_t)img->size));
    vimg_q_put(d, "filename", vimg_q_str(img->filename));
    if (img->limits.cluster_size) {
        vimg_q_put(d, "cluster-size", vimg_q_int((int64_t)img->limits.cluster_size));
    }
    vimg_q_put(d, "format", vimg_q_str(img->drv->name));
    actual = vimg_allocated_size(img);
    if (actual >= 0) {
        vimg_q_put(d, "actual-size", vimg_q_int(actual));
    }
    if (img->drv->info) {
        ret = img->drv->info(img, &spec, err);
        if (ret < 0) {
            vimg_q_free(d);
            return ret;
        }
        if (spec) {
            struct vimg_qobj *fs = vimg_q_dict();
            if (fs) {
                vimg_q_put(fs, "type", vimg_q_str(img->drv->name));
                vimg_q_put(fs, "data", spec);
                vimg_q_put(d, "format-specific", fs);
            } else {
                vimg_q_free(spec);
            }
        }
    }
    if (img->backing_name && img->backing_name[0]) {
        vimg_q_put(d, "backing-filename", vimg_q_str(img->backing_name));
        if (img->full_backing_name) {
            vimg_q_put(d, "full-backing-filename", vimg_q_str(img->full_backing_name));
        } else {
            /* chain not opened (info): qemu still combines the paths */
            const char *slash = strrchr(img->filename, '/');
            char *full = NULL;
            if ('/' == img->backing_name[0] || !slash) {
                full = strdup(img->backing_name);
            } else if (asprintf(&full, "%.*s%s", (int)(slash - img->filename + 1),
                                img->filename, img->backing_name) < 0) {
                full = NULL;
            }
            if (full) {
                vimg_q_put(d, "full-backing-filename", vimg_q_str(full));
                free(full);
            }
        }
        if (img->backing_fmt) {
            vimg_q_put(d, "backing-filename-format", vimg_q_str(img->backing_fmt));
        }
    }
    {
        bool dirty = false, encrypted = false;
        struct vimg_qobj *snaps = NULL;
        if (img->drv->image_info) {
            ret = img->drv->image_info(img, &dirty, &encrypted, &snaps, err);
            if (ret < 0) {
                vimg_q_free(d);
                return ret;
            }
        }
        if (encrypted) {
            vimg_q_put(d, "encrypted", vimg_q_bool(true));
        }
        if (snaps) {
            vimg_q_put(d, "snapshots", snaps);
        }
        vimg_q_put(d, "dirty-flag", vimg_q_bool(dirty));
    }
    *out = d;
    return 0;
}

/* qcow2 measure. */
#include "config.h"

#include <errno.h>

#include "formats/qcow2/qcow2.h"

int qcow2_measure(const struct vimg_opts *opts, struct vimg_image *in,
                  struct vimg_measure *out, struct vimg_error *err)
{
    vimg_error_set(err, ENOTSUP, "not yet");
    return -ENOTSUP;
}

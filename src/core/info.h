#ifndef VIMG_CORE_INFO_H
#define VIMG_CORE_INFO_H

#include "core/qobj.h"
#include "vimg/vimg.h"

/* Build qemu's ImageInfo dict for one image (not its chain). */
int vimg_internal_image_info(struct vimg_image *img, struct vimg_qobj **out,
                             struct vimg_error *err);

#endif

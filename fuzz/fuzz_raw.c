/* The raw driver through the core on an in-memory file: probe, open, info,
 * block status over everything, reads, a write, zeroing and a resize. */
#include "config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/image.h"
#include "core/info.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct vimg_file *f;
    struct vimg_image *img;
    struct vimg_error err = { 0 };
    struct vimg_qobj *info = NULL;
    uint8_t buf[4096];

    if (vimg_file_open_mem(&f, "fuzz.img", data, size, size + 65536, true) < 0) {
        return 0;
    }
    if (vimg_internal_open_file(&img, f, NULL, VIMG_OPEN_RDWR, &err) < 0) {
        return 0;
    }
    if (0 == vimg_internal_image_info(img, &info, &err)) {
        char *s = vimg_q_to_json(info);
        free(s);
        vimg_q_free(info);
    }
    for (uint64_t off = 0; off < vimg_size(img);) {
        struct vimg_status st;
        if (vimg_block_status(img, off, vimg_size(img) - off, &st, &err) < 0) {
            break;
        }
        size_t n = st.length < sizeof(buf) ? (size_t)st.length : sizeof(buf);
        if (vimg_pread(img, buf, n, off, &err) < 0) {
            break;
        }
        off += st.length;
    }
    if (vimg_size(img) >= 1024) {
        memset(buf, 0xa5, 512);
        vimg_pwrite(img, buf, 512, 512, &err);
        vimg_write_zeroes(img, 0, 512, VIMG_ZERO_MAY_UNMAP, &err);
        vimg_pread(img, buf, 1024, 0, &err);
    }
    vimg_truncate(img, vimg_size(img) + 512, VIMG_PREALLOC_OFF, 1, &err);
    vimg_close(img);
    return 0;
}

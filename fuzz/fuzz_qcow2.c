/* The qcow2 driver through the core on an in-memory file: probe, open,
 * info, block status and reads over everything (also of internal
 * snapshots, as convert -l loads them), check, then a few writes
 * (the append-mode writer and its commit, preallocate, allocation, COW,
 * zero clusters, discard, compressed) and a resize. */
#include "config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/image.h"
#include "core/info.h"
#include "fuzz_driver.h"

static void fuzz_qcow2_read_all(struct vimg_image *img)
{
    struct vimg_error err = { 0 };
    uint8_t buf[8192];

    for (uint64_t off = 0, n = 0; off < vimg_size(img) && n < 4096; n++) {
        struct vimg_status st;
        if (vimg_block_status(img, off, vimg_size(img) - off, &st, &err) < 0) {
            break;
        }
        size_t len = st.length < sizeof(buf) ? (size_t)st.length : sizeof(buf);
        vimg_error_clear(&err);
        vimg_pread(img, buf, len, off, &err);
        vimg_error_clear(&err);
        off += st.length;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct vimg_file *f;
    struct vimg_image *img;
    struct vimg_error err = { 0 };
    struct vimg_qobj *info = NULL;
    uint8_t buf[4096];

    /* convert -l: a snapshot's L1 table in place of the active one */
    if (vimg_file_open_mem(&f, "fuzz.qcow2", data, size, size, false) < 0) {
        return 0;
    }
    if (0 == vimg_internal_open_file(&img, f, "qcow2", 0, &err)) {
        static const char *const ids[] = { "1", "2" };
        for (size_t i = 0; i < sizeof(ids) / sizeof(ids[0]); i++) {
            if (0 == vimg_internal_snapshot_load_tmp(img, ids[i], NULL, &err)) {
                fuzz_qcow2_read_all(img);
            }
            vimg_error_clear(&err);
        }
        vimg_close(img);
    }
    vimg_error_clear(&err);

    if (vimg_file_open_mem(&f, "fuzz.qcow2", data, size, size + (4u << 20), true) < 0) {
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
    vimg_error_clear(&err);
    fuzz_qcow2_read_all(img);
    if (img->drv->check) {
        struct vimg_check_result r = { 0 };
        img->drv->check(img, &r, 0, &err);
        free(r.log);
        vimg_error_clear(&err);
    }
    vimg_fuzz_append(img, buf, sizeof(buf));
    if (img->drv->preallocate && vimg_size(img) <= (64u << 20)) {
        vimg_preallocate(img, VIMG_PREALLOC_METADATA, &err);
        vimg_error_clear(&err);
    }
    if (vimg_size(img) >= 8192 && vimg_size(img) <= (1ull << 40)) {
        memset(buf, 0xa5, sizeof(buf));
        vimg_pwrite(img, buf, 512, 512, &err);
        vimg_error_clear(&err);
        vimg_pwrite(img, buf, 4096, vimg_size(img) - 4096, &err);
        vimg_error_clear(&err);
        vimg_write_zeroes(img, 0, 4096, VIMG_ZERO_MAY_UNMAP, &err);
        vimg_error_clear(&err);
        vimg_discard(img, 0, vimg_size(img), &err);
        vimg_error_clear(&err);
        if (img->drv->write_compressed && img->limits.cluster_size <= sizeof(buf)) {
            img->drv->write_compressed(img, buf, img->limits.cluster_size, 0, &err);
            vimg_error_clear(&err);
        }
        fuzz_qcow2_read_all(img);
    }
    vimg_truncate(img, vimg_size(img) + 65536, VIMG_PREALLOC_OFF, 1, &err);
    vimg_close(img);
    return 0;
}

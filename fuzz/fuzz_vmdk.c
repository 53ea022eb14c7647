/* The vmdk driver through the core on an in-memory file: a hosted sparse
 * header (KDMV/COWD) or a text descriptor.  Read-only pass: probe, open,
 * info, block status over everything, reads of every run, check.  Then a
 * read-write pass: the append-mode writer and its commit, a plain write, a whole-grain (compressed for stream
 * images) write, zeroing, flush and close (which writes a stream trailer).
 * The in-memory file lives in a folder that does not exist, so extents a
 * descriptor names fail to open instead of touching real files. */
#include "config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/image.h"
#include "core/info.h"
#include "fuzz_driver.h"

#define FUZZ_NAME "/nonexistent-vimg-fuzz/fuzz.vmdk"

static void fuzz_vmdk_read(struct vimg_image *img)
{
    struct vimg_error err = { 0 };
    struct vimg_qobj *info = NULL;
    uint8_t buf[65536];
    unsigned runs = 0;

    if (0 == vimg_internal_image_info(img, &info, &err)) {
        char *s = vimg_q_to_json(info);
        free(s);
        vimg_q_free(info);
    }
    for (uint64_t off = 0; off < vimg_size(img) && runs < 4096; runs++) {
        struct vimg_status st;
        vimg_error_clear(&err);
        if (vimg_block_status(img, off, vimg_size(img) - off, &st, &err) < 0) {
            break;
        }
        size_t n = st.length < sizeof(buf) ? (size_t)st.length : sizeof(buf);
        vimg_pread(img, buf, n, off, &err);
        off += st.length;
    }
    if (img->drv->check) {
        struct vimg_check_result r = { 0 };
        vimg_error_clear(&err);
        img->drv->check(img, &r, 0, &err);
        free(r.log);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct vimg_file *f;
    struct vimg_image *img;
    struct vimg_error err = { 0 };
    static uint8_t buf[65536];

    if (vimg_file_open_mem(&f, FUZZ_NAME, data, size, size + (1u << 20), false) < 0) {
        return 0;
    }
    if (0 == vimg_internal_open_file(&img, f, NULL, 0, &err)) {
        fuzz_vmdk_read(img);
        vimg_close(img);
    }

    vimg_error_clear(&err);
    if (vimg_file_open_mem(&f, FUZZ_NAME, data, size, size + (1u << 20), true) < 0) {
        return 0;
    }
    if (vimg_internal_open_file(&img, f, "vmdk", VIMG_OPEN_RDWR, &err) < 0) {
        return 0;
    }
    uint64_t sz = vimg_size(img);
    vimg_fuzz_append(img, buf, sizeof(buf));
    memset(buf, 0x5a, sizeof(buf));
    if (sz >= 1024) {
        vimg_pwrite(img, buf, 512, 512, &err);
        vimg_error_clear(&err);
    }
    if (sz) {
        uint64_t cs = img->limits.cluster_size ? img->limits.cluster_size : 65536;
        uint64_t off = sz > cs ? sz - (sz % cs ? sz % cs : cs) : 0;
        size_t n = (size_t)(sz - off < sizeof(buf) ? sz - off : sizeof(buf));
        if (cs <= sizeof(buf) && img->drv->write_compressed) {
            img->drv->write_compressed(img, buf, n, off, &err);
            vimg_error_clear(&err);
        }
        vimg_write_zeroes(img, 0, sz < 65536 ? sz : 65536, 0, &err);
        vimg_error_clear(&err);
        vimg_flush(img, &err);
    }
    fuzz_vmdk_read(img);
    vimg_close(img);
    return 0;
}

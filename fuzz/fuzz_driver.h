/*
 * One fuzz body for the copy-on-write drivers: the driver through the core on
 * an in-memory file: probe, open, info, block status over the whole image,
 * reads of every run, the append-mode writer where the driver has one, and
 * a few writes (allocation, copy-on-write, bitmap or table updates).  Inputs that probe as another format are opened with the
 * target's format as well, so every input exercises its parser.
 */
#ifndef VIMG_FUZZ_DRIVER_H
#define VIMG_FUZZ_DRIVER_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/image.h"
#include "core/info.h"

/* The append-mode writer as convert drives it (runs in guest order, data
 * written where it says), then its commit over whatever tables the input
 * has.  Runs longer than buflen are left unwritten. */
static inline void vimg_fuzz_append(struct vimg_image *img, uint8_t *buf, size_t buflen)
{
    static const uint64_t at[] = { 0, 4096 + 512, 1u << 20, 3u << 20 };
    struct vimg_error err = { 0 };

    if (!img->drv->alloc_data || vimg_size(img) < 65536 || vimg_size(img) > (1ull << 40)) {
        return;
    }
    memset(buf, 0x3c, buflen);
    for (size_t i = 0; i < sizeof(at) / sizeof(at[0]); i++) {
        struct vimg_run run = { 0 };
        if (at[i] >= vimg_size(img) || img->drv->alloc_data(img, at[i], 8192, &run, &err) < 0) {
            break;
        }
        if (run.host && run.length <= buflen) {
            vimg_file_pwrite(run.host, buf, (size_t)run.length, run.host_off);
        }
    }
    vimg_error_clear(&err);
    vimg_flush(img, &err);
    vimg_error_clear(&err);
}

static inline int vimg_fuzz_driver(const uint8_t *data, size_t size, const char *fmt,
                                   const char *name)
{
    struct vimg_file *f;
    struct vimg_image *img;
    struct vimg_error err = { 0 };
    struct vimg_qobj *info = NULL;
    uint8_t buf[8192];
    int runs = 0;

    if (vimg_file_open_mem(&f, name, data, size, size + 262144, true) < 0) {
        return 0;
    }
    /* probe first; inputs another driver claims are opened with fmt too */
    if (vimg_internal_open_file(&img, f, NULL, VIMG_OPEN_RDWR, &err) < 0) {
        return 0;
    }
    if (strcmp(vimg_format(img), fmt)) {
        vimg_close(img);
        if (vimg_file_open_mem(&f, name, data, size, size + 262144, true) < 0 ||
            vimg_internal_open_file(&img, f, fmt, VIMG_OPEN_RDWR, &err) < 0) {
            return 0;
        }
    }
    if (0 == vimg_internal_image_info(img, &info, &err)) {
        char *s = vimg_q_to_json(info);
        free(s);
        vimg_q_free(info);
    }
    /* bounded: a hostile map may have very many runs */
    for (uint64_t off = 0; off < vimg_size(img) && runs < 100000; runs++) {
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
    vimg_error_clear(&err);
    vimg_fuzz_append(img, buf, sizeof(buf));
    if (vimg_size(img) >= 8192) {
        memset(buf, 0xa5, sizeof(buf));
        vimg_pwrite(img, buf, 700, 300, &err);
        vimg_pwrite(img, buf, 4096, vimg_size(img) - 4096, &err);
        vimg_pread(img, buf, 4096, 0, &err);
    }
    vimg_close(img);
    return 0;
}

#endif

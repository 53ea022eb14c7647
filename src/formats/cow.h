/* UML cow header layouts: shared by cow.c and its unit tests only. */
#ifndef VIMG_FORMATS_COW_H
#define VIMG_FORMATS_COW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define COW_MAGIC 0x4f4f4f4du
/* Enough of the file to tell every layout apart (the broken v3 is longest). */
#define COW_PROBE_LEN 4136

enum cow_variant {
    COW_V1,           /* fields in the writer's byte order */
    COW_V2_LINUX,     /* 4096-byte path */
    COW_V2_QEMU64,    /* QEMU <= 2.1 block/cow.c, x86-64 struct layout */
    COW_V2_QEMU32,    /* the same on i386 */
    COW_V3,
    COW_V3_BROKEN,    /* 64-bit UML before Dec 2005: 4 bytes of padding */
};

struct cow_layout {
    enum cow_variant variant;
    uint32_t version;
    uint32_t mtime;
    uint64_t size;          /* as stored (bytes) */
    uint32_t sectorsize;
    uint32_t alignment;
    uint64_t bitmap_off;
    uint64_t data_off;
    size_t name_off, name_max;   /* backing path field */
};

/*
 * Identify the layout of a cow header.  buf holds the first COW_PROBE_LEN
 * bytes of the file (zeros past its end), file_size its length.  Returns 0,
 * or -EINVAL / -ENOTSUP with a reason in why (no file name).
 */
int vimg_internal_cow_parse(const uint8_t *buf, uint64_t file_size,
                            struct cow_layout *out, char *why, size_t whylen);
const char *vimg_internal_cow_variant_name(enum cow_variant v);

#endif

/* Small helpers every layer may use: checked arithmetic, alignment, byte order. */
#ifndef VIMG_UTIL_H
#define VIMG_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <endian.h>

#define VIMG_MIN(a, b) ((a) < (b) ? (a) : (b))
#define VIMG_MAX(a, b) ((a) > (b) ? (a) : (b))
#define VIMG_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

static inline bool vimg_is_pow2(uint64_t x)
{
    return x && !(x & (x - 1));
}

/* align must be a power of two */
static inline bool vimg_is_aligned(uint64_t x, uint64_t align)
{
    return (x & (align - 1)) == 0;
}

static inline uint64_t vimg_align_down(uint64_t x, uint64_t align)
{
    return x & ~(align - 1);
}

/* Returns false on overflow; *out is then unchanged. align: any non-zero value. */
static inline bool vimg_round_up(uint64_t x, uint64_t align, uint64_t *out)
{
    uint64_t r = x % align;
    if (0 == r) {
        *out = x;
        return true;
    }
    if (x > UINT64_MAX - (align - r)) {
        return false;
    }
    *out = x + (align - r);
    return true;
}

static inline uint64_t vimg_div_round_up(uint64_t x, uint64_t d)
{
    return x / d + (x % d != 0);
}

/* Checked arithmetic: true when the result fits. */
static inline bool vimg_add_ok(uint64_t a, uint64_t b, uint64_t *out)
{
    return !__builtin_add_overflow(a, b, out);
}

static inline bool vimg_mul_ok(uint64_t a, uint64_t b, uint64_t *out)
{
    return !__builtin_mul_overflow(a, b, out);
}

/* Byte order: loads and stores from unaligned buffers. */
static inline uint16_t vimg_ld_be16(const void *p)
{
    uint16_t v;
    __builtin_memcpy(&v, p, 2);
    return be16toh(v);
}
static inline uint32_t vimg_ld_be32(const void *p)
{
    uint32_t v;
    __builtin_memcpy(&v, p, 4);
    return be32toh(v);
}
static inline uint64_t vimg_ld_be64(const void *p)
{
    uint64_t v;
    __builtin_memcpy(&v, p, 8);
    return be64toh(v);
}
static inline uint16_t vimg_ld_le16(const void *p)
{
    uint16_t v;
    __builtin_memcpy(&v, p, 2);
    return le16toh(v);
}
static inline uint32_t vimg_ld_le32(const void *p)
{
    uint32_t v;
    __builtin_memcpy(&v, p, 4);
    return le32toh(v);
}
static inline uint64_t vimg_ld_le64(const void *p)
{
    uint64_t v;
    __builtin_memcpy(&v, p, 8);
    return le64toh(v);
}
static inline void vimg_st_be16(void *p, uint16_t v)
{
    v = htobe16(v);
    __builtin_memcpy(p, &v, 2);
}
static inline void vimg_st_be32(void *p, uint32_t v)
{
    v = htobe32(v);
    __builtin_memcpy(p, &v, 4);
}
static inline void vimg_st_be64(void *p, uint64_t v)
{
    v = htobe64(v);
    __builtin_memcpy(p, &v, 8);
}
static inline void vimg_st_le16(void *p, uint16_t v)
{
    v = htole16(v);
    __builtin_memcpy(p, &v, 2);
}
static inline void vimg_st_le32(void *p, uint32_t v)
{
    v = htole32(v);
    __builtin_memcpy(p, &v, 4);
}
static inline void vimg_st_le64(void *p, uint64_t v)
{
    v = htole64(v);
    __builtin_memcpy(p, &v, 8);
}

#endif

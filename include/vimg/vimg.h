/*
 * libvimg: the public API.
 *
 * Conventions (the whole library follows them):
 *  - Every call that can fail returns 0 (or a non-negative count) on success
 *    and a negative errno on failure, and takes `struct vimg_error *err` as its
 *    last parameter.  err may be NULL.  On failure err->msg holds one line that
 *    names the file and the cause, in qemu-img's wording where qemu-img has a
 *    message for the same condition.  The first error set wins.
 *  - Offsets and lengths are bytes of the guest (virtual) disk unless a name
 *    says host_off.
 *  - Nothing in the library prints or exits.
 */
#ifndef VIMG_VIMG_H
#define VIMG_VIMG_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define VIMG_API __attribute__((visibility("default")))
#define VIMG_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define VIMG_API
#define VIMG_PRINTF(a, b)
#endif

/* ---- errors ------------------------------------------------------------ */

struct vimg_error {
    int code;        /* positive errno of the first failure, 0 when none */
    char msg[1024];  /* one line, no trailing newline */
};

/* Record an error unless one is recorded already (the first error wins). */
VIMG_API void vimg_error_set(struct vimg_error *err, int code, const char *fmt, ...)
    VIMG_PRINTF(3, 4);
/* Put `prefix` in front of a recorded message (for "Could not open 'x': ..."). */
VIMG_API void vimg_error_prefix(struct vimg_error *err, const char *fmt, ...)
    VIMG_PRINTF(2, 3);
VIMG_API void vimg_error_clear(struct vimg_error *err);

/* ---- option lists (-o key=value,...) ------------------------------------ */

/* An ordered list of key=value strings, as given by the user.  Values are
 * checked against a driver's typed option table when they are used. */
struct vimg_opts;

VIMG_API struct vimg_opts *vimg_opts_new(void);
VIMG_API void vimg_opts_free(struct vimg_opts *opts);
/* Parse qemu's "key=value,key2=value2" syntax (",," is a literal comma).  A
 * later value of the same key replaces an earlier one. */
VIMG_API int vimg_opts_parse(struct vimg_opts *opts, const char *text,
                             struct vimg_error *err);
VIMG_API int vimg_opts_set(struct vimg_opts *opts, const char *key, const char *value);
VIMG_API const char *vimg_opts_get(const struct vimg_opts *opts, const char *key);
VIMG_API int vimg_opts_unset(struct vimg_opts *opts, const char *key);

/* ---- images -------------------------------------------------------------- */

struct vimg_image;

enum {
    VIMG_OPEN_RDWR        = 1u << 0,  /* open for writing */
    VIMG_OPEN_NO_BACKING  = 1u << 1,  /* do not open the backing chain */
    VIMG_OPEN_FORCE_SHARE = 1u << 2,  /* -U: take no locks (read-only only) */
    VIMG_OPEN_NO_IO       = 1u << 3,  /* metadata only (info) */
    VIMG_OPEN_ALLOW_OUTSIDE = 1u << 4, /* user allows references outside the folder */
    VIMG_OPEN_NO_SHARE    = 1u << 5,  /* let nobody else write or resize (convert source) */
    VIMG_OPEN_RESIZE      = 1u << 6,  /* the caller will resize the image */
    VIMG_OPEN_NO_FLUSH    = 1u << 7,  /* cache=unsafe: never fdatasync */
};

/* Open `filename` with driver `format`, or probe when format is NULL.  With a
 * probed raw format and VIMG_OPEN_RDWR, *probed_raw_warning (when not NULL) is
 * set to 1 so the caller can print qemu-img's warning. */
VIMG_API int vimg_open(struct vimg_image **out, const char *filename,
                       const char *format, unsigned flags,
                       int *probed_raw_warning, struct vimg_error *err);
VIMG_API void vimg_close(struct vimg_image *img);

VIMG_API uint64_t vimg_size(const struct vimg_image *img);
/* A warning the driver recorded while opening this image (one line), or
 * NULL.  The library never prints: callers show it. */
VIMG_API const char *vimg_warning(const struct vimg_image *img);
VIMG_API const char *vimg_format(const struct vimg_image *img);
VIMG_API const char *vimg_filename(const struct vimg_image *img);
/* The next image down the backing chain, or NULL. */
VIMG_API struct vimg_image *vimg_backing(const struct vimg_image *img);
/* Bytes the image's files occupy on the host (st_blocks), or -errno. */
VIMG_API int64_t vimg_allocated_size(const struct vimg_image *img);

/* Reads are whole: len bytes or an error.  Ranges past the virtual size fail
 * with -EINVAL. */
VIMG_API int vimg_pread(struct vimg_image *img, void *buf, size_t len,
                        uint64_t offset, struct vimg_error *err);
VIMG_API int vimg_pwrite(struct vimg_image *img, const void *buf, size_t len,
                         uint64_t offset, struct vimg_error *err);
enum {
    VIMG_ZERO_MAY_UNMAP = 1u << 0,   /* a hole is fine, the range must read as zeros */
};
VIMG_API int vimg_write_zeroes(struct vimg_image *img, uint64_t offset, uint64_t len,
                               unsigned flags, struct vimg_error *err);
VIMG_API int vimg_discard(struct vimg_image *img, uint64_t offset, uint64_t len,
                          struct vimg_error *err);
VIMG_API int vimg_flush(struct vimg_image *img, struct vimg_error *err);

enum vimg_prealloc {
    VIMG_PREALLOC_OFF = 0,
    VIMG_PREALLOC_METADATA,
    VIMG_PREALLOC_FALLOC,
    VIMG_PREALLOC_FULL,
};
/* Parse "off", "metadata", "falloc", "full"; -EINVAL otherwise. */
VIMG_API int vimg_prealloc_parse(const char *s, enum vimg_prealloc *out);
VIMG_API const char *vimg_prealloc_name(enum vimg_prealloc p);

/* Change the virtual size.  Shrinking needs allow_shrink. */
VIMG_API int vimg_truncate(struct vimg_image *img, uint64_t size,
                           enum vimg_prealloc prealloc, int allow_shrink,
                           struct vimg_error *err);

/* Allocate every hole of the image's file in place; what the image reads
 * does not change.  mode: VIMG_PREALLOC_FALLOC (reserve) or _FULL (write
 * zeros).  raw only for now. */
VIMG_API int vimg_preallocate(struct vimg_image *img, enum vimg_prealloc mode,
                              struct vimg_error *err);

/* ---- block status ------------------------------------------------------- */

enum {
    VIMG_STATUS_DATA       = 1u << 0,  /* reads come from stored data */
    VIMG_STATUS_ZERO       = 1u << 1,  /* reads as zeros */
    VIMG_STATUS_ALLOCATED  = 1u << 2,  /* some layer of the chain decides the content */
    VIMG_STATUS_HOST_VALID = 1u << 3,  /* host_offset in host_file holds the bytes */
    VIMG_STATUS_COMPRESSED = 1u << 4,
};

struct vimg_status {
    uint64_t length;            /* > 0 */
    unsigned flags;             /* VIMG_STATUS_* */
    int depth;                  /* chain layer that answered (0 = top) */
    uint64_t host_offset;       /* valid with VIMG_STATUS_HOST_VALID */
    const char *host_file;      /* name of the host file, same validity */
};

/* Status of [offset, offset + max_len) through the whole backing chain: one
 * run starting at offset. */
VIMG_API int vimg_block_status(struct vimg_image *img, uint64_t offset,
                               uint64_t max_len, struct vimg_status *st,
                               struct vimg_error *err);

/* ---- create ------------------------------------------------------------- */

/* Create `filename` in `format` with options (size=... among them). */
VIMG_API int vimg_create(const char *filename, const char *format,
                         const struct vimg_opts *opts, struct vimg_error *err);

/* ---- sizes -------------------------------------------------------------- */

/* qemu's size syntax: a number with an optional fraction and an optional
 * suffix b/B (bytes), k/K, m/M, g/G, t/T, p/P, e/E (powers of 1024), or 0x hex.
 * default_suffix applies when none is given (usually 'B').
 * Returns 0, -EINVAL (syntax) or -ERANGE (does not fit in 64 bits). */
VIMG_API int vimg_parse_size(const char *s, char default_suffix, uint64_t *out);

/* "1.5 GiB": qemu's human size (three significant digits). Returns buf. */
VIMG_API char *vimg_format_size(uint64_t val, char *buf, size_t buflen);

VIMG_API const char *vimg_version(void);

#ifdef __cplusplus
}
#endif
#endif

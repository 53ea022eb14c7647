/*
 * vmdk: VMware virtual disks, as qemu-img 7.2 reads and writes them.
 * Internal to src/formats/vmdk/; the unit tests include it for the
 * descriptor parser and the grain arithmetic.
 */
#ifndef VIMG_FORMATS_VMDK_H
#define VIMG_FORMATS_VMDK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/image.h"

#define VMDK_SECTOR          512u
#define VMDK4_MAGIC          0x4b444d56u   /* "KDMV" read big-endian */
#define VMDK3_MAGIC          0x434f5744u   /* "COWD" */
#define VMDK_SESPARSE_MAGIC  0xcafebabeull
#define VMDK_GD_AT_END       UINT64_MAX

/* Header flags (hosted sparse extents). */
#define VMDK4_FLAG_NL_DETECT  (1u << 0)
#define VMDK4_FLAG_RGD        (1u << 1)
#define VMDK4_FLAG_ZERO_GRAIN (1u << 2)
#define VMDK4_FLAG_COMPRESS   (1u << 16)
#define VMDK4_FLAG_MARKER     (1u << 17)

#define VMDK_GTE_ZEROED 1u

/* Stream markers. */
#define VMDK_MARKER_EOS    0u
#define VMDK_MARKER_GT     1u
#define VMDK_MARKER_GD     2u
#define VMDK_MARKER_FOOTER 3u

/* Bounds: qemu's where qemu has one, ours where it has none. */
#define VMDK_DESC_READ_MAX    ((1u << 20) - 1)  /* qemu: descriptor read size */
#define VMDK_DESC_SIZE        10240u            /* CID area at desc_offset */
#define VMDK_DESC_WRITE_MAX   (16u << 20)       /* qemu: CID rewrite limit */
#define VMDK_DESC_MAX_LINES   65536u            /* ours */
#define VMDK_MAX_EXTENTS      8192u             /* ours: 16 TiB in 2 GiB pieces */
#define VMDK_MAX_GRAIN_SECTORS 0x200000ull      /* qemu: 1 GiB */
#define VMDK_MAX_L1           (32u * 1024 * 1024)  /* qemu: GD entries */
#define VMDK_MAX_GTES         512u              /* qemu: entries per GT (VMDK4) */
#define VMDK_COWD_GTES        4096u
#define VMDK_SES_GTES         4096u
#define VMDK_HINT_MAX         4095u             /* qemu: parentFileNameHint */
#define VMDK_MAX_ALLOC_SECTOR 0xffffffffull     /* GTEs are 32-bit sectors */
#define VMDK_GT_CACHE         16

enum vmdk_kind {
    VMDK_EXT_FLAT,
    VMDK_EXT_SPARSE,    /* hosted sparse, "KDMV" */
    VMDK_EXT_COWD,      /* ESX sparse, "COWD" */
    VMDK_EXT_SESPARSE,
};

/* ---- descriptor ------------------------------------------------------------ */

struct vmdk_desc_extent {
    char access[11];
    int64_t sectors;
    char type[11];
    char fname[512];
    int64_t offset;     /* FLAT: start sector in the file */
};

struct vmdk_desc {
    char create_type[128];
    struct vmdk_desc_extent *extents;   /* the usable (RW) ones, in order */
    size_t n_extents;
    size_t n_skipped;                   /* RDONLY, NOACCESS, ZERO, unknown... */
};

/* Parse the extent part of a text descriptor as qemu 7.2 does (createType
 * must be one of the standalone types).  text is NUL-terminated, at most
 * VMDK_DESC_READ_MAX bytes.  Messages are qemu's. */
int vmdk_desc_parse(const char *text, struct vmdk_desc *d, struct vimg_error *err);
void vmdk_desc_free(struct vmdk_desc *d);
/* qemu's value lookups in the CID area (NUL-terminated): -EINVAL when
 * missing or unparsable. */
int vmdk_desc_cid(const char *area, bool parent, uint32_t *out);
/* parentFileNameHint: 0 and *hint NULL when absent; -EINVAL when bad. */
int vmdk_desc_hint(const char *area, char **hint);
/* createType="..." as qemu finds it: 0, or -EINVAL. */
int vmdk_desc_create_type(const char *text, char *out, size_t outlen);
/* The probe: score 100 for a magic or a text descriptor, else 0. */
int vmdk_probe_text(const uint8_t *buf, size_t len);

/* ---- open image ------------------------------------------------------------ */

struct vmdk_gt_slot {
    uint64_t off;        /* byte offset of the cached GT; 0 = empty */
    uint64_t stamp;
    uint8_t *buf;
};

/* State of a stream writer on a GD_AT_END extent: grains go at append,
 * grain tables are rewritten at the end with the GD, footer and EOS. */
struct vmdk_stream {
    bool active;
    uint64_t append;     /* byte offset where the next record goes */
    uint64_t trailer;    /* where the trailer starts (append when written) */
    int64_t open_gt;     /* GD index whose GT is held in gt, or -1 */
    uint32_t *gt;        /* host order */
    bool gt_dirty;
    bool dirty;          /* trailer must be rewritten */
    uint8_t header[512];
};

struct vmdk_extent {
    struct vimg_file *file;
    bool owns_file;
    enum vmdk_kind kind;
    char *type;               /* descriptor TYPE, NULL for a monolithic image */
    uint64_t start;           /* guest byte offset of the extent */
    uint64_t length;          /* bytes */
    uint64_t flat_off;        /* FLAT/VMFS: bytes into the file */

    /* sparse */
    uint32_t version, hflags;
    uint64_t grain;           /* bytes */
    uint32_t gtes;            /* entries per GT */
    unsigned esize;           /* bytes per GD/GT entry: 4, or 8 for seSparse */
    uint64_t gt_cover;        /* guest bytes one GT covers */
    uint32_t l1_size;
    uint64_t gd_off, rgd_off; /* bytes; rgd_off 0 = none */
    uint64_t *gd;             /* host order, widened */
    uint32_t *rgd;
    uint64_t overhead;        /* bytes */
    bool compressed, markers, zeroed, gd_at_end, readonly;
    uint64_t next_alloc;      /* bytes */
    uint64_t ses_gt_off, ses_grain_off;
    struct vmdk_gt_slot cache[VMDK_GT_CACHE];
    uint64_t stamp;
    struct vmdk_stream st;
};

/* The append-mode writer (append.c): one grain table held in memory. */
enum vmdk_append_state { VMDK_APPEND_UNKNOWN, VMDK_APPEND_ON, VMDK_APPEND_OFF };

struct vmdk_append {
    enum vmdk_append_state state;
    struct vmdk_extent *ext;  /* extent of the held grain table, NULL none */
    uint64_t gi;              /* its GD index */
    uint32_t *gt;             /* host order */
    bool gt_dirty;
    struct vmdk_extent *fill_ext;  /* a grain the last run ended inside */
    uint64_t fill_from;       /* host offset in fill_ext's file */
    uint8_t *zbuf;            /* zeros, VMDK_APPEND_ZBUF bytes */
};

struct vmdk_state {
    struct vmdk_extent *ext;
    size_t n;
    uint32_t cid, parent_cid;
    bool cid_updated;
    uint64_t desc_offset;     /* 0x200 when embedded, else 0 */
    uint64_t desc_room;       /* embedded: bytes the CID rewrite may touch */
    char create_type[128];
    size_t n_skipped;
    struct vmdk_append app;
};

extern const struct vimg_driver vimg_driver_vmdk;

/* Shared between the files of the driver. */
struct vmdk_extent *vmdk_find(struct vmdk_state *s, uint64_t off);
int vmdk_io_error(struct vimg_error *err, int ret, const char *what,
                  const struct vimg_file *f, uint64_t off);
/* -ENOSPC with err set when bytes more at next_alloc pass the GTE range. */
int vmdk_check_alloc(struct vmdk_extent *e, uint64_t bytes, struct vimg_error *err);
/* The first write of an open image gives it a new CID (qemu's). */
int vmdk_cid_update(struct vimg_image *img, struct vimg_error *err);
/* Forget the cached copy of the grain table at gt_off. */
void vmdk_gt_cache_drop(struct vmdk_extent *e, uint64_t gt_off);
/* The append-mode writer (driver.h): alloc_data, and the commit every
 * other write, flush and close call first. */
int vmdk_alloc_data(struct vimg_image *img, uint64_t offset, uint64_t len,
                    struct vimg_run *run, struct vimg_error *err);
int vmdk_append_commit(struct vimg_image *img, struct vimg_error *err);
int vmdk_gt_load(struct vimg_image *img, struct vmdk_extent *e, uint64_t gt_off,
                 uint8_t **out, struct vimg_error *err);
int vmdk_stream_write(struct vimg_image *img, struct vmdk_extent *e, const void *buf,
                      size_t len, uint64_t r, struct vimg_error *err);
int vmdk_stream_put(struct vimg_image *img, struct vmdk_extent *e, uint64_t r, size_t len,
                    const void *cdata, size_t clen, struct vimg_error *err);
/* zlib (RFC 1950) into out: the length, -ENOSPC when it does not fit. */
long vmdk_deflate(void *out, size_t out_cap, const void *buf, size_t len);
/* Deflate one grain into a new buffer (*out, freed by the caller). */
int vmdk_compress_grain(struct vimg_image *img, const void *buf, size_t len,
                        uint8_t **out, size_t *out_len, struct vimg_error *err);
int vmdk_stream_finish(struct vimg_image *img, struct vmdk_extent *e,
                       struct vimg_error *err);
int vmdk_read_compressed(struct vimg_image *img, struct vmdk_extent *e, uint64_t gte,
                         uint64_t r, void *buf, size_t len, struct vimg_error *err);
int vmdk_create(const char *filename, const struct vimg_opts *opts,
                struct vimg_error *err);
extern const struct vimg_opt_desc vmdk_create_opts[];
/* Header of a hosted sparse extent (512 bytes, magic included). */
struct vmdk4_header {
    uint32_t version, flags;
    uint64_t capacity, grain, desc_off, desc_size;
    uint32_t gtes;
    uint64_t rgd_off, gd_off, overhead;
    uint8_t unclean;
    uint16_t compress;
};
void vmdk4_header_encode(const struct vmdk4_header *h, uint8_t out[512]);
void vmdk4_header_decode(const uint8_t in[512], struct vmdk4_header *h);
/* Grain arithmetic for a hosted sparse extent of capacity sectors. */
struct vmdk_layout {
    uint64_t gt_count, gd_sectors, gt_sectors, rgd, gd, overhead;
};
void vmdk_layout(uint64_t capacity, uint64_t grain_sectors, uint32_t gtes,
                 struct vmdk_layout *l);
uint32_t vmdk_random_cid(void);

#endif

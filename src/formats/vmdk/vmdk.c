/*
 * vmdk: open (monolithic, descriptor + extents), block status, reads,
 * writes with grain and grain-table allocation, zeroed grains, info, check.
 * qemu 7.2 is the reference for messages and layout; its known bugs are
 * not copied (see docs/architecture.md and the reference digest A5-A9).
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "core/image.h"
#include "core/opts.h"
#include "core/qobj.h"
#include "formats/vmdk/vmdk.h"
#include "formats/zcodec.h"
#include "util/util.h"

/* ---- small helpers ------------------------------------------------------- */

uint32_t vmdk_random_cid(void)
{
    uint32_t v;
    if (sizeof(v) != getrandom(&v, sizeof(v), GRND_NONBLOCK)) {
        v = (uint32_t)time(NULL) ^ ((uint32_t)getpid() << 16) ^ (uint32_t)clock();
    }
    return v;
}

void vmdk4_header_decode(const uint8_t in[512], struct vmdk4_header *h)
{
    h->version = vimg_ld_le32(in + 4);
    h->flags = vimg_ld_le32(in + 8);
    h->capacity = vimg_ld_le64(in + 12);
    h->grain = vimg_ld_le64(in + 20);
    h->desc_off = vimg_ld_le64(in + 28);
    h->desc_size = vimg_ld_le64(in + 36);
    h->gtes = vimg_ld_le32(in + 44);
    h->rgd_off = vimg_ld_le64(in + 48);
    h->gd_off = vimg_ld_le64(in + 56);
    h->overhead = vimg_ld_le64(in + 64);
    h->unclean = in[72];
    h->compress = vimg_ld_le16(in + 77);
}

void vmdk4_header_encode(const struct vmdk4_header *h, uint8_t out[512])
{
    memset(out, 0, 512);
    vimg_st_be32(out, VMDK4_MAGIC);
    vimg_st_le32(out + 4, h->version);
    vimg_st_le32(out + 8, h->flags);
    vimg_st_le64(out + 12, h->capacity);
    vimg_st_le64(out + 20, h->grain);
    vimg_st_le64(out + 28, h->desc_off);
    vimg_st_le64(out + 36, h->desc_size);
    vimg_st_le32(out + 44, h->gtes);
    vimg_st_le64(out + 48, h->rgd_off);
    vimg_st_le64(out + 56, h->gd_off);
    vimg_st_le64(out + 64, h->overhead);
    out[72] = h->unclean;
    out[73] = '\n';
    out[74] = ' ';
    out[75] = '\r';
    out[76] = '\n';
    vimg_st_le16(out + 77, h->compress);
}

void vmdk_layout(uint64_t capacity, uint64_t grain_sectors, uint32_t gtes,
                 struct vmdk_layout *l)
{
    uint64_t grains = vimg_div_round_up(capacity, grain_sectors);
    l->gt_sectors = vimg_div_round_up((uint64_t)gtes * 4, VMDK_SECTOR);
    l->gt_count = vimg_div_round_up(grains, gtes);
    l->gd_sectors = vimg_div_round_up(l->gt_count * 4, VMDK_SECTOR);
    l->rgd = 1 + 20;
    l->gd = l->rgd + l->gd_sectors + l->gt_sectors * l->gt_count;
    l->overhead = l->gd + l->gd_sectors + l->gt_sectors * l->gt_count;
    vimg_round_up(l->overhead, grain_sectors, &l->overhead);
}

int vmdk_io_error(struct vimg_error *err, int ret, const char *what,
                  const struct vimg_file *f, uint64_t off)
{
    vimg_error_set(err, -ret, "error while %s '%s' at byte %" PRIu64 ": %s", what, f->name,
                   off, strerror(-ret));
    return ret;
}

static int vmdk_fsize(struct vimg_file *f, uint64_t *out, struct vimg_error *err)
{
    int64_t n = vimg_file_size(f);
    if (n < 0) {
        vimg_error_set(err, (int)-n, "Could not get the size of '%s': %s", f->name,
                       strerror((int)-n));
        return (int)n;
    }
    *out = (uint64_t)n;
    return 0;
}

static void vmdk_extent_free(struct vmdk_extent *e)
{
    for (int i = 0; i < VMDK_GT_CACHE; i++) {
        free(e->cache[i].buf);
    }
    free(e->gd);
    free(e->rgd);
    free(e->type);
    free(e->st.gt);
    if (e->owns_file) {
        vimg_file_close(e->file);
    }
    memset(e, 0, sizeof(*e));
}

static struct vmdk_extent *vmdk_new_extent(struct vmdk_state *s, struct vimg_error *err)
{
    struct vmdk_extent *n = realloc(s->ext, (s->n + 1) * sizeof(*n));
    if (!n) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return NULL;
    }
    s->ext = n;
    memset(&n[s->n], 0, sizeof(n[0]));
    n[s->n].st.open_gt = -1;
    return &n[s->n++];
}

/* Read a table of n entries of esize bytes, widened to u64. */
static int vmdk_read_table(struct vmdk_extent *e, uint64_t off, uint32_t n, unsigned esize,
                           uint64_t **out, struct vimg_error *err)
{
    size_t bytes = (size_t)n * esize;
    uint8_t *raw = malloc(bytes ? bytes : 1);
    uint64_t *t = malloc((n ? n : 1) * sizeof(uint64_t));
    int ret;

    if (!raw || !t) {
        free(raw);
        free(t);
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    ret = vimg_file_pread(e->file, raw, bytes, off);
    if (ret < 0) {
        free(raw);
        free(t);
        vimg_error_set(err, -ret, "Could not read l1 table from extent '%s'", e->file->name);
        return ret;
    }
    for (uint32_t i = 0; i < n; i++) {
        t[i] = 8 == esize ? vimg_ld_le64(raw + (size_t)i * 8) : vimg_ld_le32(raw + (size_t)i * 4);
    }
    free(raw);
    *out = t;
    return 0;
}

/* The limits qemu applies when it adds an extent, then ours. */
static int vmdk_check_tables(struct vmdk_extent *e, uint64_t grain_sectors, uint64_t l1,
                             struct vimg_error *err)
{
    if (grain_sectors > VMDK_MAX_GRAIN_SECTORS) {
        vimg_error_set(err, EFBIG, "Invalid granularity, image may be corrupt");
        return -EFBIG;
    }
    if (l1 > VMDK_MAX_L1) {
        vimg_error_set(err, EFBIG, "L1 size too big");
        return -EFBIG;
    }
    if (0 == grain_sectors) {
        vimg_error_set(err, EINVAL, "'%s': invalid grain size 0", e->file->name);
        return -EINVAL;
    }
    return 0;
}

/* A table of n entries at off must lie inside the file. */
static int vmdk_check_inside(struct vmdk_extent *e, uint64_t fsize, uint64_t off,
                             uint64_t bytes, const char *what, struct vimg_error *err)
{
    uint64_t end;
    if (!vimg_add_ok(off, bytes, &end) || end > fsize) {
        vimg_error_set(err, EINVAL, "'%s': %s at offset %" PRIu64 " lies beyond the end of "
                       "the file", e->file->name, what, off);
        return -EINVAL;
    }
    return 0;
}

static int vmdk_open_desc_text(struct vimg_image *img, const char *text,
                               struct vimg_error *err);

/* ---- hosted sparse extents ("KDMV") -------------------------------------- */

static int vmdk_open_vmdk4(struct vimg_image *img, struct vmdk_extent *e, bool top,
                           struct vimg_error *err)
{
    struct vmdk_state *s = img->opaque;
    uint8_t hb[512];
    struct vmdk4_header h;
    uint64_t fsize, l1e, l1, cap_bytes, gd_bytes;
    int ret;

    if ((ret = vmdk_fsize(e->file, &fsize, err)) < 0) {
        return ret;
    }
    ret = vimg_file_pread(e->file, hb, sizeof(hb), 0);
    if (ret < 0) {
        vimg_error_set(err, EINVAL, "Could not read header from file '%s'", e->file->name);
        return -EINVAL;
    }
    memcpy(e->st.header, hb, sizeof(hb));
    vmdk4_header_decode(hb, &h);
    if (0 == h.capacity && h.desc_off && top) {
        /* A container for a text descriptor, unless the descriptor says it
         * is itself a monolithic image of size 0 (qemu cannot reopen those). */
        char ct[128];
        uint64_t doff;
        size_t n = (size_t)VIMG_MIN(fsize, (uint64_t)VMDK_DESC_READ_MAX);
        char *buf;
        if (!vimg_mul_ok(h.desc_off, VMDK_SECTOR, &doff)) {
            vimg_error_set(err, EINVAL, "'%s': invalid descriptor offset", e->file->name);
            return -EINVAL;
        }
        buf = calloc(1, n + 1);
        if (!buf) {
            vimg_error_set(err, ENOMEM, "out of memory");
            return -ENOMEM;
        }
        ret = vimg_file_pread(e->file, buf, n, doff);
        if (ret < 0) {
            free(buf);
            vimg_error_set(err, -ret, "Could not read from file: %s", strerror(-ret));
            return ret;
        }
        if (!(0 == vmdk_desc_create_type(buf, ct, sizeof(ct)) &&
              (0 == strcmp(ct, "monolithicSparse") || 0 == strcmp(ct, "streamOptimized")))) {
            s->n--;    /* e is not an extent after all */
            ret = vmdk_open_desc_text(img, buf, err);
            free(buf);
            return ret;
        }
        free(buf);
    }
    if (top && !s->create_type[0]) {
        strcpy(s->create_type, "monolithicSparse");
    }
    if (top) {
        /* qemu rewrites 10 KiB at 0x200 whatever the header says; stay
         * inside the descriptor area and before the first table */
        uint64_t room = VMDK_DESC_SIZE, lim = UINT64_MAX;
        if (h.desc_size && h.desc_size < VMDK_DESC_SIZE / VMDK_SECTOR) {
            room = h.desc_size * VMDK_SECTOR;
        }
        if (h.gd_off && VMDK_GD_AT_END != h.gd_off) {
            lim = VIMG_MIN(lim, h.gd_off);
        }
        if ((h.flags & VMDK4_FLAG_RGD) && h.rgd_off) {
            lim = VIMG_MIN(lim, h.rgd_off);
        }
        if (h.overhead) {
            lim = VIMG_MIN(lim, h.overhead);
        }
        if (lim < UINT64_MAX / VMDK_SECTOR) {
            room = lim > 1 ? VIMG_MIN(room, (lim - 1) * VMDK_SECTOR) : 0;
        }
        s->desc_room = room;
    }
    if (VMDK_GD_AT_END == h.gd_off) {
        uint8_t ft[1536];
        uint64_t end = 0;
        vimg_round_up(fsize, VMDK_SECTOR, &end);
        if (end < sizeof(ft)) {
            vimg_error_set(err, EINVAL, "Invalid footer");
            return -EINVAL;
        }
        ret = vimg_file_pread(e->file, ft, sizeof(ft), end - sizeof(ft));
        if (ret < 0) {
            vimg_error_set(err, -ret, "Failed to read footer: %s", strerror(-ret));
            return ret;
        }
        if (VMDK4_MAGIC != vimg_ld_be32(ft + 512) || 0 != vimg_ld_le32(ft + 8) ||
            VMDK_MARKER_FOOTER != vimg_ld_le32(ft + 12) || 0 != vimg_ld_le64(ft + 1024) ||
            0 != vimg_ld_le32(ft + 1032) || VMDK_MARKER_EOS != vimg_ld_le32(ft + 1036)) {
            vimg_error_set(err, EINVAL, "Invalid footer");
            return -EINVAL;
        }
        vmdk4_header_decode(ft + 512, &h);
        e->gd_at_end = true;
        e->st.trailer = end - sizeof(ft);
        memcpy(e->st.header, ft + 512, 512);
    }
    e->compressed = 1 == h.compress;
    if (h.version > 3) {
        vimg_error_set(err, ENOTSUP, "Unsupported VMDK version %" PRIu32, h.version);
        return -ENOTSUP;
    }
    if (3 == h.version && (img->flags & VIMG_OPEN_RDWR) && !e->compressed) {
        vimg_error_set(err, EINVAL, "VMDK version 3 must be read only");
        return -EINVAL;
    }
    if (h.gtes > VMDK_MAX_GTES) {
        vimg_error_set(err, EINVAL, "L2 table size too big");
        return -EINVAL;
    }
    l1e = (uint32_t)(h.gtes * h.grain);
    if (0 == l1e) {
        vimg_error_set(err, EINVAL, "L1 entry size is invalid");
        return -EINVAL;
    }
    l1 = h.capacity / l1e + (0 != h.capacity % l1e);
    if (fsize / VMDK_SECTOR < h.overhead) {
        vimg_error_set(err, EINVAL, "File truncated, expecting at least %" PRId64 " bytes",
                       (int64_t)(h.overhead * VMDK_SECTOR));
        return -EINVAL;
    }
    if ((ret = vmdk_check_tables(e, h.grain, l1, err)) < 0) {
        return ret;
    }
    /* qemu's entry size is truncated to 32 bits; ours must be exact */
    if ((uint64_t)h.gtes * h.grain != l1e) {
        vimg_error_set(err, EINVAL, "L1 entry size is invalid");
        return -EINVAL;
    }
    if (!vimg_mul_ok(h.capacity, VMDK_SECTOR, &cap_bytes) || cap_bytes > INT64_MAX ||
        h.gd_off > UINT64_MAX / VMDK_SECTOR || h.rgd_off > UINT64_MAX / VMDK_SECTOR) {
        vimg_error_set(err, EINVAL, "'%s': capacity or table offsets out of range",
                       e->file->name);
        return -EINVAL;
    }
    e->kind = VMDK_EXT_SPARSE;
    e->version = h.version;
    e->hflags = h.flags;
    e->length = cap_bytes;
    e->grain = h.grain * VMDK_SECTOR;
    e->gtes = h.gtes;
    e->esize = 4;
    e->gt_cover = l1e * VMDK_SECTOR;
    e->l1_size = (uint32_t)l1;
    e->gd_off = h.gd_off * VMDK_SECTOR;
    e->rgd_off = (h.flags & VMDK4_FLAG_RGD) ? h.rgd_off * VMDK_SECTOR : 0;
    e->overhead = h.overhead * VMDK_SECTOR;
    e->markers = h.flags & VMDK4_FLAG_MARKER;
    e->zeroed = h.flags & VMDK4_FLAG_ZERO_GRAIN;
    if (e->compressed) {
        if (top) {
            strcpy(s->create_type, "streamOptimized");
        }
        if (e->grain > (16u << 20)) {
            vimg_error_set(err, EFBIG, "'%s': grain size %" PRIu64 " is too large for a "
                           "compressed extent", e->file->name, e->grain);
            return -EFBIG;
        }
    }
    gd_bytes = (uint64_t)e->l1_size * 4;
    if ((ret = vmdk_check_inside(e, fsize, e->gd_off, gd_bytes, "grain directory", err)) < 0 ||
        (e->rgd_off && (ret = vmdk_check_inside(e, fsize, e->rgd_off, gd_bytes,
                                                "redundant grain directory", err)) < 0)) {
        return ret;
    }
    if ((ret = vmdk_read_table(e, e->gd_off, e->l1_size, 4, &e->gd, err)) < 0) {
        return ret;
    }
    if (e->rgd_off) {
        uint64_t *t;
        if ((ret = vmdk_read_table(e, e->rgd_off, e->l1_size, 4, &t, err)) < 0) {
            return ret;
        }
        e->rgd = malloc((e->l1_size ? e->l1_size : 1) * sizeof(uint32_t));
        if (!e->rgd) {
            free(t);
            vimg_error_set(err, ENOMEM, "out of memory");
            return -ENOMEM;
        }
        for (uint32_t i = 0; i < e->l1_size; i++) {
            e->rgd[i] = (uint32_t)t[i];
        }
        free(t);
    }
    {
        uint64_t sectors = vimg_div_round_up(fsize, VMDK_SECTOR), r = 0;
        vimg_round_up(sectors, h.grain, &r);
        e->next_alloc = r * VMDK_SECTOR;
    }
    if (e->gd_at_end && e->compressed && (img->flags & VIMG_OPEN_RDWR)) {
        e->st.active = true;
        e->st.append = e->st.trailer;
    } else if (e->gd_at_end && (img->flags & VIMG_OPEN_RDWR)) {
        e->readonly = true;
    }
    return 0;
}

/* ---- ESX sparse ("COWD") -------------------------------------------------- */

static int vmdk_open_cowd(struct vimg_image *img, struct vmdk_extent *e,
                          struct vimg_error *err)
{
    uint8_t hb[32];
    uint64_t fsize, cover, need;
    uint32_t cap, grain, gd, l1;
    int ret;

    if ((ret = vmdk_fsize(e->file, &fsize, err)) < 0) {
        return ret;
    }
    ret = vimg_file_pread(e->file, hb, sizeof(hb), 0);
    if (ret < 0) {
        vimg_error_set(err, -ret, "Could not read header from file '%s'", e->file->name);
        return ret;
    }
    cap = vimg_ld_le32(hb + 12);
    grain = vimg_ld_le32(hb + 16);
    gd = vimg_ld_le32(hb + 20);
    l1 = vimg_ld_le32(hb + 24);
    if ((ret = vmdk_check_tables(e, grain, l1, err)) < 0) {
        return ret;
    }
    e->kind = VMDK_EXT_COWD;
    e->length = (uint64_t)cap * VMDK_SECTOR;
    e->grain = (uint64_t)grain * VMDK_SECTOR;
    e->gtes = VMDK_COWD_GTES;
    e->esize = 4;
    e->gt_cover = e->grain * VMDK_COWD_GTES;
    e->l1_size = l1;
    e->gd_off = (uint64_t)gd * VMDK_SECTOR;
    cover = (uint64_t)l1 * e->gt_cover;
    if (cover < e->length) {
        vimg_error_set(err, EINVAL, "'%s': grain directory of %" PRIu32 " entries does not "
                       "cover the capacity", e->file->name, l1);
        return -EINVAL;
    }
    if ((ret = vmdk_check_inside(e, fsize, e->gd_off, (uint64_t)l1 * 4, "grain directory",
                                 err)) < 0) {
        return ret;
    }
    if ((ret = vmdk_read_table(e, e->gd_off, l1, 4, &e->gd, err)) < 0) {
        return ret;
    }
    need = vimg_div_round_up(fsize, VMDK_SECTOR);
    vimg_round_up(need, grain, &need);
    e->next_alloc = need * VMDK_SECTOR;
    return 0;
}

/* ---- seSparse (read-only) -------------------------------------------------- */

static int vmdk_open_sesparse(struct vimg_image *img, struct vmdk_extent *e,
                              struct vimg_error *err)
{
    uint8_t h[512], v[512];
    uint64_t fsize, cap, gd_off, gd_size, gt_off, grains_off, vol_off, l1;
    int ret;

    if (img->flags & VIMG_OPEN_RDWR) {
        vimg_error_set(err, EACCES, "No write support for seSparse images available");
        return -EACCES;
    }
    if ((ret = vmdk_fsize(e->file, &fsize, err)) < 0) {
        return ret;
    }
    if ((ret = vimg_file_pread(e->file, h, sizeof(h), 0)) < 0) {
        return vmdk_io_error(err, ret, "reading", e->file, 0);
    }
    /* undocumented format: accept only what qemu accepts */
    if (VMDK_SESPARSE_MAGIC != vimg_ld_le64(h) ||
        0x0000000200000001ull != vimg_ld_le64(h + 8) || 8 != vimg_ld_le64(h + 24) ||
        64 != vimg_ld_le64(h + 32) || 0 != vimg_ld_le64(h + 40)) {
        vimg_error_set(err, EINVAL, "Bad const header magic: 0x%016" PRIx64,
                       vimg_ld_le64(h));
        return -EINVAL;
    }
    for (int i = 208; i < 512; i++) {
        if (h[i]) {
            vimg_error_set(err, EINVAL, "Unsupported pad for const header");
            return -EINVAL;
        }
    }
    cap = vimg_ld_le64(h + 16);
    vol_off = vimg_ld_le64(h + 80);
    gd_off = vimg_ld_le64(h + 128);
    gd_size = vimg_ld_le64(h + 136);
    gt_off = vimg_ld_le64(h + 144);
    grains_off = vimg_ld_le64(h + 192);
    if (vol_off > UINT64_MAX / VMDK_SECTOR ||
        (ret = vimg_file_pread(e->file, v, sizeof(v), vol_off * VMDK_SECTOR)) < 0) {
        vimg_error_set(err, EINVAL, "'%s': bad volatile header offset", e->file->name);
        return -EINVAL;
    }
    if (0xcafecafeull != vimg_ld_le64(v)) {
        vimg_error_set(err, EINVAL, "Bad volatile header magic: 0x%016" PRIx64,
                       vimg_ld_le64(v));
        return -EINVAL;
    }
    if (vimg_ld_le64(v + 24)) {
        vimg_error_set(err, EINVAL, "Image is dirty, Replaying journal not supported");
        return -EINVAL;
    }
    if (cap > INT64_MAX / VMDK_SECTOR || gd_off > UINT64_MAX / VMDK_SECTOR ||
        gt_off > UINT64_MAX / VMDK_SECTOR || grains_off > UINT64_MAX / VMDK_SECTOR ||
        gd_size > UINT64_MAX / VMDK_SECTOR) {
        vimg_error_set(err, EINVAL, "'%s': header offsets out of range", e->file->name);
        return -EINVAL;
    }
    l1 = gd_size * VMDK_SECTOR / 8;
    if ((ret = vmdk_check_tables(e, 8, l1, err)) < 0) {
        return ret;
    }
    e->kind = VMDK_EXT_SESPARSE;
    e->readonly = true;
    e->length = cap * VMDK_SECTOR;
    e->grain = 8 * VMDK_SECTOR;
    e->gtes = VMDK_SES_GTES;
    e->esize = 8;
    e->gt_cover = e->grain * VMDK_SES_GTES;
    e->l1_size = (uint32_t)l1;
    e->gd_off = gd_off * VMDK_SECTOR;
    e->ses_gt_off = gt_off * VMDK_SECTOR;
    e->ses_grain_off = grains_off * VMDK_SECTOR;
    if ((uint64_t)e->l1_size * e->gt_cover < e->length) {
        vimg_error_set(err, EINVAL, "'%s': grain directory does not cover the capacity",
                       e->file->name);
        return -EINVAL;
    }
    if ((ret = vmdk_check_inside(e, fsize, e->gd_off, l1 * 8, "grain directory", err)) < 0) {
        return ret;
    }
    return vmdk_read_table(e, e->gd_off, e->l1_size, 8, &e->gd, err);
}

/* ---- descriptor files ------------------------------------------------------ */

static int vmdk_open_sparse_file(struct vimg_image *img, struct vmdk_extent *e, bool top,
                                 struct vimg_error *err)
{
    uint8_t magic[4];
    uint64_t fsize;
    int ret;

    if ((ret = vmdk_fsize(e->file, &fsize, err)) < 0) {
        return ret;
    }
    if (fsize < 4) {
        vimg_error_set(err, EINVAL, "File is too small, not a valid image");
        return -EINVAL;
    }
    if ((ret = vimg_file_pread(e->file, magic, 4, 0)) < 0) {
        return vmdk_io_error(err, ret, "reading", e->file, 0);
    }
    switch (vimg_ld_be32(magic)) {
    case VMDK3_MAGIC:
        return vmdk_open_cowd(img, e, err);
    case VMDK4_MAGIC:
        return vmdk_open_vmdk4(img, e, top, err);
    default:
        vimg_error_set(err, EINVAL, "Image not in VMDK format");
        return -EINVAL;
    }
}

static int vmdk_open_desc_text(struct vimg_image *img, const char *text,
                               struct vimg_error *err)
{
    struct vmdk_state *s = img->opaque;
    struct vmdk_desc d;
    uint64_t start = 0;
    int ret = vmdk_desc_parse(text, &d, err);

    if (ret < 0) {
        return ret;
    }
    snprintf(s->create_type, sizeof(s->create_type), "%s", d.create_type);
    s->desc_offset = 0;
    s->n_skipped = d.n_skipped;
    for (size_t i = 0; i < d.n_extents && 0 == ret; i++) {
        const struct vmdk_desc_extent *x = &d.extents[i];
        struct vmdk_extent *e = vmdk_new_extent(s, err);
        if (!e) {
            ret = -ENOMEM;
            break;
        }
        e->type = strdup(x->type);
        if (!e->type) {
            vimg_error_set(err, ENOMEM, "out of memory");
            ret = -ENOMEM;
            break;
        }
        ret = vimg_internal_open_child(img, x->fname, "extent", &e->file, err);
        if (ret < 0) {
            e->file = NULL;
            break;
        }
        e->owns_file = true;
        if (0 == strcmp(x->type, "FLAT") || 0 == strcmp(x->type, "VMFS")) {
            e->kind = VMDK_EXT_FLAT;
            if ((uint64_t)x->sectors > INT64_MAX / VMDK_SECTOR ||
                (uint64_t)x->offset > INT64_MAX / VMDK_SECTOR) {
                vimg_error_set(err, EINVAL, "Invalid extent line: extent '%s' is too large",
                               x->fname);
                ret = -EINVAL;
                break;
            }
            e->length = (uint64_t)x->sectors * VMDK_SECTOR;
            e->flat_off = (uint64_t)x->offset * VMDK_SECTOR;
        } else if (0 == strcmp(x->type, "SESPARSE")) {
            ret = vmdk_open_sesparse(img, e, err);
        } else {
            ret = vmdk_open_sparse_file(img, e, false, err);
        }
        if (0 == ret) {
            e->start = start;
            if (!vimg_add_ok(start, e->length, &start) || start > INT64_MAX) {
                vimg_error_set(err, EFBIG, "'%s': the extents add up to more than 8 EiB",
                               img->filename);
                ret = -EFBIG;
            }
        }
    }
    vmdk_desc_free(&d);
    return ret;
}

/* ---- open / close ---------------------------------------------------------- */

static int vmdk_probe(const uint8_t *buf, size_t len, const char *filename)
{
    return vmdk_probe_text(buf, len);
}

static void vmdk_free_all(struct vmdk_state *s)
{
    for (size_t i = 0; i < s->n; i++) {
        vmdk_extent_free(&s->ext[i]);
    }
    free(s->ext);
    s->ext = NULL;
    s->n = 0;
}

static void vmdk_close(struct vimg_image *img)
{
    struct vmdk_state *s = img->opaque;
    struct vimg_error err = { 0 };

    vmdk_append_commit(img, &err);
    for (size_t i = 0; i < s->n; i++) {
        if (s->ext[i].st.active) {
            vmdk_stream_finish(img, &s->ext[i], &err);
        }
    }
    vmdk_free_all(s);
}

static int vmdk_open_inner(struct vimg_image *img, unsigned flags, struct vimg_error *err)
{
    struct vmdk_state *s = img->opaque;
    uint64_t fsize, total = 0;
    char *buf, *hint = NULL;
    size_t n;
    int ret;

    if ((ret = vmdk_fsize(img->file, &fsize, err)) < 0) {
        return ret;
    }
    if (fsize < 4) {
        vimg_error_set(err, EINVAL, "File is too small, not a valid image");
        return -EINVAL;
    }
    n = (size_t)VIMG_MIN(fsize, (uint64_t)VMDK_DESC_READ_MAX);
    buf = calloc(1, n + 1);
    if (!buf) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    if ((ret = vimg_file_pread(img->file, buf, n, 0)) < 0) {
        free(buf);
        vimg_error_set(err, -ret, "Could not read from file: %s", strerror(-ret));
        return ret;
    }
    if (VMDK4_MAGIC == vimg_ld_be32(buf) || VMDK3_MAGIC == vimg_ld_be32(buf)) {
        struct vmdk_extent *e = vmdk_new_extent(s, err);
        ret = e ? 0 : -ENOMEM;
        if (e) {
            e->file = img->file;
            ret = vmdk_open_sparse_file(img, e, true, err);
        }
        s->desc_offset = 0x200;
    } else {
        ret = vmdk_open_desc_text(img, buf, err);
    }
    free(buf);
    if (ret < 0) {
        return ret;
    }
    if (0 == s->n) {
        /* qemu 7.2 opens this and then aborts; refuse it */
        vimg_error_set(err, EINVAL, "'%s': the descriptor names no usable extent",
                       img->filename);
        return -EINVAL;
    }

    /* CID, parent CID and the parent hint live in the first 10 KiB */
    char area[VMDK_DESC_SIZE + 1];
    memset(area, 0, sizeof(area));
    if ((ret = vimg_file_pread(img->file, area, VMDK_DESC_SIZE, s->desc_offset)) < 0) {
        return vmdk_io_error(err, ret, "reading", img->file, s->desc_offset);
    }
    area[VMDK_DESC_SIZE - 1] = '\0';
    if (vmdk_desc_hint(area, &hint) < 0 || vmdk_desc_cid(area, false, &s->cid) < 0 ||
        vmdk_desc_cid(area, true, &s->parent_cid) < 0) {
        free(hint);
        vimg_error_set(err, EINVAL, "Could not open '%s': %s", img->filename,
                       strerror(EINVAL));
        return -EINVAL;
    }
    if (hint) {
        ret = vimg_internal_set_backing(img, hint, "vmdk");
        free(hint);
        if (ret < 0) {
            vimg_error_set(err, ENOMEM, "out of memory");
            return ret;
        }
    }
    for (size_t i = 0; i < s->n; i++) {
        total = s->ext[i].start + s->ext[i].length;
    }
    img->size = total;
    img->limits.request_align = 1;
    {
        bool same = true;
        for (size_t i = 1; i < s->n; i++) {
            const struct vmdk_extent *a = &s->ext[0], *b = &s->ext[i];
            same &= (VMDK_EXT_FLAT == a->kind) == (VMDK_EXT_FLAT == b->kind) &&
                    a->compressed == b->compressed &&
                    (VMDK_EXT_FLAT == a->kind || a->grain == b->grain);
        }
        if (same && VMDK_EXT_FLAT != s->ext[0].kind) {
            img->limits.cluster_size = s->ext[0].grain;
        }
        if (same) {
            img->limits.needs_compressed_writes = s->ext[0].compressed;
        }
    }
    return 0;
}

static int vmdk_open(struct vimg_image *img, unsigned flags, struct vimg_error *err)
{
    struct vmdk_state *s = img->opaque;
    int ret = vmdk_open_inner(img, flags, err);

    if (ret < 0) {
        vmdk_free_all(s);
        if (EAGAIN != err->code) {
            vimg_error_prefix(err, "Could not open '%s': ", img->filename);
        }
    }
    return ret;
}

/* ---- lookups --------------------------------------------------------------- */

struct vmdk_extent *vmdk_find(struct vmdk_state *s, uint64_t off)
{
    size_t lo = 0, hi = s->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (off < s->ext[mid].start) {
            hi = mid;
        } else if (off >= s->ext[mid].start + s->ext[mid].length) {
            lo = mid + 1;
        } else {
            return &s->ext[mid];
        }
    }
    return NULL;
}

static uint64_t vmdk_gt_bytes(const struct vmdk_extent *e)
{
    return (uint64_t)e->gtes * e->esize;
}

int vmdk_gt_load(struct vimg_image *img, struct vmdk_extent *e, uint64_t gt_off,
                 uint8_t **out, struct vimg_error *err)
{
    struct vmdk_gt_slot *victim = &e->cache[0];
    uint64_t bytes = vmdk_gt_bytes(e), fsize;
    int ret;

    for (int i = 0; i < VMDK_GT_CACHE; i++) {
        if (e->cache[i].buf && e->cache[i].off == gt_off) {
            e->cache[i].stamp = ++e->stamp;
            *out = e->cache[i].buf;
            return 0;
        }
        if (!e->cache[i].buf || e->cache[i].stamp < victim->stamp) {
            victim = &e->cache[i];
        }
    }
    if ((ret = vmdk_fsize(e->file, &fsize, err)) < 0) {
        return ret;
    }
    if ((ret = vmdk_check_inside(e, fsize, gt_off, bytes, "grain table", err)) < 0) {
        return ret;
    }
    if (!victim->buf && !(victim->buf = malloc(bytes))) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    victim->off = 0;
    if ((ret = vimg_file_pread(e->file, victim->buf, bytes, gt_off)) < 0) {
        return vmdk_io_error(err, ret, "reading", e->file, gt_off);
    }
    victim->off = gt_off;
    victim->stamp = ++e->stamp;
    *out = victim->buf;
    return 0;
}

static void vmdk_gt_cache_update(struct vmdk_extent *e, uint64_t gt_off, uint32_t idx,
                                 uint32_t val)
{
    for (int i = 0; i < VMDK_GT_CACHE; i++) {
        if (e->cache[i].buf && e->cache[i].off == gt_off) {
            vimg_st_le32(e->cache[i].buf + (size_t)idx * 4, val);
        }
    }
}

void vmdk_gt_cache_drop(struct vmdk_extent *e, uint64_t gt_off)
{
    for (int i = 0; i < VMDK_GT_CACHE; i++) {
        if (e->cache[i].buf && e->cache[i].off == gt_off) {
            e->cache[i].off = 0;
            free(e->cache[i].buf);
            e->cache[i].buf = NULL;
        }
    }
}

enum vmdk_grain_state { VMDK_G_UNALLOC, VMDK_G_ZERO, VMDK_G_DATA };

/* Where the GT for GD index gi lies (bytes), 0 when unallocated. */
static int vmdk_gt_offset(struct vmdk_extent *e, uint64_t gi, uint64_t *gt_off,
                          struct vimg_error *err)
{
    uint64_t v = e->gd[gi];
    if (VMDK_EXT_SESPARSE == e->kind) {
        if (0 == v) {
            *gt_off = 0;
            return 0;
        }
        if (0x1000000000000000ull != (v & 0xffffffff00000000ull)) {
            vimg_error_set(err, EIO, "'%s': invalid grain directory entry %" PRIu64,
                           e->file->name, gi);
            return -EIO;
        }
        *gt_off = e->ses_gt_off + (v & 0xffffffffull) * vmdk_gt_bytes(e);
        return 0;
    }
    *gt_off = v * VMDK_SECTOR;
    return 0;
}

/* Grain state of extent-relative offset r, with its host byte offset (of
 * the grain start) for DATA. */
static int vmdk_grain(struct vimg_image *img, struct vmdk_extent *e, uint64_t r,
                      enum vmdk_grain_state *st, uint64_t *host, uint64_t *gte_out,
                      struct vimg_error *err)
{
    uint64_t gi = r / e->gt_cover, ti = (r % e->gt_cover) / e->grain, gt_off, v;
    uint8_t *gt;
    int ret;

    *host = 0;
    *gte_out = 0;
    if (gi >= e->l1_size) {
        vimg_error_set(err, EIO, "'%s': offset %" PRIu64 " lies beyond the grain directory",
                       e->file->name, r);
        return -EIO;
    }
    if (e->st.active && e->st.open_gt == (int64_t)gi) {
        v = e->st.gt[ti];
        goto classify;
    }
    if ((ret = vmdk_gt_offset(e, gi, &gt_off, err)) < 0) {
        return ret;
    }
    if (0 == gt_off) {
        *st = VMDK_G_UNALLOC;
        return 0;
    }
    if ((ret = vmdk_gt_load(img, e, gt_off, &gt, err)) < 0) {
        return ret;
    }
    if (VMDK_EXT_SESPARSE == e->kind) {
        v = vimg_ld_le64(gt + ti * 8);
        switch (v >> 60) {
        case 0:
            if (v) {
                goto bad;
            }
            *st = VMDK_G_UNALLOC;
            return 0;
        case 1:
        case 2:
            *st = VMDK_G_ZERO;
            return 0;
        case 3: {
            uint64_t idx = ((v & 0x0fff000000000000ull) >> 48) |
                           ((v & 0x0000ffffffffffffull) << 12);
            if (idx > (UINT64_MAX - e->ses_grain_off) / e->grain) {
                goto bad;
            }
            *host = e->ses_grain_off + idx * e->grain;
            *st = VMDK_G_DATA;
            return 0;
        }
        default:
            goto bad;
        }
    }
    v = vimg_ld_le32(gt + ti * 4);
classify:
    *gte_out = v;
    if (0 == v) {
        *st = VMDK_G_UNALLOC;
    } else if (e->zeroed && VMDK_GTE_ZEROED == v) {
        *st = VMDK_G_ZERO;
    } else {
        *st = VMDK_G_DATA;
        *host = v * VMDK_SECTOR;
    }
    return 0;
bad:
    vimg_error_set(err, EIO, "'%s': invalid grain table entry 0x%" PRIx64, e->file->name, v);
    return -EIO;
}

static int vmdk_block_status(struct vimg_image *img, uint64_t offset, uint64_t max_len,
                             struct vimg_run *run, struct vimg_error *err)
{
    struct vmdk_state *s = img->opaque;
    struct vmdk_extent *e = vmdk_find(s, offset);
    uint64_t r, end, fsize = 0;
    enum vmdk_grain_state st;
    uint64_t host, gte, len;
    int ret;

    if (!e) {
        vimg_error_set(err, EIO, "'%s': no extent at offset %" PRIu64, img->filename, offset);
        return -EIO;
    }
    r = offset - e->start;
    end = VIMG_MIN(e->length, r + max_len);
    if (VMDK_EXT_FLAT == e->kind) {
        bool is_data = true;
        uint64_t n = end - r;
        run->flags = VIMG_RUN_DATA | VIMG_RUN_ALLOCATED | VIMG_RUN_HOST_VALID;
        run->host = e->file;
        run->host_off = e->flat_off + r;
        ret = e->file->ops->extent(e->file, run->host_off, n, &is_data, &n);
        if (ret < 0) {
            vimg_error_set(err, -ret, "Could not read file metadata: %s", strerror(-ret));
            return ret;
        }
        if (!is_data) {
            run->flags |= VIMG_RUN_ZERO;
        }
        run->length = VIMG_MAX(n, 1);
        return 0;
    }
    if ((ret = vmdk_grain(img, e, r, &st, &host, &gte, err)) < 0) {
        return ret;
    }
    if (VMDK_G_DATA == st && e->compressed) {
        run->flags = VIMG_RUN_DATA | VIMG_RUN_ALLOCATED | VIMG_RUN_COMPRESSED;
    } else if (VMDK_G_DATA == st) {
        if ((ret = vmdk_fsize(e->file, &fsize, err)) < 0) {
            return ret;
        }
        if (host >= fsize) {
            vimg_error_set(err, EIO, "'%s': grain for offset %" PRIu64 " lies beyond the end "
                           "of the file", e->file->name, offset);
            return -EIO;
        }
        run->flags = VIMG_RUN_DATA | VIMG_RUN_ALLOCATED | VIMG_RUN_HOST_VALID;
        run->host = e->file;
        run->host_off = host + r % e->grain;
    } else if (VMDK_G_ZERO == st) {
        run->flags = VIMG_RUN_ZERO | VIMG_RUN_ALLOCATED;
    } else {
        run->flags = 0;
    }
    /* Extend over the following grains of the same GT in the same state
     * (and, for plain data, contiguous on the host): no extra I/O. */
    len = VIMG_MIN(e->grain - r % e->grain, end - r);
    {
        uint64_t gi = r / e->gt_cover, gt_off = 1;
        uint64_t limit = VIMG_MIN(end, (gi + 1) * e->gt_cover);
        if (VMDK_G_UNALLOC == st && !(e->st.active && e->st.open_gt == (int64_t)gi) &&
            (ret = vmdk_gt_offset(e, gi, &gt_off, err)) < 0) {
            return ret;
        }
        if (0 == gt_off) {
            len = limit - r;   /* the whole GT is missing */
        }
        while (r + len < limit) {
            enum vmdk_grain_state st2;
            uint64_t host2, gte2;
            struct vimg_error e2 = { 0 };
            /* a bad entry ends the run here; the next call reports it */
            if (vmdk_grain(img, e, r + len, &st2, &host2, &gte2, &e2) < 0) {
                break;
            }
            if (st2 != st) {
                break;
            }
            if (VMDK_G_DATA == st && !e->compressed) {
                if (host2 != run->host_off + len || host2 >= fsize) {
                    break;
                }
            }
            len += VIMG_MIN(e->grain, limit - (r + len));
        }
    }
    run->length = len;
    return 0;
}

/* ---- compressed grains ----------------------------------------------------- */

int vmdk_read_compressed(struct vimg_image *img, struct vmdk_extent *e, uint64_t gte,
                         uint64_t r, void *buf, size_t len, struct vimg_error *err)
{
    uint64_t off = gte * VMDK_SECTOR, data_len = e->grain, in_grain = r % e->grain;
    uint8_t mk[12];
    uint8_t *cbuf = NULL, *out = NULL;
    size_t out_len = 0;
    int ret;

    if (e->markers) {
        if ((ret = vimg_file_pread(e->file, mk, sizeof(mk), off)) < 0) {
            return vmdk_io_error(err, ret, "reading", e->file, off);
        }
        data_len = vimg_ld_le32(mk + 8);
        off += sizeof(mk);
    }
    if (0 == data_len || data_len > 2 * e->grain) {
        vimg_error_set(err, EINVAL, "'%s': compressed grain at sector %" PRIu64 " has an "
                       "invalid size %" PRIu64, e->file->name, gte, data_len);
        return -EINVAL;
    }
    cbuf = malloc(data_len);
    out = malloc(e->grain);
    if (!cbuf || !out) {
        free(cbuf);
        free(out);
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    if ((ret = vimg_file_pread(e->file, cbuf, data_len, off)) < 0) {
        vmdk_io_error(err, ret, "reading", e->file, off);
        goto out;
    }
    if (vimg_zlib_uncompress(out, e->grain, &out_len, cbuf, data_len) < 0 ||
        in_grain + len > out_len) {
        vimg_error_set(err, EINVAL, "'%s': compressed grain at sector %" PRIu64 " is corrupt",
                       e->file->name, gte);
        ret = -EINVAL;
        goto out;
    }
    memcpy(buf, out + in_grain, len);
    ret = 0;
out:
    free(cbuf);
    free(out);
    return ret;
}

static int vmdk_read_special(struct vimg_image *img, void *buf, size_t len, uint64_t offset,
                             struct vimg_error *err)
{
    struct vmdk_state *s = img->opaque;
    uint8_t *p = buf;

    while (len) {
        struct vmdk_extent *e = vmdk_find(s, offset);
        enum vmdk_grain_state st;
        uint64_t host, gte, r;
        size_t n;
        int ret;

        if (!e) {
            vimg_error_set(err, EIO, "'%s': no extent at offset %" PRIu64, img->filename,
                           offset);
            return -EIO;
        }
        r = offset - e->start;
        n = (size_t)VIMG_MIN((uint64_t)len, VIMG_MIN(e->grain - r % e->grain, e->length - r));
        if (VMDK_EXT_FLAT == e->kind) {
            n = (size_t)VIMG_MIN((uint64_t)len, e->length - r);
            ret = vimg_file_pread(e->file, p, n, e->flat_off + r);
            if (ret < 0) {
                return vmdk_io_error(err, ret, "reading", e->file, e->flat_off + r);
            }
        } else {
            if ((ret = vmdk_grain(img, e, r, &st, &host, &gte, err)) < 0) {
                return ret;
            }
            if (VMDK_G_DATA != st) {
                memset(p, 0, n);   /* the core only asks for DATA runs */
            } else if (e->compressed) {
                if ((ret = vmdk_read_compressed(img, e, gte, r, p, n, err)) < 0) {
                    return ret;
                }
            } else if ((ret = vimg_file_pread(e->file, p, n, host + r % e->grain)) < 0) {
                return vmdk_io_error(err, ret, "reading", e->file, host + r % e->grain);
            }
        }
        p += n;
        offset += n;
        len -= n;
    }
    return 0;
}

/* ---- writes ----------------------------------------------------------------- */

/* qemu's CID rewrite: everything between "CID=" and "parentCID" becomes
 * the new value. */
static int vmdk_write_cid(struct vimg_image *img, uint32_t cid, struct vimg_error *err)
{
    struct vmdk_state *s = img->opaque;
    uint64_t size = VMDK_DESC_SIZE;
    char *desc, *tail, *p;
    int ret;

    if (0 == s->desc_offset) {
        if ((ret = vmdk_fsize(img->file, &size, err)) < 0) {
            return ret;
        }
        vimg_round_up(size, VMDK_SECTOR, &size);
        if (size > VMDK_DESC_WRITE_MAX) {
            vimg_error_set(err, EFBIG, "VMDK description file too big");
            return -EFBIG;
        }
    }
    if (0 != s->desc_offset) {
        size = s->desc_room;
    }
    if (0 == size) {
        return 0;
    }
    desc = calloc(1, size + 1);
    if (!desc) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    if ((ret = vimg_file_pread(img->file, desc, size, s->desc_offset)) < 0) {
        free(desc);
        return vmdk_io_error(err, ret, "reading", img->file, s->desc_offset);
    }
    desc[size - 1] = '\0';
    p = strstr(desc, "parentCID");
    if (!p) {
        free(desc);
        vimg_error_set(err, EINVAL, "'%s': descriptor has no parentCID", img->filename);
        return -EINVAL;
    }
    tail = strdup(p);
    if (!tail) {
        free(desc);
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    p = strstr(desc, "CID");
    if (p && (size_t)(p + 4 - desc) < size) {
        size_t at = (size_t)(p + 4 - desc), used;
        snprintf(p + 4, size - at, "%" PRIx32 "\n", cid);
        used = strlen(desc);
        snprintf(desc + used, size - used, "%s", tail);
    }
    free(tail);
    ret = vimg_file_pwrite(img->file, desc, size, s->desc_offset);
    if (0 == ret) {
        ret = vimg_file_sync(img->file);
    }
    free(desc);
    if (ret < 0) {
        return vmdk_io_error(err, ret, "writing", img->file, s->desc_offset);
    }
    s->cid = cid;
    return 0;
}

int vmdk_cid_update(struct vimg_image *img, struct vimg_error *err)
{
    struct vmdk_state *s = img->opaque;
    int ret;
    if (s->cid_updated) {
        return 0;
    }
    ret = vmdk_write_cid(img, vmdk_random_cid(), err);
    if (0 == ret) {
        s->cid_updated = true;
    }
    return ret;
}

/* The parent must still be the image the child was made from. */
static bool vmdk_parent_valid(struct vimg_image *img)
{
    struct vmdk_state *s = img->opaque;
    if (!img->backing) {
        return true;
    }
    if (img->backing->drv != &vimg_driver_vmdk) {
        return false;
    }
    return ((struct vmdk_state *)img->backing->opaque)->cid == s->parent_cid;
}

/* As qemu: reads that fall through to a parent whose CID is not our
 * parentCID fail (the parent changed since this image was made from it). */
static int vmdk_backing_opened(struct vimg_image *img, struct vimg_error *err)
{
    (void)err;
    if (!vmdk_parent_valid(img)) {
        img->backing_read_err = EINVAL;
    }
    return 0;
}

int vmdk_check_alloc(struct vmdk_extent *e, uint64_t bytes, struct vimg_error *err)
{
    uint64_t end;
    if (!vimg_add_ok(e->next_alloc, bytes, &end) ||
        end / VMDK_SECTOR > VMDK_MAX_ALLOC_SECTOR) {
        vimg_error_set(err, ENOSPC, "'%s': the extent file is full (grains must lie below "
                       "2 TiB)", e->file->name);
        return -ENOSPC;
    }
    return 0;
}

/* Put a GTE (primary, then redundant). */
static int vmdk_gte_set(struct vmdk_extent *e, uint64_t gi, uint64_t ti, uint32_t val,
                        struct vimg_error *err)
{
    uint8_t b[4];
    uint64_t off = e->gd[gi] * VMDK_SECTOR + ti * 4;
    int ret;

    vimg_st_le32(b, val);
    if ((ret = vimg_file_pwrite(e->file, b, 4, off)) < 0) {
        return vmdk_io_error(err, ret, "writing", e->file, off);
    }
    vmdk_gt_cache_update(e, e->gd[gi] * VMDK_SECTOR, (uint32_t)ti, val);
    if (e->rgd && e->rgd[gi]) {
        off = (uint64_t)e->rgd[gi] * VMDK_SECTOR + ti * 4;
        if ((ret = vimg_file_pwrite(e->file, b, 4, off)) < 0) {
            return vmdk_io_error(err, ret, "writing", e->file, off);
        }
        vmdk_gt_cache_update(e, (uint64_t)e->rgd[gi] * VMDK_SECTOR, (uint32_t)ti, val);
    }
    return 0;
}

/* A GD entry of 0: give the GT (and its redundant copy) a home.  qemu 7.2
 * cannot, and wrote the data over the header instead. */
static int vmdk_gt_alloc(struct vmdk_extent *e, uint64_t gi, struct vimg_error *err)
{
    uint64_t bytes, copies = (e->rgd && !e->rgd[gi]) ? 2 : 1;
    uint8_t *zeros;
    uint8_t b[4];
    int ret;

    vimg_round_up(vmdk_gt_bytes(e), VMDK_SECTOR, &bytes);
    if ((ret = vmdk_check_alloc(e, bytes * copies, err)) < 0) {
        return ret;
    }
    zeros = calloc(1, bytes);
    if (!zeros) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    for (uint64_t c = 0; c < copies; c++) {
        uint64_t off = e->next_alloc, gdoff;
        if ((ret = vimg_file_pwrite(e->file, zeros, bytes, off)) < 0) {
            free(zeros);
            return vmdk_io_error(err, ret, "writing", e->file, off);
        }
        e->next_alloc += bytes;
        vimg_st_le32(b, (uint32_t)(off / VMDK_SECTOR));
        gdoff = (0 == c ? e->gd_off : e->rgd_off) + gi * 4;
        if ((ret = vimg_file_pwrite(e->file, b, 4, gdoff)) < 0) {
            free(zeros);
            return vmdk_io_error(err, ret, "writing", e->file, gdoff);
        }
        if (0 == c) {
            e->gd[gi] = off / VMDK_SECTOR;
        } else {
            e->rgd[gi] = (uint32_t)(off / VMDK_SECTOR);
        }
    }
    free(zeros);
    /* grains stay grain-aligned, as qemu places them */
    {
        uint64_t a;
        if (vimg_round_up(e->next_alloc, e->grain, &a)) {
            e->next_alloc = a;
        }
    }
    return 0;
}

/* Fill [from, to) of a new grain at host with backing data (for guest
 * offset gbase + from) or zeros, in bounded pieces. */
static int vmdk_cow_fill(struct vimg_image *img, struct vmdk_extent *e, uint64_t host,
                         uint64_t gbase, uint64_t from, uint64_t to, bool use_backing,
                         struct vimg_error *err)
{
    static const size_t chunk = 1u << 20;
    uint8_t *b;
    int ret = 0;

    if (from >= to) {
        return 0;
    }
    b = malloc(VIMG_MIN(chunk, (size_t)(to - from)));
    if (!b) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    while (from < to && 0 == ret) {
        size_t n = (size_t)VIMG_MIN((uint64_t)chunk, to - from);
        memset(b, 0, n);
        if (use_backing) {
            /* the guest offset, in every extent (qemu used the offset
             * inside the extent) */
            uint64_t g = gbase + from;
            struct vimg_image *bk = img->backing;
            if (g < bk->size) {
                size_t m = (size_t)VIMG_MIN((uint64_t)n, bk->size - g);
                ret = vimg_pread(bk, b, m, g, err);
            }
        }
        if (0 == ret) {
            ret = vimg_file_pwrite(e->file, b, n, host + from);
            if (ret < 0) {
                vmdk_io_error(err, ret, "writing", e->file, host + from);
            }
        }
        from += n;
    }
    free(b);
    return ret;
}

static int vmdk_write_sparse(struct vimg_image *img, struct vmdk_extent *e, const uint8_t *buf,
                             size_t n, uint64_t r, struct vimg_error *err)
{
    uint64_t gi = r / e->gt_cover, ti = (r % e->gt_cover) / e->grain;
    uint64_t in = r % e->grain, host, gte, gsize, gbase;
    enum vmdk_grain_state st;
    int ret;

    if (0 == e->gd[gi]) {
        if ((ret = vmdk_gt_alloc(e, gi, err)) < 0) {
            return ret;
        }
    }
    if ((ret = vmdk_grain(img, e, r, &st, &host, &gte, err)) < 0) {
        return ret;
    }
    if (VMDK_G_DATA == st) {
        if (host < e->overhead || host < VMDK_SECTOR) {
            vimg_error_set(err, EIO, "'%s': grain table entry %" PRIu64 " points into the "
                           "metadata", e->file->name, gte);
            return -EIO;
        }
        if ((ret = vimg_file_pwrite(e->file, buf, n, host + in)) < 0) {
            return vmdk_io_error(err, ret, "writing", e->file, host + in);
        }
        return 0;
    }
    /* new grain: the whole grain first, then its GTE */
    gsize = VIMG_MIN(e->grain, e->length - (r - in));
    if ((ret = vmdk_check_alloc(e, e->grain, err)) < 0) {
        return ret;
    }
    host = e->next_alloc;
    gbase = e->start + (r - in);
    bool cow = img->backing && VMDK_G_ZERO != st;
    if (cow && !vmdk_parent_valid(img)) {
        vimg_error_set(err, EINVAL, "'%s': the parent CID does not match the backing "
                       "image's CID", img->filename);
        return -EINVAL;
    }
    if ((ret = vmdk_cow_fill(img, e, host, gbase, 0, in, cow, err)) < 0 ||
        (ret = vmdk_cow_fill(img, e, host, gbase, in + n, gsize, cow, err)) < 0 ||
        (ret = vmdk_cow_fill(img, e, host, gbase, VIMG_MAX(gsize, in + n), e->grain, false,
                             err)) < 0) {
        return ret;
    }
    if ((ret = vimg_file_pwrite(e->file, buf, n, host + in)) < 0) {
        return vmdk_io_error(err, ret, "writing", e->file, host + in);
    }
    e->next_alloc += e->grain;
    return vmdk_gte_set(e, gi, ti, (uint32_t)(host / VMDK_SECTOR), err);
}

/* qemu's path for a compressed extent laid out by qemu (GD at the front):
 * whole unallocated grains only, appended, GTEs updated in place. */
static int vmdk_put_qemu_stream(struct vimg_image *img, struct vmdk_extent *e, uint64_t r,
                                size_t n, const uint8_t *cdata, size_t clen,
                                struct vimg_error *err)
{
    uint64_t gi = r / e->gt_cover, ti = (r % e->gt_cover) / e->grain, host, gte;
    enum vmdk_grain_state st;
    uint8_t *rec;
    size_t reclen;
    int ret;

    if (r % e->grain || n > e->grain || (n < e->grain && r + n != e->length)) {
        vimg_error_set(err, EINVAL, "'%s': compressed writes must cover whole grains",
                       img->filename);
        return -EINVAL;
    }
    if (!e->markers) {
        vimg_error_set(err, EINVAL, "'%s': compressed extent without markers cannot be "
                       "written", img->filename);
        return -EINVAL;
    }
    if (0 == e->gd[gi] && (ret = vmdk_gt_alloc(e, gi, err)) < 0) {
        return ret;
    }
    if ((ret = vmdk_grain(img, e, r, &st, &host, &gte, err)) < 0) {
        return ret;
    }
    if (VMDK_G_DATA == st) {
        vimg_error_set(err, EIO, "Could not write to allocated cluster for streamOptimized");
        return -EIO;
    }
    reclen = (size_t)vimg_div_round_up(12 + clen, VMDK_SECTOR) * VMDK_SECTOR;
    if ((ret = vmdk_check_alloc(e, reclen, err)) < 0) {
        return ret;
    }
    rec = calloc(1, reclen);
    if (!rec) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    vimg_st_le64(rec, (e->start + r) / VMDK_SECTOR);
    vimg_st_le32(rec + 8, (uint32_t)clen);
    memcpy(rec + 12, cdata, clen);
    host = e->next_alloc;
    ret = vimg_file_pwrite(e->file, rec, reclen, host);
    free(rec);
    if (ret < 0) {
        return vmdk_io_error(err, ret, "writing", e->file, host);
    }
    e->next_alloc = host + reclen;
    return vmdk_gte_set(e, gi, ti, (uint32_t)(host / VMDK_SECTOR), err);
}

static int vmdk_write_qemu_stream(struct vimg_image *img, struct vmdk_extent *e,
                                  const uint8_t *buf, size_t n, uint64_t r,
                                  struct vimg_error *err)
{
    uint8_t *c;
    size_t clen;
    int ret = vmdk_compress_grain(img, buf, n, &c, &clen, err);

    if (ret < 0) {
        return ret;
    }
    ret = vmdk_put_qemu_stream(img, e, r, n, c, clen, err);
    free(c);
    return ret;
}

static int vmdk_extent_writable(struct vimg_image *img, struct vmdk_extent *e,
                                struct vimg_error *err)
{
    if (VMDK_EXT_SESPARSE == e->kind) {
        vimg_error_set(err, ENOTSUP, "No write support for seSparse images available");
        return -ENOTSUP;
    }
    if (e->readonly) {
        vimg_error_set(err, EROFS, "'%s': extent '%s' cannot be written", img->filename,
                       e->file->name);
        return -EROFS;
    }
    return 0;
}

static int vmdk_do_write(struct vimg_image *img, const void *buf, size_t len, uint64_t offset,
                         bool compressed_only, struct vimg_error *err)
{
    struct vmdk_state *s = img->opaque;
    const uint8_t *p = buf;
    int ret = vmdk_append_commit(img, err);

    if (ret < 0) {
        return ret;
    }
    while (len) {
        struct vmdk_extent *e = vmdk_find(s, offset);
        uint64_t r;
        size_t n;

        if (!e) {
            vimg_error_set(err, EIO, "'%s': no extent at offset %" PRIu64, img->filename,
                           offset);
            return -EIO;
        }
        if ((ret = vmdk_extent_writable(img, e, err)) < 0) {
            return ret;
        }
        r = offset - e->start;
        if (VMDK_EXT_FLAT == e->kind) {
            n = (size_t)VIMG_MIN((uint64_t)len, e->length - r);
            ret = vimg_file_pwrite(e->file, p, n, e->flat_off + r);
            if (ret < 0) {
                return vmdk_io_error(err, ret, "writing", e->file, e->flat_off + r);
            }
        } else {
            n = (size_t)VIMG_MIN((uint64_t)len, VIMG_MIN(e->grain - r % e->grain,
                                                         e->length - r));
            if (e->compressed && e->st.active) {
                ret = vmdk_stream_write(img, e, p, n, r, err);
            } else if (e->compressed) {
                ret = vmdk_write_qemu_stream(img, e, p, n, r, err);
            } else {
                (void)compressed_only;
                ret = vmdk_write_sparse(img, e, p, n, r, err);
            }
            if (ret < 0) {
                return ret;
            }
        }
        p += n;
        offset += n;
        len -= n;
        if ((ret = vmdk_cid_update(img, err)) < 0) {
            return ret;
        }
    }
    return 0;
}

static int vmdk_write(struct vimg_image *img, const void *buf, size_t len, uint64_t offset,
                      struct vimg_error *err)
{
    return vmdk_do_write(img, buf, len, offset, false, err);
}

static int vmdk_write_compressed(struct vimg_image *img, const void *buf, size_t len,
                                 uint64_t offset, struct vimg_error *err)
{
    if (0 == len) {
        return 0;
    }
    return vmdk_do_write(img, buf, len, offset, true, err);
}

/* Parallel compression for convert: only a streamOptimized image stores
 * compressed grains (qemu writes other vmdk grains plainly under -c, and
 * -ENOSPC makes the engine do that).  Reads only state fixed at open. */
static long vmdk_compress_cluster(struct vimg_image *img, void *out, size_t out_cap,
                                  const void *buf, size_t len, struct vimg_error *err)
{
    struct vmdk_state *s = img->opaque;
    long r;

    for (size_t i = 0; i < s->n; i++) {
        if (!s->ext[i].compressed) {
            return -ENOSPC;
        }
    }
    r = vmdk_deflate(out, out_cap, buf, len);
    if (r < 0 && -ENOSPC != r) {
        vimg_error_set(err, EINVAL, "'%s': compression failed", img->filename);
    }
    return r;
}

static int vmdk_write_compressed_data(struct vimg_image *img, const void *cdata, size_t clen,
                                      size_t len, uint64_t offset, struct vimg_error *err)
{
    struct vmdk_state *s = img->opaque;
    struct vmdk_extent *e = vmdk_find(s, offset);
    uint64_t r;
    int ret;

    if (!e || !e->compressed || VMDK_EXT_SPARSE != e->kind) {
        vimg_error_set(err, EINVAL, "'%s': no compressed extent at offset %" PRIu64,
                       img->filename, offset);
        return -EINVAL;
    }
    if ((ret = vmdk_append_commit(img, err)) < 0 ||
        (ret = vmdk_extent_writable(img, e, err)) < 0) {
        return ret;
    }
    r = offset - e->start;
    if (len > e->length - r) {
        vimg_error_set(err, EINVAL, "'%s': compressed write crosses an extent end",
                       img->filename);
        return -EINVAL;
    }
    ret = e->st.active ? vmdk_stream_put(img, e, r, len, cdata, clen, err)
                       : vmdk_put_qemu_stream(img, e, r, len, cdata, clen, err);
    return ret < 0 ? ret : vmdk_cid_update(img, err);
}

/* Whole grains of a zeroed-grain extent become GTE 1; anything else is
 * left to the core, which writes zeros (as qemu's block layer does). */
static int vmdk_write_zeroes(struct vimg_image *img, uint64_t offset, uint64_t len,
                             unsigned flags, struct vimg_error *err)
{
    struct vmdk_state *s = img->opaque;
    int ret0 = vmdk_append_commit(img, err);

    if (ret0 < 0) {
        return ret0;
    }
    for (int pass = 0; pass < 2; pass++) {
        uint64_t off = offset, left = len;
        while (left) {
            struct vmdk_extent *e = vmdk_find(s, off);
            enum vmdk_grain_state st;
            uint64_t r, n, host, gte;
            int ret;

            if (!e || VMDK_EXT_FLAT == e->kind || !e->zeroed || e->compressed ||
                e->readonly || VMDK_EXT_SPARSE != e->kind) {
                return -ENOTSUP;
            }
            r = off - e->start;
            n = VIMG_MIN(left, e->grain - r % e->grain);
            if (r % e->grain || (n < e->grain && r + n != e->length)) {
                return -ENOTSUP;
            }
            if (1 == pass) {
                uint64_t gi = r / e->gt_cover;
                if (0 == e->gd[gi] && (ret = vmdk_gt_alloc(e, gi, err)) < 0) {
                    return ret;
                }
                if ((ret = vmdk_grain(img, e, r, &st, &host, &gte, err)) < 0) {
                    return ret;
                }
                if (VMDK_G_ZERO != st &&
                    (ret = vmdk_gte_set(e, gi, (r % e->gt_cover) / e->grain,
                                        VMDK_GTE_ZEROED, err)) < 0) {
                    return ret;
                }
                if ((ret = vmdk_cid_update(img, err)) < 0) {
                    return ret;
                }
            }
            off += n;
            left -= n;
        }
    }
    return 0;
}

static int vmdk_flush(struct vimg_image *img, struct vimg_error *err)
{
    struct vmdk_state *s = img->opaque;
    int ret = vmdk_append_commit(img, err);

    if (ret < 0) {
        return ret;
    }
    for (size_t i = 0; i < s->n; i++) {
        struct vmdk_extent *e = &s->ext[i];
        if (e->st.active && (ret = vmdk_stream_finish(img, e, err)) < 0) {
            return ret;
        }
        if (e->owns_file && (ret = vimg_file_sync(e->file)) < 0) {
            vimg_error_set(err, -ret, "'%s': flush failed: %s", e->file->name, strerror(-ret));
            return ret;
        }
    }
    if ((ret = vimg_file_sync(img->file)) < 0) {
        vimg_error_set(err, -ret, "'%s': flush failed: %s", img->filename, strerror(-ret));
    }
    return ret;
}

/* ---- info, check, sizes --------------------------------------------------- */

static int vmdk_info(struct vimg_image *img, struct vimg_qobj **out, struct vimg_error *err)
{
    struct vmdk_state *s = img->opaque;
    struct vimg_qobj *d = vimg_q_dict(), *list = vimg_q_list();

    if (!d || !list) {
        vimg_q_free(d);
        vimg_q_free(list);
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    vimg_q_put(d, "create-type", vimg_q_str(s->create_type));
    vimg_q_put(d, "cid", vimg_q_int(s->cid));
    vimg_q_put(d, "parent-cid", vimg_q_int(s->parent_cid));
    for (size_t i = 0; i < s->n; i++) {
        const struct vmdk_extent *e = &s->ext[i];
        struct vimg_qobj *x = vimg_q_dict();
        if (!x) {
            continue;
        }
        /* an ImageInfo, inserted in qemu's visit order */
        vimg_q_put(x, "filename", vimg_q_str(e->file->name));
        vimg_q_put(x, "format", vimg_q_str(e->type ? e->type : ""));
        vimg_q_put(x, "virtual-size", vimg_q_int((int64_t)e->length));
        if (VMDK_EXT_FLAT != e->kind) {
            vimg_q_put(x, "cluster-size", vimg_q_int((int64_t)e->grain));
        }
        if (e->compressed) {
            vimg_q_put(x, "compressed", vimg_q_bool(true));
        }
        vimg_q_append(list, x);
    }
    vimg_q_put(d, "extents", list);
    *out = d;
    return 0;
}

static int vmdk_check(struct vimg_image *img, struct vimg_check_result *res, int fix,
                      struct vimg_error *err)
{
    struct vmdk_state *s = img->opaque;
    uint64_t off = 0;

    if (fix) {
        vimg_error_set(err, ENOTSUP, "This image format does not support checks");
        return -ENOTSUP;
    }
    while (off < img->size) {
        struct vmdk_extent *e = vmdk_find(s, off);
        enum vmdk_grain_state st;
        uint64_t host, gte, fsize, r;
        struct vimg_error e2 = { 0 };
        int ret;

        if (!e) {
            res->corruptions++;
            vimg_error_set(err, EINVAL, "ERROR: could not find extent for sector %" PRIu64,
                           off / VMDK_SECTOR);
            return -EINVAL;
        }
        r = off - e->start;
        if (VMDK_EXT_FLAT == e->kind) {
            if (vmdk_fsize(e->file, &fsize, &e2) < 0) {
                res->corruptions++;
                vimg_error_set(err, EIO, "ERROR: could not get extent file length for "
                               "sector %" PRIu64, off / VMDK_SECTOR);
                return -EIO;
            }
            if (e->flat_off >= fsize) {
                res->corruptions++;
                vimg_error_set(err, EINVAL, "ERROR: cluster offset for sector %" PRIu64
                               " points after EOF", off / VMDK_SECTOR);
                return -EINVAL;
            }
            off = e->start + e->length;
            continue;
        }
        if (0 == r % e->gt_cover && e->gd[r / e->gt_cover] == 0 &&
            !(e->st.active && e->st.open_gt == (int64_t)(r / e->gt_cover))) {
            off += VIMG_MIN(e->gt_cover, e->length - r);
            continue;
        }
        ret = vmdk_grain(img, e, r, &st, &host, &gte, &e2);
        if (ret < 0) {
            res->corruptions++;
            vimg_error_set(err, EPERM, "ERROR: could not get cluster_offset for sector %"
                           PRIu64, off / VMDK_SECTOR);
            return -EPERM;
        }
        if (VMDK_G_DATA == st) {
            if (vmdk_fsize(e->file, &fsize, &e2) < 0) {
                res->corruptions++;
                vimg_error_set(err, EIO, "ERROR: could not get extent file length for "
                               "sector %" PRIu64, off / VMDK_SECTOR);
                return -EIO;
            }
            if (host >= fsize) {
                res->corruptions++;
                vimg_error_set(err, EINVAL, "ERROR: cluster offset for sector %" PRIu64
                               " points after EOF", off / VMDK_SECTOR);
                return -EINVAL;
            }
        }
        off += e->grain - r % e->grain;
    }
    return 0;
}

static int64_t vmdk_allocated_size(struct vimg_image *img)
{
    struct vmdk_state *s = img->opaque;
    int64_t total = img->file->ops->allocated(img->file);

    for (size_t i = 0; i < s->n && total >= 0; i++) {
        int64_t a;
        if (s->ext[i].file == img->file) {
            continue;
        }
        a = s->ext[i].file->ops->allocated(s->ext[i].file);
        if (a < 0) {
            return a;
        }
        total += a;
    }
    return total;
}

static bool vmdk_has_zero_init(struct vimg_image *img)
{
    return true;
}

const struct vimg_driver vimg_driver_vmdk = {
    .abi_version = VIMG_DRIVER_ABI_VERSION,
    .name = "vmdk",
    .instance_size = sizeof(struct vmdk_state),
    .probe = vmdk_probe,
    .create_opts = vmdk_create_opts,
    .open = vmdk_open,
    .close = vmdk_close,
    .create = vmdk_create,
    .block_status = vmdk_block_status,
    .read_special = vmdk_read_special,
    .write = vmdk_write,
    .write_zeroes = vmdk_write_zeroes,
    .flush = vmdk_flush,
    .info = vmdk_info,
    .check = vmdk_check,
    .has_zero_init = vmdk_has_zero_init,
    .write_compressed = vmdk_write_compressed,
    .compress_cluster = vmdk_compress_cluster,
    .write_compressed_data = vmdk_write_compressed_data,
    .alloc_data = vmdk_alloc_data,
    .allocated_size = vmdk_allocated_size,
    .backing_opened = vmdk_backing_opened,
};

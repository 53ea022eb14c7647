/*
 * UML cow: user-mode Linux's ubd copy-on-write file.
 *
 * A header naming an (absolute) backing file, a bitmap with one bit per
 * 512-byte sector (LSB first), and the data of sector s at data_off + 512*s.
 * Four header layouts exist in the wild, plus the one old QEMU (<= 2.1)
 * wrote under the same magic and version number as Linux's v2; nothing in
 * the file says which, so the layouts are told apart by sanity checks and a
 * file that fits more than one (or none) is refused instead of guessed.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/image.h"
#include "core/opts.h"
#include "formats/cow.h"
#include "util/util.h"

#define COW_SECTOR 512
#define COW_BM_CHUNK 65536u          /* bitmap bytes cached at a time */
#define COW_MAX_SIZE (1ull << 60)    /* keeps every offset far from overflow */
#define COW_MAX_ALIGN (1u << 20)
#define COW_V3_HEADER 4128
#define COW_V3_BROKEN_HEADER 4136
#define COW_V2_HEADER 4120
#define COW_V1_HEADER 280
#define COW_QEMU64_HEADER 1056
#define COW_QEMU32_HEADER 1048
#define COW_PATH_V1 256
#define COW_PATH_V2 4096
#define COW_PATH_V3 4096
#define COW_PATH_QEMU 1024
#define COW_CREATE_ALIGN 4096

struct cow_state {
    struct cow_layout l;
    uint64_t file_size;
    uint8_t *bm;                 /* COW_BM_CHUNK bytes of bitmap */
    uint64_t bm_chunk;           /* chunk index held in bm, UINT64_MAX = none */
    bool checked_backing;        /* backing size/mtime compared */
    int backing_mismatch;        /* -errno when it does not match */
    char mismatch_msg[256];
};

const char *vimg_internal_cow_variant_name(enum cow_variant v)
{
    switch (v) {
    case COW_V1: return "v1";
    case COW_V2_LINUX: return "v2 (Linux UML)";
    case COW_V2_QEMU64: return "v2 (QEMU, 64-bit)";
    case COW_V2_QEMU32: return "v2 (QEMU, 32-bit)";
    case COW_V3: return "v3";
    case COW_V3_BROKEN: return "v3 (broken 64-bit layout)";
    }
    return "?";
}

static uint32_t cow_ld32(const uint8_t *p, bool le)
{
    return le ? vimg_ld_le32(p) : vimg_ld_be32(p);
}

static uint64_t cow_ld64(const uint8_t *p, bool le)
{
    return le ? vimg_ld_le64(p) : vimg_ld_be64(p);
}

/* Bits needed for the virtual disk: one per 512-byte sector. */
static uint64_t cow_bitmap_bytes(uint64_t size)
{
    return vimg_div_round_up(vimg_div_round_up(size, COW_SECTOR), 8);
}

/*
 * Fill in the offsets of one candidate layout and check that it makes
 * sense.  Returns NULL when it does, else why not.
 */
static const char *cow_check_candidate(const uint8_t *buf, struct cow_layout *l,
                                       uint64_t header_len)
{
    uint64_t end;

    if (!memchr(buf + l->name_off, '\0', l->name_max)) {
        return "the backing file name is not NUL-terminated";
    }
    if (l->size < COW_SECTOR) {
        return "the disk size is smaller than one sector";
    }
    if (l->size > COW_MAX_SIZE) {
        return "the disk size is implausibly large";
    }
    if (l->sectorsize < 512 || l->sectorsize > 65536 || !vimg_is_pow2(l->sectorsize)) {
        return "the sector size is not a power of two from 512 to 65536";
    }
    if (COW_V3 == l->variant || COW_V3_BROKEN == l->variant) {
        /* UML writes its page size; anything but a power of two from a
         * sector to 1 MiB is a misread field */
        if (l->alignment < 512 || l->alignment > COW_MAX_ALIGN ||
            !vimg_is_pow2(l->alignment)) {
            return "the alignment is not a power of two from 512 to 1 MiB";
        }
        l->bitmap_off = vimg_div_round_up(header_len, l->alignment) * l->alignment;
        end = l->bitmap_off + cow_bitmap_bytes(l->size);
        l->data_off = vimg_div_round_up(end, l->alignment) * l->alignment;
    } else if (COW_V1 == l->variant || COW_V2_LINUX == l->variant) {
        /* Linux's v1/v2 formula (one byte short for some sizes: the
         * "rounding bug" v3 fixed); the bits are still where UML puts them */
        l->alignment = l->sectorsize;
        l->bitmap_off = header_len;
        end = header_len + (l->size + l->sectorsize - 1) / (8ull * l->sectorsize);
        l->data_off = vimg_div_round_up(end, l->sectorsize) * l->sectorsize;
        if (header_len + cow_bitmap_bytes(l->size) > l->data_off) {
            return "the bitmap runs into the data area";
        }
    } else {
        /* QEMU's driver: bitmap right after its struct, data 512-aligned */
        l->alignment = COW_SECTOR;
        l->bitmap_off = header_len;
        end = header_len + cow_bitmap_bytes(l->size);
        l->data_off = vimg_div_round_up(end, COW_SECTOR) * COW_SECTOR;
    }
    return NULL;
}

int vimg_internal_cow_parse(const uint8_t *buf, uint64_t file_size,
                            struct cow_layout *out, char *why, size_t whylen)
{
    bool le;
    uint32_t version;
    struct cow_layout c[3];
    const char *reason[3];
    uint64_t hlen[3];
    int n = 0, ok = 0, pick = -1;

    if (COW_MAGIC == vimg_ld_be32(buf)) {
        le = false;
    } else if (COW_MAGIC == vimg_ld_le32(buf)) {
        le = true;
    } else {
        snprintf(why, whylen, "not a cow file (bad magic)");
        return -EINVAL;
    }
    /* Linux reads the version in the byte order the magic matched */
    version = cow_ld32(buf + 4, le);
    memset(c, 0, sizeof(c));
    switch (version) {
    case 1:
        /* the only layout whose fields follow the writer's byte order */
        c[0] = (struct cow_layout){ .variant = COW_V1, .version = 1,
            .mtime = cow_ld32(buf + 264, le), .size = cow_ld64(buf + 268, le),
            .sectorsize = cow_ld32(buf + 276, le), .name_off = 8, .name_max = COW_PATH_V1 };
        hlen[0] = COW_V1_HEADER;
        n = 1;
        break;
    case 2:
        c[0] = (struct cow_layout){ .variant = COW_V2_LINUX, .version = 2,
            .mtime = vimg_ld_be32(buf + 4104), .size = vimg_ld_be64(buf + 4108),
            .sectorsize = vimg_ld_be32(buf + 4116), .name_off = 8,
            .name_max = COW_PATH_V2 };
        hlen[0] = COW_V2_HEADER;
        c[1] = (struct cow_layout){ .variant = COW_V2_QEMU64, .version = 2,
            .mtime = vimg_ld_be32(buf + 1032), .size = vimg_ld_be64(buf + 1040),
            .sectorsize = vimg_ld_be32(buf + 1048), .name_off = 8,
            .name_max = COW_PATH_QEMU };
        hlen[1] = COW_QEMU64_HEADER;
        c[2] = (struct cow_layout){ .variant = COW_V2_QEMU32, .version = 2,
            .mtime = vimg_ld_be32(buf + 1032), .size = vimg_ld_be64(buf + 1036),
            .sectorsize = vimg_ld_be32(buf + 1044), .name_off = 8,
            .name_max = COW_PATH_QEMU };
        hlen[2] = COW_QEMU32_HEADER;
        n = 3;
        break;
    case 3:
        c[0] = (struct cow_layout){ .variant = COW_V3, .version = 3,
            .mtime = vimg_ld_be32(buf + 8), .size = vimg_ld_be64(buf + 12),
            .sectorsize = vimg_ld_be32(buf + 20), .alignment = vimg_ld_be32(buf + 24),
            .name_off = 32, .name_max = COW_PATH_V3 };
        hlen[0] = COW_V3_HEADER;
        n = 1;
        /* Linux's rule: the broken layout puts cow_format (always 0) where
         * a good file has the first bytes of an absolute path.  A good
         * file without a backing file has zeros there too, so then both
         * readings are checked. */
        if (0 == vimg_ld_be32(buf + 32)) {
            c[1] = (struct cow_layout){ .variant = COW_V3_BROKEN, .version = 3,
                .mtime = vimg_ld_be32(buf + 8), .size = vimg_ld_be64(buf + 16),
                .sectorsize = vimg_ld_be32(buf + 24), .alignment = vimg_ld_be32(buf + 28),
                .name_off = 36, .name_max = COW_PATH_V3 };
            hlen[1] = COW_V3_BROKEN_HEADER;
            n = 2;
        }
        break;
    default:
        snprintf(why, whylen, "unsupported cow version %" PRIu32, version);
        return -ENOTSUP;
    }

    for (int i = 0; i < n; i++) {
        reason[i] = file_size < hlen[i] ? "the file is shorter than the header"
                                        : cow_check_candidate(buf, &c[i], hlen[i]);
        if (!reason[i] && (COW_V3 == c[i].variant || COW_V3_BROKEN == c[i].variant) &&
            file_size < c[i].bitmap_off) {
            /* UML extends a new file over its whole data area */
            reason[i] = "the file ends before the bitmap";
        }
        if (!reason[i] && COW_V3 == c[i].variant && 0 != vimg_ld_be32(buf + 28)) {
            reason[i] = "unknown cow_format (only 0, the bitmap, exists)";
        }
        if (!reason[i] && COW_V3_BROKEN == c[i].variant && 0 != vimg_ld_be32(buf + 12)) {
            reason[i] = "the padding after mtime is not zero";
        }
        if (!reason[i] && COW_V2_QEMU64 == c[i].variant && 0 != vimg_ld_be32(buf + 1036)) {
            reason[i] = "the padding after mtime is not zero";
        }
        if (!reason[i] && (COW_V2_QEMU64 == c[i].variant || COW_V2_QEMU32 == c[i].variant) &&
            file_size < c[i].bitmap_off + cow_bitmap_bytes(c[i].size)) {
            reason[i] = "the file is shorter than header and bitmap";
        }
        if (!reason[i]) {
            ok++;
            pick = i;
        }
    }
    if (1 == ok) {
        *out = c[pick];
        return 0;
    }
    if (1 == n) {
        snprintf(why, whylen, "invalid cow %s header: %s",
                 vimg_internal_cow_variant_name(c[0].variant), reason[0]);
    } else if (0 == ok && 2 == version) {
        snprintf(why, whylen, "cow version 2 header fits neither the Linux layout (%s) nor "
                 "QEMU's (64-bit: %s; 32-bit: %s)", reason[0], reason[1], reason[2]);
    } else if (0 == ok) {
        snprintf(why, whylen, "cow version 3 header fits neither the standard layout (%s) "
                 "nor the broken 64-bit one (%s)", reason[0], reason[1]);
    } else {
        snprintf(why, whylen, "cow version %" PRIu32 " header is ambiguous: it is valid in "
                 "more than one layout (%s), which cannot be told apart", version,
                 2 == version ? "Linux UML and QEMU" : "standard and broken 64-bit");
    }
    return -EINVAL;
}

static int cow_probe(const uint8_t *buf, size_t len, const char *filename)
{
    uint32_t v;

    if (len < 8) {
        return 0;
    }
    if (COW_MAGIC == vimg_ld_be32(buf)) {
        v = vimg_ld_be32(buf + 4);
    } else if (COW_MAGIC == vimg_ld_le32(buf)) {
        v = vimg_ld_le32(buf + 4);
    } else {
        return 0;
    }
    return (v >= 1 && v <= 3) ? 100 : 0;
}

static void cow_close(struct vimg_image *img)
{
    struct cow_state *s = img->opaque;
    free(s->bm);
    s->bm = NULL;
}

static int cow_open(struct vimg_image *img, unsigned flags, struct vimg_error *err)
{
    struct cow_state *s = img->opaque;
    uint8_t *buf;
    char why[512];
    int64_t fsize;
    int ret;

    fsize = vimg_file_size(img->file);
    if (fsize < 0) {
        vimg_error_set(err, (int)-fsize, "Could not open '%s': %s", img->filename,
                       strerror((int)-fsize));
        return (int)fsize;
    }
    s->file_size = (uint64_t)fsize;
    buf = malloc(COW_PROBE_LEN);
    s->bm = malloc(COW_BM_CHUNK);
    if (!buf || !s->bm) {
        free(buf);
        cow_close(img);
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    s->bm_chunk = UINT64_MAX;
    ret = vimg_file_pread(img->file, buf, COW_PROBE_LEN, 0);
    if (ret < 0) {
        vimg_error_set(err, -ret, "Could not open '%s': %s", img->filename, strerror(-ret));
    } else {
        ret = vimg_internal_cow_parse(buf, s->file_size, &s->l, why, sizeof(why));
        if (ret < 0) {
            vimg_error_set(err, -ret, "Could not open '%s': %s", img->filename, why);
        }
    }
    if (0 == ret && buf[s->l.name_off]) {
        ret = vimg_internal_set_backing(img, (const char *)buf + s->l.name_off, NULL);
        if (ret < 0) {
            vimg_error_set(err, ENOMEM, "out of memory");
        }
    }
    free(buf);
    if (ret < 0) {
        cow_close(img);
        return ret;
    }
    /* ubd (and old QEMU) count whole 512-byte sectors */
    img->size = s->l.size / COW_SECTOR * COW_SECTOR;
    return 0;
}

/* The bitmap byte for sector, through the one-chunk cache. */
static int cow_bm_load(struct vimg_image *img, uint64_t chunk, struct vimg_error *err)
{
    struct cow_state *s = img->opaque;
    int ret;

    if (s->bm_chunk == chunk) {
        return 0;
    }
    s->bm_chunk = UINT64_MAX;
    /* bytes past the end of the file read as zeros (a sparse bitmap) */
    ret = vimg_file_pread(img->file, s->bm, COW_BM_CHUNK,
                          s->l.bitmap_off + chunk * COW_BM_CHUNK);
    if (ret < 0) {
        vimg_error_set(err, -ret, "'%s': could not read the cow bitmap: %s", img->filename,
                       strerror(-ret));
        return ret;
    }
    s->bm_chunk = chunk;
    return 0;
}

static int cow_block_status(struct vimg_image *img, uint64_t offset, uint64_t max_len,
                            struct vimg_run *run, struct vimg_error *err)
{
    struct cow_state *s = img->opaque;
    uint64_t sector = offset / COW_SECTOR;
    uint64_t byte = sector / 8;
    uint64_t chunk = byte / COW_BM_CHUNK;
    uint64_t end_sector, limit;
    bool set;
    int ret;

    if (s->l.bitmap_off + byte >= s->file_size) {
        /* the rest of the bitmap lies past the end of the file: all clear */
        run->length = img->size - offset;
        run->flags = 0;
        return 0;
    }
    ret = cow_bm_load(img, chunk, err);
    if (ret < 0) {
        return ret;
    }
    set = s->bm[byte % COW_BM_CHUNK] & (1u << (sector % 8));
    /* scan to the end of this chunk at most: no extra reads for a longer run */
    limit = VIMG_MIN((chunk + 1) * COW_BM_CHUNK * 8,
                     vimg_div_round_up(img->size, COW_SECTOR));
    limit = VIMG_MIN(limit, vimg_div_round_up(offset + max_len, COW_SECTOR));
    end_sector = sector + 1;
    while (end_sector < limit) {
        uint64_t b = end_sector / 8 % COW_BM_CHUNK;
        if (0 == end_sector % 8 && end_sector + 8 <= limit &&
            s->bm[b] == (set ? 0xff : 0x00)) {
            end_sector += 8;
            continue;
        }
        if (!!(s->bm[b] & (1u << (end_sector % 8))) != set) {
            break;
        }
        end_sector++;
    }
    run->length = VIMG_MIN(end_sector * COW_SECTOR, img->size) - offset;
    if (!set) {
        run->flags = 0;
        return 0;
    }
    uint64_t host = s->l.data_off + offset;
    if (host >= s->file_size) {
        /* written sectors past the end of the file read as zeros */
        run->flags = VIMG_RUN_ZERO | VIMG_RUN_ALLOCATED;
        return 0;
    }
    run->length = VIMG_MIN(run->length, s->file_size - host);
    run->flags = VIMG_RUN_DATA | VIMG_RUN_ALLOCATED | VIMG_RUN_HOST_VALID;
    run->host = img->file;
    run->host_off = host;
    return 0;
}

/* UML refuses a cow file whose backing file changed under it; so does
 * vimg before it writes. */
static int cow_check_backing(struct vimg_image *img, struct vimg_error *err)
{
    struct cow_state *s = img->opaque;
    struct vimg_image *b = img->backing;
    struct stat st;

    if (!s->checked_backing) {
        s->checked_backing = true;
        if (b && vimg_size(b) != s->l.size) {
            s->backing_mismatch = -EINVAL;
            snprintf(s->mismatch_msg, sizeof(s->mismatch_msg),
                     "Size mismatch (%" PRIu64 " vs %" PRIu64 ") of COW header vs backing "
                     "file", s->l.size, vimg_size(b));
        } else if (s->l.mtime &&
                   ((b && b->file->fd >= 0 && 0 == fstat(b->file->fd, &st)) ||
                    /* not opened (NO_BACKING): UML's names are absolute */
                    (!b && img->backing_name && '/' == img->backing_name[0] &&
                     0 == stat(img->backing_name, &st))) &&
                   (uint32_t)st.st_mtime != s->l.mtime) {
            s->backing_mismatch = -EINVAL;
            snprintf(s->mismatch_msg, sizeof(s->mismatch_msg),
                     "mtime mismatch (%" PRIu32 " vs %" PRIu32 ") of COW header vs backing "
                     "file", s->l.mtime, (uint32_t)st.st_mtime);
        }
    }
    if (s->backing_mismatch) {
        vimg_error_set(err, -s->backing_mismatch, "'%s': %s '%s'; refusing to write",
                       img->filename, s->mismatch_msg,
                       b ? b->filename : img->backing_name ? img->backing_name : "");
    }
    return s->backing_mismatch;
}

/* As UML does on open: say so when the backing file no longer matches. */
static int cow_backing_opened(struct vimg_image *img, struct vimg_error *err)
{
    struct vimg_error local = { 0 };
    if (cow_check_backing(img, &local) < 0) {
        vimg_internal_warn(img, "%s", local.msg);
    }
    return 0;
}

/* Set the bits of sectors [first, last]. */
static int cow_set_bits(struct vimg_image *img, uint64_t first, uint64_t last,
                        struct vimg_error *err)
{
    struct cow_state *s = img->opaque;
    uint8_t tmp[4096];

    while (first <= last) {
        uint64_t b0 = first / 8;
        uint64_t nbytes = VIMG_MIN(last / 8 - b0 + 1, sizeof(tmp));
        uint64_t stop = VIMG_MIN(last, (b0 + nbytes) * 8 - 1);
        int ret = vimg_file_pread(img->file, tmp, nbytes, s->l.bitmap_off + b0);
        if (ret < 0) {
            vimg_error_set(err, -ret, "'%s': could not read the cow bitmap: %s",
                           img->filename, strerror(-ret));
            return ret;
        }
        for (uint64_t i = first; i <= stop; i++) {
            tmp[i / 8 - b0] |= (uint8_t)(1u << (i % 8));
        }
        ret = vimg_file_pwrite(img->file, tmp, nbytes, s->l.bitmap_off + b0);
        if (ret < 0) {
            vimg_error_set(err, -ret, "'%s': could not write the cow bitmap: %s",
                           img->filename, strerror(-ret));
            return ret;
        }
        if (s->l.bitmap_off + b0 + nbytes > s->file_size) {
            s->file_size = s->l.bitmap_off + b0 + nbytes;
        }
        first = stop + 1;
    }
    s->bm_chunk = UINT64_MAX;
    return 0;
}

static int cow_sector_is_set(struct vimg_image *img, uint64_t sector, bool *set,
                             struct vimg_error *err)
{
    struct cow_state *s = img->opaque;
    uint64_t byte = sector / 8;
    int ret;

    if (s->l.bitmap_off + byte >= s->file_size) {
        *set = false;
        return 0;
    }
    ret = cow_bm_load(img, byte / COW_BM_CHUNK, err);
    if (ret < 0) {
        return ret;
    }
    *set = s->bm[byte % COW_BM_CHUNK] & (1u << (sector % 8));
    return 0;
}

static int cow_pwrite_data(struct vimg_image *img, const void *buf, size_t len,
                           uint64_t offset, struct vimg_error *err)
{
    struct cow_state *s = img->opaque;
    int ret = vimg_file_pwrite(img->file, buf, len, s->l.data_off + offset);
    if (ret < 0) {
        vimg_error_set(err, -ret, "error while writing at byte %" PRIu64 ": %s", offset,
                       strerror(-ret));
        return ret;
    }
    if (s->l.data_off + offset + len > s->file_size) {
        s->file_size = s->l.data_off + offset + len;
    }
    return 0;
}

/* Write part of one sector: a sector not yet in the cow file first takes
 * the backing file's bytes (or zeros), as ubd's copy-on-write does. */
static int cow_write_partial(struct vimg_image *img, const uint8_t *p, size_t n,
                             uint64_t offset, struct vimg_error *err)
{
    uint64_t sector = offset / COW_SECTOR;
    uint64_t start = sector * COW_SECTOR;
    uint8_t sec[COW_SECTOR];
    bool set;
    int ret = cow_sector_is_set(img, sector, &set, err);

    if (ret < 0) {
        return ret;
    }
    if (set) {
        return cow_pwrite_data(img, p, n, offset, err);
    }
    if (!img->backing && img->backing_name) {
        vimg_error_set(err, EIO, "'%s': a write of part of sector %" PRIu64 " needs the "
                       "backing file, which is not open", img->filename, sector);
        return -EIO;
    }
    memset(sec, 0, sizeof(sec));
    if (img->backing && start < vimg_size(img->backing)) {
        size_t len = (size_t)VIMG_MIN(COW_SECTOR, vimg_size(img->backing) - start);
        ret = vimg_pread(img->backing, sec, len, start, err);
        if (ret < 0) {
            return ret;
        }
    }
    memcpy(sec + (offset - start), p, n);
    ret = cow_pwrite_data(img, sec, COW_SECTOR, start, err);
    return ret < 0 ? ret : cow_set_bits(img, sector, sector, err);
}

/* Whole sectors.  A sector not yet in the cow file whose new content is
 * what it reads already (the backing file's bytes, or zeros without one)
 * stays out of it: a cow file holds only what differs from its backing
 * file, which is what convert -B and sparse copies want.  Data goes first,
 * then the bits, so a crash loses no data that the bitmap claims. */
static int cow_write_sectors(struct vimg_image *img, const uint8_t *p, size_t len,
                             uint64_t offset, struct vimg_error *err)
{
    enum { CHUNK = 65536 };
    /* without an open backing image the old content is unknown, unless
     * there is none (zeros) */
    bool can_skip = img->backing || !img->backing_name;
    uint8_t *old = can_skip ? malloc(CHUNK) : NULL;
    int ret = 0;

    if (can_skip && !old) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    while (len && ret >= 0) {
        size_t n = VIMG_MIN(len, (size_t)CHUNK);
        if (old) {
            uint64_t bsize = img->backing ? vimg_size(img->backing) : 0;
            memset(old, 0, n);
            if (offset < bsize) {
                ret = vimg_pread(img->backing, old, (size_t)VIMG_MIN(n, bsize - offset),
                                 offset, err);
                if (ret < 0) {
                    break;
                }
            }
        }
        /* runs of sectors to store */
        for (size_t i = 0; i < n && ret >= 0;) {
            size_t j = i;
            while (j < n) {
                bool set = true;
                if (old && 0 == memcmp(p + j, old + j, COW_SECTOR)) {
                    ret = cow_sector_is_set(img, (offset + j) / COW_SECTOR, &set, err);
                    if (ret < 0) {
                        break;
                    }
                }
                if (!set) {
                    break;
                }
                j += COW_SECTOR;
            }
            if (ret < 0) {
                break;
            }
            if (j > i) {
                ret = cow_pwrite_data(img, p + i, j - i, offset + i, err);
                if (ret >= 0) {
                    ret = cow_set_bits(img, (offset + i) / COW_SECTOR,
                                       (offset + j) / COW_SECTOR - 1, err);
                }
                i = j;
            } else {
                i += COW_SECTOR;
            }
        }
        p += n;
        offset += n;
        len -= n;
    }
    free(old);
    return ret;
}

static int cow_write(struct vimg_image *img, const void *buf, size_t len, uint64_t offset,
                     struct vimg_error *err)
{
    const uint8_t *p = buf;
    int ret = cow_check_backing(img, err);

    if (ret < 0) {
        return ret;
    }
    /* unaligned head */
    if (offset % COW_SECTOR) {
        size_t n = (size_t)VIMG_MIN(len, COW_SECTOR - offset % COW_SECTOR);
        ret = cow_write_partial(img, p, n, offset, err);
        if (ret < 0) {
            return ret;
        }
        p += n;
        offset += n;
        len -= n;
    }
    size_t whole = len / COW_SECTOR * COW_SECTOR;
    if (whole) {
        ret = cow_write_sectors(img, p, whole, offset, err);
        if (ret < 0) {
            return ret;
        }
        p += whole;
        offset += whole;
        len -= whole;
    }
    if (len) {
        ret = cow_write_partial(img, p, len, offset, err);
    }
    return ret;
}

static int cow_flush(struct vimg_image *img, struct vimg_error *err)
{
    int ret = vimg_file_sync(img->file);
    if (ret < 0) {
        vimg_error_set(err, -ret, "Could not flush '%s': %s", img->filename, strerror(-ret));
    }
    return ret;
}

static bool cow_has_zero_init(struct vimg_image *img)
{
    /* fresh sectors read from the backing file, or zeros without one */
    return !img->backing_name;
}

/* The backing file's size and mtime, and its absolute path, as UML's
 * create_cow_file records them. */
static int cow_backing_facts(const char *filename, const char *backing, const char *fmt,
                             char **abs_path, uint64_t *size, uint32_t *mtime,
                             struct vimg_error *err)
{
    struct vimg_image *b = NULL;
    char *joined = NULL;
    const char *path = backing;
    const char *slash = strrchr(filename, '/');
    struct stat st;
    int ret;

    /* a relative name is relative to the new image's folder, as for every
     * other backing file vimg and qemu-img handle */
    if ('/' != backing[0] && slash) {
        if (asprintf(&joined, "%.*s/%s", (int)(slash - filename), filename, backing) < 0) {
            vimg_error_set(err, ENOMEM, "out of memory");
            return -ENOMEM;
        }
        path = joined;
    }
    *abs_path = realpath(path, NULL);
    if (!*abs_path) {
        ret = -errno;
        vimg_error_set(err, -ret, "Could not open backing file '%s': %s", backing,
                       strerror(-ret));
        free(joined);
        return ret;
    }
    free(joined);
    if (strlen(*abs_path) >= COW_PATH_V3) {
        vimg_error_set(err, ENAMETOOLONG, "Backing file name '%s' is too long (cow allows "
                       "%d characters)", *abs_path, COW_PATH_V3 - 1);
        goto fail;
    }
    if (0 != stat(*abs_path, &st)) {
        vimg_error_set(err, errno, "Could not stat backing file '%s': %s", *abs_path,
                       strerror(errno));
        goto fail;
    }
    *mtime = (uint32_t)st.st_mtime;
    ret = vimg_open(&b, *abs_path, fmt, VIMG_OPEN_NO_BACKING | VIMG_OPEN_NO_IO |
                    VIMG_OPEN_FORCE_SHARE, NULL, err);
    if (ret < 0) {
        vimg_error_prefix(err, "Could not open backing image: ");
        goto fail;
    }
    *size = vimg_size(b);
    vimg_close(b);
    return 0;
fail:
    free(*abs_path);
    *abs_path = NULL;
    return -(err->code ? err->code : EINVAL);
}

static int cow_create(const char *filename, const struct vimg_opts *opts,
                      struct vimg_error *err)
{
    const char *backing = vimg_internal_opt_str(opts, "backing_file", NULL);
    const char *fmt = vimg_internal_opt_str(opts, "backing_fmt", NULL);
    const char *ver = vimg_internal_opt_str(opts, "cow_version", "3");
    uint64_t size = vimg_internal_opt_size(opts, "size", 0);
    bool have_size = NULL != vimg_opts_get(opts, "size");
    uint64_t bsize = 0, hdr_len, bitmap_off, data_off, file_len;
    uint32_t mtime = 0;
    char *abs_path = NULL;
    uint8_t *hdr = NULL;
    struct vimg_file *f;
    int version, ret;

    if (0 == strcmp(ver, "3")) {
        version = 3;
    } else if (0 == strcmp(ver, "2")) {
        version = 2;
    } else {
        vimg_error_set(err, EINVAL, "Invalid cow_version '%s' (3: Linux UML, 2: old QEMU)",
                       ver);
        return -EINVAL;
    }
    if (backing && backing[0]) {
        ret = cow_backing_facts(filename, backing, fmt, &abs_path, &bsize, &mtime, err);
        if (ret < 0) {
            return ret;
        }
        if (2 == version && strlen(abs_path) >= COW_PATH_QEMU) {
            vimg_error_set(err, ENAMETOOLONG, "Backing file name '%s' is too long (cow "
                           "version 2 allows %d characters)", abs_path, COW_PATH_QEMU - 1);
            free(abs_path);
            return -ENAMETOOLONG;
        }
        if (!have_size || 0 == size) {
            size = bsize;
        } else if (vimg_round_up(size, COW_SECTOR, &size) && size != bsize) {
            vimg_error_set(err, EINVAL, "Image size %" PRIu64 " differs from the backing "
                           "file's size %" PRIu64 " (a cow file always has its backing "
                           "file's size)", size, bsize);
            free(abs_path);
            return -EINVAL;
        }
    }
    if (!vimg_round_up(size, COW_SECTOR, &size) || size > COW_MAX_SIZE) {
        free(abs_path);
        vimg_error_set(err, EFBIG, "The image size is too large for file format 'cow'");
        return -EFBIG;
    }
    if (0 == size) {
        free(abs_path);
        vimg_error_set(err, EINVAL, "Image size is too small, cannot be zero length");
        return -EINVAL;
    }

    hdr_len = 3 == version ? COW_V3_HEADER : COW_QEMU64_HEADER;
    hdr = calloc(1, hdr_len);
    if (!hdr) {
        free(abs_path);
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    vimg_st_be32(hdr, COW_MAGIC);
    vimg_st_be32(hdr + 4, (uint32_t)version);
    if (3 == version) {
        /* what UML's create_cow_file writes: page-aligned bitmap and data,
         * the whole data area as one sparse extent */
        vimg_st_be32(hdr + 8, mtime);
        vimg_st_be64(hdr + 12, size);
        vimg_st_be32(hdr + 20, COW_SECTOR);
        vimg_st_be32(hdr + 24, COW_CREATE_ALIGN);
        vimg_st_be32(hdr + 28, 0);
        if (abs_path) {
            memcpy(hdr + 32, abs_path, strlen(abs_path));
        }
        bitmap_off = vimg_div_round_up(hdr_len, COW_CREATE_ALIGN) * COW_CREATE_ALIGN;
        data_off = vimg_div_round_up(bitmap_off + cow_bitmap_bytes(size), COW_CREATE_ALIGN) *
                   COW_CREATE_ALIGN;
        file_len = data_off + size;
    } else {
        /* what QEMU <= 2.1 wrote: x86-64 struct layout, file cut after
         * the bitmap */
        if (abs_path) {
            memcpy(hdr + 8, abs_path, strlen(abs_path));
        }
        vimg_st_be32(hdr + 1032, mtime);
        vimg_st_be64(hdr + 1040, size);
        vimg_st_be32(hdr + 1048, COW_SECTOR);
        file_len = hdr_len + cow_bitmap_bytes(size);
    }
    free(abs_path);

    ret = vimg_file_open_posix(&f, filename, VIMG_FILE_RDWR | VIMG_FILE_CREATE);
    if (ret < 0) {
        free(hdr);
        vimg_error_set(err, -ret, "Could not create '%s': %s", filename, strerror(-ret));
        return ret;
    }
    ret = vimg_internal_lock_file(f, VIMG_PERM_WRITE | VIMG_PERM_RESIZE, VIMG_PERM_RESIZE,
                                  err);
    if (ret < 0) {
        free(hdr);
        vimg_file_close(f);
        return ret;
    }
    ret = f->ops->truncate(f, 0);
    if (0 == ret) {
        ret = vimg_file_pwrite(f, hdr, hdr_len, 0);
    }
    if (0 == ret) {
        ret = f->ops->truncate(f, file_len);
    }
    if (ret < 0) {
        vimg_error_set(err, -ret, "Could not write '%s': %s", filename, strerror(-ret));
    }
    free(hdr);
    vimg_file_close(f);
    return ret;
}

static const struct vimg_opt_desc cow_create_opts[] = {
    { "size", VIMG_OPT_SIZE, "Virtual disk size", NULL },
    { "backing_file", VIMG_OPT_STRING, "File name of a base image", NULL },
    { "backing_fmt", VIMG_OPT_STRING, "Format of the backing image (not recorded)", NULL },
    { "cow_version", VIMG_OPT_STRING,
      "Header layout: 3 (Linux UML, default) or 2 (QEMU <= 2.1)", NULL },
    { NULL },
};

const struct vimg_driver vimg_driver_cow = {
    .abi_version = VIMG_DRIVER_ABI_VERSION,
    .name = "cow",
    .instance_size = sizeof(struct cow_state),
    .probe = cow_probe,
    .create_opts = cow_create_opts,
    .open = cow_open,
    .close = cow_close,
    .create = cow_create,
    .block_status = cow_block_status,
    .write = cow_write,
    .flush = cow_flush,
    .has_zero_init = cow_has_zero_init,
    .backing_opened = cow_backing_opened,
};

/*
 * qcow (version 1): QEMU's original copy-on-write format.
 *
 * A 48-byte big-endian header, an L1 table whose length follows from the
 * virtual size, L2 tables of 2^l2_bits entries, and data clusters that are
 * either plain (a host offset) or compressed (raw DEFLATE, bit 63 set, the
 * exact compressed length in the bits below it).  No refcounts, snapshots or
 * zero clusters: allocation always appends at the end of the file.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "core/image.h"
#include "core/opts.h"
#include "formats/zcodec.h"
#include "util/util.h"

#define QCOW_MAGIC 0x514649fbu
#define QCOW_VERSION 1
#define QCOW_HEADER_SIZE 48
#define QCOW_CRYPT_NONE 0
#define QCOW_CRYPT_AES 1
#define QCOW_OFLAG_COMPRESSED (1ull << 63)
#define QCOW_SECTOR 512
#define QCOW_MAX_BACKING_NAME 1023
#define QCOW_L2_CACHE 4

/* The append-mode writer's state (qcow_alloc_data). */
enum { QCOW_APPEND_UNKNOWN, QCOW_APPEND_ON, QCOW_APPEND_OFF };

struct qcow_append {
    int state;               /* UNKNOWN until the first alloc_data or write */
    uint64_t l1_idx;         /* the L2 table being filled, UINT64_MAX: none */
    uint64_t *tab;           /* its entries, host order */
    uint64_t tab_host;       /* where it goes */
    uint64_t start;          /* file size when append mode began */
    uint64_t next;           /* end of everything handed out (qemu's file length) */
    uint64_t l1_lo, l1_hi;   /* L1 entries set, [lo, hi) */
};

struct qcow_l2_slot {
    uint64_t off;            /* host offset of the cached table, 0 = empty */
    uint64_t *tab;           /* host-order entries */
};

struct qcow_state {
    unsigned cluster_bits, l2_bits;
    uint64_t cluster_size;
    uint64_t l2_entries;     /* entries per L2 table */
    uint64_t l2_bytes;
    uint64_t l1_entries;     /* what the virtual size needs */
    uint64_t l1_loaded;      /* entries read from the file (the rest lie past EOF) */
    uint64_t l1_offset;
    uint64_t *l1;            /* l1_loaded host-order entries */
    uint64_t offset_mask;    /* compressed descriptor: offset bits */
    uint64_t file_size;      /* kept current across our own appends */
    struct qcow_l2_slot l2[QCOW_L2_CACHE];
    unsigned l2_next;
    uint8_t *cbuf;           /* compressed input, one cluster */
    uint8_t *ccache;         /* last decompressed cluster */
    uint8_t *wbuf;           /* one cluster for writes */
    bool encrypted;          /* AES: opened for info only */
    uint64_t ccache_entry;   /* its L2 entry, 0 = empty */
    struct qcow_append app;
};

/* The header fields qemu looks at. */
struct qcow_header {
    uint32_t magic, version;
    uint64_t backing_off;
    uint32_t backing_len, mtime;
    uint64_t size;
    uint8_t cluster_bits, l2_bits;
    uint32_t crypt_method;
    uint64_t l1_offset;
};

static void qcow_decode_header(const uint8_t *b, struct qcow_header *h)
{
    h->magic = vimg_ld_be32(b);
    h->version = vimg_ld_be32(b + 4);
    h->backing_off = vimg_ld_be64(b + 8);
    h->backing_len = vimg_ld_be32(b + 16);
    h->mtime = vimg_ld_be32(b + 20);
    h->size = vimg_ld_be64(b + 24);
    h->cluster_bits = b[32];
    h->l2_bits = b[33];
    h->crypt_method = vimg_ld_be32(b + 36);
    h->l1_offset = vimg_ld_be64(b + 40);
}

/*
 * The checks qemu makes at open, in its order and with its wording, and the
 * L1 entry count they imply.  *msg is qemu's message (NULL when the header is
 * fine; "version" for a version qemu's qcow driver does not take).  Not
 * static: tests/unit/test_qcow.c drives it directly.
 */
int vimg_internal_qcow_check_header(const uint8_t *hdr, uint64_t *l1_entries,
                                    const char **msg);

int vimg_internal_qcow_check_header(const uint8_t *hdr, uint64_t *l1_entries,
                                    const char **msg)
{
    struct qcow_header h;
    unsigned shift;

    qcow_decode_header(hdr, &h);
    if (QCOW_MAGIC != h.magic) {
        *msg = "Image not in qcow format";
        return -EINVAL;
    }
    if (QCOW_VERSION != h.version) {
        *msg = "version";
        return -ENOTSUP;
    }
    if (h.size <= 1) {
        *msg = "Image size is too small (must be at least 2 bytes)";
        return -EINVAL;
    }
    if (h.cluster_bits < 9 || h.cluster_bits > 16) {
        *msg = "Cluster size must be between 512 and 64k";
        return -EINVAL;
    }
    /* l2_bits counts 8-byte entries: the table is 512 B .. 64 KiB */
    if (h.l2_bits < 6 || h.l2_bits > 13) {
        *msg = "L2 table size must be between 512 and 64k";
        return -EINVAL;
    }
    if (QCOW_CRYPT_NONE != h.crypt_method && QCOW_CRYPT_AES != h.crypt_method) {
        *msg = "invalid encryption method in qcow header";
        return -EINVAL;
    }
    shift = h.cluster_bits + h.l2_bits;
    if (h.size > UINT64_MAX - (1ull << shift)) {
        *msg = "Image too large";
        return -EINVAL;
    }
    *l1_entries = (h.size + (1ull << shift) - 1) >> shift;
    if (*l1_entries > INT_MAX / sizeof(uint64_t)) {
        *msg = "Image too large";
        return -EINVAL;
    }
    if (h.backing_off && h.backing_len > QCOW_MAX_BACKING_NAME) {
        *msg = "Backing file name too long";
        return -EINVAL;
    }
    *msg = NULL;
    return 0;
}

static int qcow_probe(const uint8_t *buf, size_t len, const char *filename)
{
    if (len >= QCOW_HEADER_SIZE && QCOW_MAGIC == vimg_ld_be32(buf) &&
        QCOW_VERSION == vimg_ld_be32(buf + 4)) {
        return 100;
    }
    return 0;
}

static int qcow_io_error(struct vimg_image *img, int ret, const char *what,
                         struct vimg_error *err)
{
    vimg_error_set(err, -ret, "'%s': %s: %s", img->filename, what, strerror(-ret));
    return ret;
}

static void qcow_free_state(struct qcow_state *s)
{
    free(s->l1);
    s->l1 = NULL;
    for (int i = 0; i < QCOW_L2_CACHE; i++) {
        free(s->l2[i].tab);
        s->l2[i].tab = NULL;
        s->l2[i].off = 0;
    }
    free(s->cbuf);
    free(s->ccache);
    free(s->wbuf);
    s->cbuf = s->ccache = s->wbuf = NULL;
    free(s->app.tab);
    s->app.tab = NULL;
}

static int qcow_append_commit(struct vimg_image *img, struct vimg_error *err);

static void qcow_close(struct vimg_image *img)
{
    struct qcow_state *s = img->opaque;
    struct vimg_error err = { 0 };

    if (QCOW_APPEND_ON == s->app.state) {
        /* the engine flushes; this is for any other user of alloc_data */
        qcow_append_commit(img, &err);
        vimg_error_clear(&err);
    }
    qcow_free_state(s);
}

static int qcow_open(struct vimg_image *img, unsigned flags, struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    uint8_t hbuf[QCOW_HEADER_SIZE];
    struct qcow_header h;
    const char *msg;
    int64_t fsize;
    int ret;

    fsize = vimg_file_size(img->file);
    if (fsize < 0) {
        vimg_error_set(err, (int)-fsize, "Could not open '%s': %s", img->filename,
                       strerror((int)-fsize));
        return (int)fsize;
    }
    s->file_size = (uint64_t)fsize;
    /* Bytes past the end of a short file read as zeros, as in qemu. */
    ret = vimg_file_pread(img->file, hbuf, sizeof(hbuf), 0);
    if (ret < 0) {
        vimg_error_set(err, -ret, "Could not open '%s': %s", img->filename, strerror(-ret));
        return ret;
    }
    qcow_decode_header(hbuf, &h);
    ret = vimg_internal_qcow_check_header(hbuf, &s->l1_entries, &msg);
    if (-ENOTSUP == ret) {
        vimg_error_set(err, ENOTSUP,
                       "Could not open '%s': qcow (v1) does not support qcow version %" PRIu32
                       "%s", img->filename, h.version,
                       (2 == h.version || 3 == h.version)
                           ? "\nTry the 'qcow2' driver instead." : "");
        return ret;
    }
    if (ret < 0) {
        vimg_error_set(err, -ret, "Could not open '%s': %s", img->filename, msg);
        return ret;
    }
    s->encrypted = QCOW_CRYPT_AES == h.crypt_method;
    if (s->encrypted && !(flags & VIMG_OPEN_NO_IO)) {
        /* AES-CBC qcow is weak crypto that qemu's emulators refuse too;
         * vimg shows such images (info) but reads and writes none. */
        vimg_error_set(err, ENOTSUP, "Could not open '%s': encrypted qcow images (AES-CBC) "
                       "are not supported; decrypt the image with qemu-img first",
                       img->filename);
        return -ENOTSUP;
    }

    s->cluster_bits = h.cluster_bits;
    s->l2_bits = h.l2_bits;
    s->cluster_size = 1ull << h.cluster_bits;
    s->l2_entries = 1ull << h.l2_bits;
    s->l2_bytes = s->l2_entries * sizeof(uint64_t);
    s->offset_mask = (1ull << (63 - h.cluster_bits)) - 1;
    s->l1_offset = h.l1_offset;

    /* Only the part of the L1 table that lies inside the file is held in
     * memory (the rest reads as zeros), so memory follows the file size
     * rather than a header field. */
    s->l1_loaded = 0;
    if (h.l1_offset < s->file_size && h.l1_offset <= INT64_MAX) {
        uint64_t in_file = vimg_div_round_up(s->file_size - h.l1_offset, sizeof(uint64_t));
        s->l1_loaded = VIMG_MIN(s->l1_entries, in_file);
    }
    s->l1 = calloc(s->l1_loaded ? s->l1_loaded : 1, sizeof(uint64_t));
    s->cbuf = malloc(s->cluster_size);
    s->ccache = malloc(s->cluster_size);
    s->wbuf = malloc(s->cluster_size);
    if (!s->l1 || !s->cbuf || !s->ccache || !s->wbuf) {
        qcow_free_state(s);
        vimg_error_set(err, ENOMEM, "Could not open '%s': Could not allocate memory for "
                       "L1 table", img->filename);
        return -ENOMEM;
    }
    if (s->l1_loaded) {
        ret = vimg_file_pread(img->file, s->l1, s->l1_loaded * sizeof(uint64_t), h.l1_offset);
        if (ret < 0) {
            qcow_free_state(s);
            vimg_error_set(err, -ret, "Could not open '%s': %s", img->filename,
                           strerror(-ret));
            return ret;
        }
        for (uint64_t i = 0; i < s->l1_loaded; i++) {
            s->l1[i] = vimg_ld_be64(&s->l1[i]);
        }
    }

    if (h.backing_off) {
        char name[QCOW_MAX_BACKING_NAME + 1];
        if (h.backing_off > INT64_MAX - QCOW_MAX_BACKING_NAME) {
            qcow_free_state(s);
            vimg_error_set(err, EINVAL, "Could not open '%s': Backing file name offset "
                           "%#" PRIx64 " is invalid", img->filename, h.backing_off);
            return -EINVAL;
        }
        ret = vimg_file_pread(img->file, name, h.backing_len, h.backing_off);
        if (ret < 0) {
            qcow_free_state(s);
            vimg_error_set(err, -ret, "Could not open '%s': %s", img->filename,
                           strerror(-ret));
            return ret;
        }
        name[h.backing_len] = '\0';
        /* qemu treats the name as a C string: an embedded NUL ends it */
        if (name[0] && vimg_internal_set_backing(img, name, NULL) < 0) {
            qcow_free_state(s);
            vimg_error_set(err, ENOMEM, "out of memory");
            return -ENOMEM;
        }
    }

    /* qemu counts whole sectors: a size of 64M+1 is 64M */
    img->size = h.size / QCOW_SECTOR * QCOW_SECTOR;
    img->limits.cluster_size = s->cluster_size;
    return 0;
}

/* The L2 table at host offset off, through a small round-robin cache. */
static int qcow_get_l2(struct vimg_image *img, uint64_t off, uint64_t **tab,
                       struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    struct qcow_l2_slot *slot;
    int ret;

    for (int i = 0; i < QCOW_L2_CACHE; i++) {
        if (s->l2[i].tab && s->l2[i].off == off) {
            *tab = s->l2[i].tab;
            return 0;
        }
    }
    if (off > INT64_MAX - s->l2_bytes) {
        vimg_error_set(err, EIO, "'%s': L2 table offset %#" PRIx64 " is invalid",
                       img->filename, off);
        return -EIO;
    }
    slot = &s->l2[s->l2_next];
    s->l2_next = (s->l2_next + 1) % QCOW_L2_CACHE;
    if (!slot->tab) {
        slot->tab = malloc(s->l2_bytes);
        if (!slot->tab) {
            vimg_error_set(err, ENOMEM, "out of memory");
            return -ENOMEM;
        }
    }
    slot->off = 0;
    ret = vimg_file_pread(img->file, slot->tab, s->l2_bytes, off);
    if (ret < 0) {
        return qcow_io_error(img, ret, "could not read L2 table", err);
    }
    for (uint64_t i = 0; i < s->l2_entries; i++) {
        slot->tab[i] = vimg_ld_be64(&slot->tab[i]);
    }
    slot->off = off;
    *tab = slot->tab;
    return 0;
}

static uint64_t qcow_l1_entry(struct qcow_state *s, uint64_t idx)
{
    return idx < s->l1_loaded ? s->l1[idx] : 0;
}

static int qcow_block_status(struct vimg_image *img, uint64_t offset, uint64_t max_len,
                             struct vimg_run *run, struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    unsigned shift = s->cluster_bits + s->l2_bits;
    uint64_t l1_idx = offset >> shift;
    uint64_t in_cluster = offset & (s->cluster_size - 1);
    uint64_t l2_off = qcow_l1_entry(s, l1_idx);
    uint64_t *l2, idx, entry;
    int ret;

    if (!l2_off) {
        /* a whole unallocated L1 range costs nothing to report; entries
         * past the end of the file are all zero */
        uint64_t end = (l1_idx + 1) << shift;
        while (end - offset < max_len && l1_idx + 1 < s->l1_loaded &&
               !s->l1[l1_idx + 1]) {
            l1_idx++;
            end = (l1_idx + 1) << shift;
        }
        if (l1_idx + 1 >= s->l1_loaded) {
            end = VIMG_MAX(end, img->size);
        }
        run->length = end - offset;
        run->flags = 0;
        return 0;
    }
    ret = qcow_get_l2(img, l2_off, &l2, err);
    if (ret < 0) {
        return ret;
    }
    idx = (offset >> s->cluster_bits) & (s->l2_entries - 1);
    entry = l2[idx];
    run->length = s->cluster_size - in_cluster;
    if (!entry) {
        while (run->length < max_len && idx + 1 < s->l2_entries && !l2[idx + 1]) {
            idx++;
            run->length += s->cluster_size;
        }
        run->flags = 0;
        return 0;
    }
    if (entry & QCOW_OFLAG_COMPRESSED) {
        run->flags = VIMG_RUN_DATA | VIMG_RUN_ALLOCATED | VIMG_RUN_COMPRESSED;
        return 0;
    }
    if (entry & (QCOW_SECTOR - 1) || entry > INT64_MAX - s->cluster_size ||
        entry >= s->file_size) {
        vimg_error_set(err, EIO, "'%s': data cluster offset %#" PRIx64 " for guest offset %"
                       PRIu64 " is %s", img->filename, entry, offset,
                       (entry & (QCOW_SECTOR - 1)) ? "not sector aligned"
                                                    : "beyond the end of the file");
        return -EIO;
    }
    run->flags = VIMG_RUN_DATA | VIMG_RUN_ALLOCATED | VIMG_RUN_HOST_VALID;
    run->host = img->file;
    run->host_off = entry + in_cluster;
    /* contiguous host clusters make one run */
    while (run->length < max_len && idx + 1 < s->l2_entries &&
           l2[idx + 1] == entry + s->cluster_size && entry + s->cluster_size < s->file_size) {
        idx++;
        entry += s->cluster_size;
        run->length += s->cluster_size;
    }
    return 0;
}

static int qcow_load_compressed(struct vimg_image *img, uint64_t entry,
                                struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    uint64_t coff = entry & s->offset_mask;
    uint64_t csize = (entry >> (63 - s->cluster_bits)) & (s->cluster_size - 1);
    int ret;

    if (s->ccache_entry == entry) {
        return 0;
    }
    s->ccache_entry = 0;
    if (coff > INT64_MAX - csize || coff + csize > s->file_size) {
        vimg_error_set(err, EIO, "'%s': compressed cluster at %#" PRIx64 " (%" PRIu64
                       " bytes) lies beyond the end of the file", img->filename, coff, csize);
        return -EIO;
    }
    ret = vimg_file_pread(img->file, s->cbuf, csize, coff);
    if (ret < 0) {
        return qcow_io_error(img, ret, "could not read compressed cluster", err);
    }
    /* raw deflate, 4 KiB window; trailing input is fine once the cluster
     * is complete */
    ret = vimg_inflate_raw(s->ccache, s->cluster_size, s->cbuf, csize, 12);
    if (ret < 0) {
        vimg_error_set(err, -ret, "'%s': compressed cluster at %#" PRIx64 " is corrupt: %s",
                       img->filename, coff, strerror(-ret));
        return ret;
    }
    s->ccache_entry = entry;
    return 0;
}

/* The L2 entry for guest offset, or 0; *l2_off gets the table's offset. */
static int qcow_lookup(struct vimg_image *img, uint64_t offset, uint64_t *entry,
                       struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    uint64_t l2_off = qcow_l1_entry(s, offset >> (s->cluster_bits + s->l2_bits));
    uint64_t *l2;
    int ret;

    *entry = 0;
    if (!l2_off) {
        return 0;
    }
    ret = qcow_get_l2(img, l2_off, &l2, err);
    if (ret < 0) {
        return ret;
    }
    *entry = l2[(offset >> s->cluster_bits) & (s->l2_entries - 1)];
    return 0;
}

static int qcow_read_special(struct vimg_image *img, void *buf, size_t len, uint64_t offset,
                             struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    uint8_t *p = buf;

    while (len) {
        uint64_t in_cluster = offset & (s->cluster_size - 1);
        size_t n = (size_t)VIMG_MIN(len, s->cluster_size - in_cluster);
        uint64_t entry;
        int ret = qcow_lookup(img, offset, &entry, err);
        if (ret < 0) {
            return ret;
        }
        if (!(entry & QCOW_OFLAG_COMPRESSED)) {
            vimg_error_set(err, EIO, "'%s': cluster at guest offset %" PRIu64
                           " is not compressed", img->filename, offset);
            return -EIO;
        }
        ret = qcow_load_compressed(img, entry, err);
        if (ret < 0) {
            return ret;
        }
        memcpy(p, s->ccache + in_cluster, n);
        p += n;
        offset += n;
        len -= n;
    }
    return 0;
}

/* Append position: the end of the file rounded up to align. */
static int qcow_append_at(struct vimg_image *img, uint64_t align, uint64_t len,
                          uint64_t *out, struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    uint64_t off, end;

    if (!vimg_round_up(s->file_size, align, &off) || !vimg_add_ok(off, len, &end) ||
        end > INT64_MAX) {
        vimg_error_set(err, EFBIG, "'%s': the image file cannot grow any further",
                       img->filename);
        return -EFBIG;
    }
    *out = off;
    return 0;
}

static void qcow_grew(struct qcow_state *s, uint64_t end)
{
    if (end > s->file_size) {
        s->file_size = end;
    }
}

static int qcow_pwrite(struct vimg_image *img, const void *buf, size_t len,
                       uint64_t host_off, const char *what, struct vimg_error *err)
{
    int ret = vimg_file_pwrite(img->file, buf, len, host_off);
    if (ret < 0) {
        return qcow_io_error(img, ret, what, err);
    }
    qcow_grew(img->opaque, host_off + len);
    return 0;
}

static int qcow_write_be64(struct vimg_image *img, uint64_t host_off, uint64_t val,
                           const char *what, struct vimg_error *err)
{
    uint8_t b[8];

    vimg_st_be64(b, val);
    return qcow_pwrite(img, b, sizeof(b), host_off, what, err);
}

/* A new, zeroed L2 table at the end of the file for L1 entry l1_idx. */
static int qcow_alloc_l2(struct vimg_image *img, uint64_t l1_idx, uint64_t *l2_off,
                         struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    struct qcow_l2_slot *slot;
    uint64_t off;
    int ret;

    if (l1_idx >= s->l1_loaded) {
        vimg_error_set(err, EIO, "'%s': L1 table entry %" PRIu64 " lies beyond the end of "
                       "the file", img->filename, l1_idx);
        return -EIO;
    }
    ret = qcow_append_at(img, s->cluster_size, s->l2_bytes, &off, err);
    if (ret < 0) {
        return ret;
    }
    /* the L1 entry first, as qemu does; the table is zeroed right after */
    ret = qcow_write_be64(img, s->l1_offset + l1_idx * sizeof(uint64_t), off,
                          "could not update L1 table", err);
    if (ret < 0) {
        return ret;
    }
    s->l1[l1_idx] = off;
    slot = &s->l2[s->l2_next];
    s->l2_next = (s->l2_next + 1) % QCOW_L2_CACHE;
    if (!slot->tab) {
        slot->tab = malloc(s->l2_bytes);
        if (!slot->tab) {
            vimg_error_set(err, ENOMEM, "out of memory");
            return -ENOMEM;
        }
    }
    memset(slot->tab, 0, s->l2_bytes);
    slot->off = 0;
    ret = qcow_pwrite(img, slot->tab, s->l2_bytes, off, "could not write L2 table", err);
    if (ret < 0) {
        return ret;
    }
    slot->off = off;
    *l2_off = off;
    return 0;
}

/* The L2 table of guest offset, allocated when missing; *idx is the entry. */
static int qcow_l2_for_write(struct vimg_image *img, uint64_t offset, uint64_t *l2_off,
                             uint64_t **tab, uint64_t *idx, struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    uint64_t l1_idx = offset >> (s->cluster_bits + s->l2_bits);
    int ret;

    *l2_off = qcow_l1_entry(s, l1_idx);
    if (!*l2_off) {
        ret = qcow_alloc_l2(img, l1_idx, l2_off, err);
        if (ret < 0) {
            return ret;
        }
    }
    ret = qcow_get_l2(img, *l2_off, tab, err);
    if (ret < 0) {
        return ret;
    }
    *idx = (offset >> s->cluster_bits) & (s->l2_entries - 1);
    return 0;
}

static int qcow_set_l2(struct vimg_image *img, uint64_t l2_off, uint64_t *tab,
                       uint64_t idx, uint64_t entry, struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    int ret = qcow_write_be64(img, l2_off + idx * sizeof(uint64_t), entry,
                              "could not update L2 table", err);
    if (ret < 0) {
        return ret;
    }
    if (s->ccache_entry && s->ccache_entry == tab[idx]) {
        s->ccache_entry = 0;
    }
    tab[idx] = entry;
    return 0;
}

/* What an unwritten part of a fresh cluster must read as: the old
 * (decompressed) content, the backing image's data, or zeros.  Returns 1 when
 * wbuf holds it, 0 when the cluster is all zeros. */
static int qcow_cluster_base(struct vimg_image *img, uint64_t cluster_start, uint64_t entry,
                             struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    uint64_t len = VIMG_MIN(s->cluster_size, img->size - cluster_start);
    int ret;

    memset(s->wbuf, 0, s->cluster_size);
    if (entry & QCOW_OFLAG_COMPRESSED) {
        ret = qcow_load_compressed(img, entry, err);
        if (ret < 0) {
            return ret;
        }
        memcpy(s->wbuf, s->ccache, s->cluster_size);
        return 1;
    }
    if (!img->backing && img->backing_name) {
        /* zeros would silently replace the backing file's data */
        vimg_error_set(err, EIO, "'%s': a write of part of the cluster at %" PRIu64
                       " needs the backing file, which is not open", img->filename,
                       cluster_start);
        return -EIO;
    }
    if (img->backing && cluster_start < vimg_size(img->backing)) {
        len = VIMG_MIN(len, vimg_size(img->backing) - cluster_start);
        ret = vimg_pread(img->backing, s->wbuf, len, cluster_start, err);
        if (ret < 0) {
            return ret;
        }
        return !vimg_is_zero(s->wbuf, len);
    }
    return 0;
}

/*
 * The append-mode writer (driver.h, alloc_data).  convert into a fresh qcow
 * image hands data clusters out in guest order and the copy engine writes
 * them itself, asynchronously.  The layout is qemu's (get_cluster_offset):
 * an L2 table goes to the end of the file, rounded up to a cluster, when
 * its span gets its first data cluster, and every new data cluster goes to
 * the end of the file rounded up to a cluster.  qemu sizes the file and
 * writes only the bytes it was given, so the rest of a cluster is a hole
 * here too.  Only the table being filled lives in memory; it is written
 * when the guest offsets move past its span, and the L1 entries, held in
 * s->l1, once, at commit (flush or close), after the data and tables: until
 * then the file reads as an empty image, so a crash leaves a valid one.
 *
 * Any other write (plain, compressed) commits first and turns the writer
 * off; from then on the normal write path sees the committed metadata.
 */
static bool qcow_append_eligible(struct vimg_image *img)
{
    struct qcow_state *s = img->opaque;

    /* copy-on-write from a backing file needs the normal path, as does
     * anything already mapped or an L1 table that does not fit the file */
    if (!(img->flags & VIMG_OPEN_RDWR) || img->backing_name || s->encrypted ||
        s->l1_loaded != s->l1_entries) {
        return false;
    }
    for (uint64_t i = 0; i < s->l1_loaded; i++) {
        if (s->l1[i]) {
            return false;
        }
    }
    return true;
}

/* Space for len bytes at the append point rounded up to a cluster, as
 * qemu places both tables and data clusters.  A plain L2 entry must stay
 * below bit 63 and keep a whole cluster readable (qemu: -E2BIG). */
static int qcow_append_place(struct vimg_image *img, uint64_t len, uint64_t *out,
                             struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    uint64_t off, end;

    if (!vimg_round_up(s->app.next, s->cluster_size, &off) ||
        !vimg_add_ok(off, VIMG_MAX(len, s->cluster_size), &end) || end > INT64_MAX) {
        vimg_error_set(err, EFBIG, "'%s': the image file would grow past the largest "
                       "offset qcow can record", img->filename);
        return -EFBIG;
    }
    *out = off;
    return 0;
}

/* The filled L2 table goes to the place reserved for it; its L1 entry
 * waits for commit, in memory. */
static int qcow_append_put_table(struct vimg_image *img, struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    struct qcow_append *a = &s->app;
    int ret;

    if (UINT64_MAX == a->l1_idx) {
        return 0;
    }
    for (uint64_t i = 0; i < s->l2_entries; i++) {
        vimg_st_be64(&a->tab[i], a->tab[i]);
    }
    ret = qcow_pwrite(img, a->tab, s->l2_bytes, a->tab_host, "could not write L2 table", err);
    memset(a->tab, 0, s->l2_bytes);
    if (ret < 0) {
        return ret;
    }
    s->l1[a->l1_idx] = a->tab_host;
    if (a->l1_lo == a->l1_hi) {
        a->l1_lo = a->l1_idx;
    }
    a->l1_hi = a->l1_idx + 1;
    a->l1_idx = UINT64_MAX;
    return 0;
}

static int qcow_alloc_data(struct vimg_image *img, uint64_t offset, uint64_t len,
                           struct vimg_run *run, struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    struct qcow_append *a = &s->app;
    unsigned shift = s->cluster_bits + s->l2_bits;
    uint64_t cs = s->cluster_size, l1_idx, pos, end, host0 = 0;
    int ret;

    if (QCOW_APPEND_UNKNOWN == a->state) {
        int64_t fsize = vimg_file_size(img->file);
        if (fsize < 0) {
            return qcow_io_error(img, (int)fsize, "could not get the file size", err);
        }
        if (!qcow_append_eligible(img)) {
            a->state = QCOW_APPEND_OFF;
        } else {
            a->tab = calloc(s->l2_entries, sizeof(uint64_t));
            if (!a->tab) {
                vimg_error_set(err, ENOMEM, "out of memory");
                return -ENOMEM;
            }
            a->start = a->next = (uint64_t)fsize;
            a->l1_idx = UINT64_MAX;
            a->l1_lo = a->l1_hi = 0;
            a->state = QCOW_APPEND_ON;
        }
    }
    if (QCOW_APPEND_ON != a->state) {
        /* the engine falls back to plain writes; no message */
        return -ENOTSUP;
    }
    if (!len || offset >= img->size) {
        vimg_error_set(err, EINVAL, "'%s': no data to place at offset %" PRIu64,
                       img->filename, offset);
        return -EINVAL;
    }
    l1_idx = offset >> shift;
    if (l1_idx >= s->l1_entries) {
        vimg_error_set(err, EIO, "'%s': offset %" PRIu64 " lies beyond the L1 table",
                       img->filename, offset);
        return -EIO;
    }
    if (l1_idx != a->l1_idx) {
        uint64_t tab_host;

        if (UINT64_MAX != a->l1_idx && l1_idx < a->l1_idx) {
            vimg_error_set(err, EINVAL, "'%s': append-mode writes must come in guest "
                           "order", img->filename);
            return -EINVAL;
        }
        ret = qcow_append_put_table(img, err);
        if (ret < 0) {
            return ret;
        }
        /* a span gets its table just before its first data cluster */
        ret = qcow_append_place(img, s->l2_bytes, &tab_host, err);
        if (ret < 0) {
            return ret;
        }
        a->l1_idx = l1_idx;
        a->tab_host = tab_host;
        a->next = tab_host + s->l2_bytes;
    }
    /* one contiguous host run, within this L2 table's span */
    end = VIMG_MIN(offset + len, (l1_idx + 1) << shift);
    end = VIMG_MIN(end, vimg_div_round_up(img->size, cs) * cs);
    for (pos = offset; pos < end;) {
        uint64_t l2i = (pos >> s->cluster_bits) & (s->l2_entries - 1);
        uint64_t in = pos & (cs - 1);
        uint64_t host = a->tab[l2i];

        if (!host) {
            ret = qcow_append_place(img, cs, &host, err);
            if (ret < 0 && host0) {
                /* hand out what is placed; the next call reports it */
                vimg_error_clear(err);
                break;
            }
            if (ret < 0) {
                return ret;
            }
            if (host0 && host + in != host0 + (pos - offset)) {
                break;
            }
            a->next = host + cs;
            a->tab[l2i] = host;
        }
        if (!host0) {
            host0 = host + in;
        } else if (host + in != host0 + (pos - offset)) {
            break;
        }
        pos += VIMG_MIN(cs - in, end - pos);
    }
    run->flags = VIMG_RUN_HOST_VALID;
    run->host = img->file;
    run->host_off = host0;
    run->length = pos - offset;
    return 0;
}

static int qcow_append_commit(struct vimg_image *img, struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    struct qcow_append *a = &s->app;
    uint64_t buf[512];
    int ret;

    if (QCOW_APPEND_ON != a->state) {
        a->state = QCOW_APPEND_OFF;
        return 0;
    }
    a->state = QCOW_APPEND_OFF;
    ret = qcow_append_put_table(img, err);
    free(a->tab);
    a->tab = NULL;
    if (ret < 0 || a->next == a->start) {
        return ret;
    }
    /* the host file covers every cluster handed out, as qemu's truncate
     * to the end of each new cluster leaves it */
    if ((ret = vimg_file_cover(img->file, a->next)) < 0) {
        return qcow_io_error(img, ret, "could not grow the file", err);
    }
    qcow_grew(s, a->next);
    /* no cached table may stand for space this writer filled */
    for (int i = 0; i < QCOW_L2_CACHE; i++) {
        s->l2[i].off = 0;
    }
    /* data and tables before the L1 entries that reference them */
    ret = vimg_file_sync(img->file);
    if (ret < 0) {
        return qcow_io_error(img, ret, "could not flush", err);
    }
    for (uint64_t i = a->l1_lo; i < a->l1_hi;) {
        uint64_t n = VIMG_MIN(a->l1_hi - i, VIMG_ARRAY_SIZE(buf));
        for (uint64_t k = 0; k < n; k++) {
            vimg_st_be64(&buf[k], s->l1[i + k]);
        }
        ret = qcow_pwrite(img, buf, n * sizeof(uint64_t), s->l1_offset + i * sizeof(uint64_t),
                          "could not update L1 table", err);
        if (ret < 0) {
            return ret;
        }
        i += n;
    }
    return 0;
}

static int qcow_write(struct vimg_image *img, const void *buf, size_t len, uint64_t offset,
                      struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    const uint8_t *p = buf;
    int ret;

    /* a write outside the append-mode writer: its metadata first */
    ret = qcow_append_commit(img, err);
    if (ret < 0) {
        return ret;
    }
    while (len) {
        uint64_t in_cluster = offset & (s->cluster_size - 1);
        uint64_t cluster_start = offset - in_cluster;
        size_t n = (size_t)VIMG_MIN(len, s->cluster_size - in_cluster);
        uint64_t l2_off, idx, entry, host;
        uint64_t *tab;

        ret = qcow_l2_for_write(img, offset, &l2_off, &tab, &idx, err);
        if (ret < 0) {
            return ret;
        }
        entry = tab[idx];
        if (entry && !(entry & QCOW_OFLAG_COMPRESSED)) {
            if ((entry & (QCOW_SECTOR - 1)) || entry > INT64_MAX - s->cluster_size) {
                vimg_error_set(err, EIO, "'%s': data cluster offset %#" PRIx64 " is invalid",
                               img->filename, entry);
                return -EIO;
            }
            ret = qcow_pwrite(img, p, n, entry + in_cluster, "could not write data", err);
            if (ret < 0) {
                return ret;
            }
        } else {
            /* A new cluster at the end of the file.  Whatever the write does
             * not cover keeps reading as before: copied from the compressed
             * cluster or the backing image (copy-on-write). */
            ret = qcow_append_at(img, s->cluster_size, s->cluster_size, &host, err);
            if (ret < 0) {
                return ret;
            }
            if (n == s->cluster_size) {
                ret = qcow_pwrite(img, p, n, host, "could not write data", err);
            } else {
                ret = qcow_cluster_base(img, cluster_start, entry, err);
                if (ret > 0) {
                    memcpy(s->wbuf + in_cluster, p, n);
                    ret = qcow_pwrite(img, s->wbuf, s->cluster_size, host,
                                      "could not write data", err);
                } else if (0 == ret) {
                    /* like qemu: size the file, then write only the data */
                    ret = img->file->ops->truncate(img->file, host + s->cluster_size);
                    if (ret < 0) {
                        return qcow_io_error(img, ret, "could not grow the file", err);
                    }
                    qcow_grew(s, host + s->cluster_size);
                    ret = qcow_pwrite(img, p, n, host + in_cluster, "could not write data",
                                      err);
                }
            }
            if (ret < 0) {
                return ret;
            }
            ret = qcow_set_l2(img, l2_off, tab, idx, host, err);
            if (ret < 0) {
                return ret;
            }
        }
        p += n;
        offset += n;
        len -= n;
    }
    return 0;
}

/* Thread-safe: compresses one cluster (the short last one padded with
 * zeros) without touching the image's state. */
static long qcow_compress_cluster(struct vimg_image *img, void *out, size_t out_cap,
                                  const void *buf, size_t len, struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    uint8_t *pad = NULL;
    const uint8_t *in = buf;
    long clen;

    if (len > s->cluster_size) {
        vimg_error_set(err, EINVAL, "'%s': compressed writes must cover one whole cluster",
                       img->filename);
        return -EINVAL;
    }
    if (out_cap < 2) {
        return -ENOSPC;
    }
    if (len < s->cluster_size) {
        pad = calloc(1, s->cluster_size);
        if (!pad) {
            vimg_error_set(err, ENOMEM, "out of memory");
            return -ENOMEM;
        }
        memcpy(pad, buf, len);
        in = pad;
    }
    /* raw deflate, 4 KiB window, as qemu reads it back; the result must be
     * smaller than a cluster, or qemu stores it plainly */
    clen = vimg_deflate_raw(out, VIMG_MIN(out_cap, s->cluster_size) - 1, in, s->cluster_size,
                            12);
    free(pad);
    if (clen < 0 && -ENOSPC != clen) {
        vimg_error_set(err, EIO, "'%s': compression failed", img->filename);
    }
    return clen;
}

static int qcow_write_compressed_data(struct vimg_image *img, const void *cdata, size_t clen,
                                      size_t len, uint64_t offset, struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    uint64_t l2_off, idx, coff, *tab;
    int ret;

    ret = qcow_append_commit(img, err);
    if (ret < 0) {
        return ret;
    }

    if ((offset & (s->cluster_size - 1)) || !clen || clen >= s->cluster_size ||
        len > s->cluster_size || (len != s->cluster_size && offset + len != img->size)) {
        vimg_error_set(err, EINVAL, "'%s': compressed writes must cover one whole cluster",
                       img->filename);
        return -EINVAL;
    }
    ret = qcow_l2_for_write(img, offset, &l2_off, &tab, &idx, err);
    if (ret < 0) {
        return ret;
    }
    if (tab[idx]) {
        vimg_error_set(err, EINVAL, "'%s': compressed write to the allocated cluster at "
                       "guest offset %" PRIu64, img->filename, offset);
        return -EINVAL;
    }
    /* compressed clusters are packed at sector granularity */
    ret = qcow_append_at(img, QCOW_SECTOR, clen, &coff, err);
    if (ret < 0) {
        return ret;
    }
    if (coff > s->offset_mask) {
        vimg_error_set(err, EFBIG, "'%s': compressed cluster offset %#" PRIx64
                       " does not fit in an L2 entry", img->filename, coff);
        return -EFBIG;
    }
    ret = qcow_pwrite(img, cdata, clen, coff, "could not write compressed data", err);
    if (ret < 0) {
        return ret;
    }
    return qcow_set_l2(img, l2_off, tab, idx,
                       coff | QCOW_OFLAG_COMPRESSED |
                       ((uint64_t)clen << (63 - s->cluster_bits)), err);
}

static int qcow_write_compressed(struct vimg_image *img, const void *buf, size_t len,
                                 uint64_t offset, struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    uint64_t entry;
    long clen;
    int ret;

    /* qemu-img convert ends with a zero-length compressed write ("align the
     * end of the file"); qcow has nothing to align.  (qemu's qcow driver
     * fails it with EINVAL, which makes `convert -c -O qcow` exit 1.) */
    if (0 == len) {
        return 0;
    }
    ret = qcow_append_commit(img, err);
    if (ret < 0) {
        return ret;
    }
    ret = qcow_lookup(img, offset, &entry, err);
    if (ret < 0) {
        return ret;
    }
    clen = entry ? -ENOSPC : qcow_compress_cluster(img, s->cbuf, s->cluster_size, buf, len,
                                                   err);
    if (-ENOSPC == clen) {
        /* incompressible, or already allocated: store it plainly */
        return qcow_write(img, buf, len, offset, err);
    }
    if (clen < 0) {
        return (int)clen;
    }
    return qcow_write_compressed_data(img, s->cbuf, (size_t)clen, len, offset, err);
}

static int qcow_flush(struct vimg_image *img, struct vimg_error *err)
{
    int ret = qcow_append_commit(img, err);
    if (ret < 0) {
        return ret;
    }
    ret = vimg_file_sync(img->file);
    if (ret < 0) {
        vimg_error_set(err, -ret, "Could not flush '%s': %s", img->filename, strerror(-ret));
    }
    return ret;
}

static int qcow_image_info(struct vimg_image *img, bool *dirty, bool *encrypted,
                           struct vimg_qobj **snapshots, struct vimg_error *err)
{
    struct qcow_state *s = img->opaque;
    *encrypted = s->encrypted;
    return 0;
}

static bool qcow_has_zero_init(struct vimg_image *img)
{
    return true;
}

/* Format names qemu 7.2 knows, for the backing_fmt sanity check (qcow v1
 * cannot store a backing format, so qemu checks the name and drops it). */
static bool qcow_known_format(const char *fmt)
{
    static const char *const qemu_formats[] = {
        "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress",
        "copy-before-write", "copy-on-read", "dmg", "file", "host_cdrom", "host_device",
        "luks", "nbd", "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow",
        "qcow2", "qed", "quorum", "raw", "snapshot-access", "throttle", "vdi", "vhdx",
        "vmdk", "vpc", "vvfat",
    };
    if (vimg_internal_find_driver(fmt)) {
        return true;
    }
    for (size_t i = 0; i < VIMG_ARRAY_SIZE(qemu_formats); i++) {
        if (0 == strcmp(fmt, qemu_formats[i])) {
            return true;
        }
    }
    return false;
}

static int qcow_create(const char *filename, const struct vimg_opts *opts,
                       struct vimg_error *err)
{
    uint64_t size = vimg_internal_opt_size(opts, "size", 0);
    const char *backing = vimg_internal_opt_str(opts, "backing_file", NULL);
    const char *backing_fmt = vimg_internal_opt_str(opts, "backing_fmt", NULL);
    const char *enc_fmt = vimg_internal_opt_str(opts, "encrypt.format", NULL);
    bool encrypt = vimg_internal_opt_bool(opts, "encryption", false);
    uint8_t hdr[QCOW_HEADER_SIZE] = { 0 };
    static const uint8_t zeros[QCOW_SECTOR];
    unsigned cluster_bits, l2_bits;
    uint64_t header_size, l1_entries, l1_bytes;
    size_t backing_len = 0;
    struct vimg_file *f;
    int ret;

    if (backing_fmt && !qcow_known_format(backing_fmt)) {
        vimg_error_set(err, EINVAL, "unrecognized backing format '%s'", backing_fmt);
        return -EINVAL;
    }
    /* qemu creates (and empties) the file before it looks at the rest */
    ret = vimg_file_open_posix(&f, filename, VIMG_FILE_RDWR | VIMG_FILE_CREATE);
    if (ret < 0) {
        vimg_error_set(err, -ret, "Could not create '%s': %s", filename, strerror(-ret));
        return ret;
    }
    ret = vimg_internal_lock_file(f, VIMG_PERM_WRITE | VIMG_PERM_RESIZE, VIMG_PERM_RESIZE,
                                  err);
    if (ret < 0) {
        vimg_file_close(f);
        return ret;
    }
    ret = f->ops->truncate(f, 0);
    if (ret < 0) {
        vimg_error_set(err, -ret, "Could not clear the file: %s", strerror(-ret));
        goto out;
    }
    if (!vimg_round_up(size, QCOW_SECTOR, &size)) {
        ret = -EFBIG;
        vimg_error_set(err, EFBIG, "Image size too large");
        goto out;
    }
    if (0 == size) {
        ret = -EINVAL;
        vimg_error_set(err, EINVAL, "Image size is too small, cannot be zero length");
        goto out;
    }
    if (enc_fmt && strcmp(enc_fmt, "aes")) {
        ret = -EINVAL;
        vimg_error_set(err, EINVAL, "Unsupported encryption format");
        goto out;
    }
    if (encrypt || enc_fmt) {
        ret = -ENOTSUP;
        if (!vimg_opts_get(opts, "encrypt.key-secret")) {
            vimg_error_set(err, EINVAL, "Parameter 'encrypt.key-secret' is required for cipher");
        } else {
            vimg_error_set(err, ENOTSUP, "encrypted qcow images (AES-CBC) are not supported");
        }
        goto out;
    }
    header_size = QCOW_HEADER_SIZE;
    /* "fat:" names qemu's vvfat pseudo backing file, which it drops */
    if (backing && strcmp(backing, "fat:")) {
        backing_len = strlen(backing);
        if (backing_len > QCOW_MAX_BACKING_NAME) {
            ret = -EINVAL;
            vimg_error_set(err, EINVAL, "Backing file name too long");
            goto out;
        }
        vimg_st_be64(hdr + 8, QCOW_HEADER_SIZE);
        vimg_st_be32(hdr + 16, (uint32_t)backing_len);
        header_size += backing_len;
        /* 512-byte clusters: a write never has to copy unmodified sectors */
        cluster_bits = 9;
        l2_bits = 12;
    } else {
        backing = NULL;
        cluster_bits = 12;
        l2_bits = 9;
    }
    header_size = (header_size + 7) & ~7ull;
    l1_entries = vimg_div_round_up(size, 1ull << (cluster_bits + l2_bits));
    if (l1_entries > INT_MAX / sizeof(uint64_t)) {
        /* qemu would write an image it then refuses to open */
        ret = -EFBIG;
        vimg_error_set(err, EFBIG, "Image too large");
        goto out;
    }
    l1_bytes = l1_entries * sizeof(uint64_t);
    vimg_st_be32(hdr, QCOW_MAGIC);
    vimg_st_be32(hdr + 4, QCOW_VERSION);
    vimg_st_be64(hdr + 24, size);
    hdr[32] = (uint8_t)cluster_bits;
    hdr[33] = (uint8_t)l2_bits;
    vimg_st_be32(hdr + 36, QCOW_CRYPT_NONE);
    vimg_st_be64(hdr + 40, header_size);
    ret = vimg_file_pwrite(f, hdr, sizeof(hdr), 0);
    if (0 == ret && backing) {
        ret = vimg_file_pwrite(f, backing, backing_len, QCOW_HEADER_SIZE);
    }
    /* the L1 table is written as zeros, in whole sectors, like qemu */
    for (uint64_t off = 0; 0 == ret && off < l1_bytes; off += QCOW_SECTOR) {
        ret = vimg_file_pwrite(f, zeros, QCOW_SECTOR, header_size + off);
    }
    if (ret < 0) {
        vimg_error_set(err, -ret, "Could not write '%s': %s", filename, strerror(-ret));
    }
out:
    vimg_file_close(f);
    return ret;
}

static const struct vimg_opt_desc qcow_create_opts[] = {
    { "size", VIMG_OPT_SIZE, "Virtual disk size", NULL },
    { "backing_file", VIMG_OPT_STRING, "File name of a base image", NULL },
    { "backing_fmt", VIMG_OPT_STRING, "Format of the backing image", NULL },
    { "encryption", VIMG_OPT_BOOL, "Encrypt the image with format 'aes'. (Deprecated in "
      "favor of encrypt.format=aes)", NULL },
    { "encrypt.format", VIMG_OPT_STRING, "Encrypt the image, format choices: 'aes'", NULL },
    { "encrypt.key-secret", VIMG_OPT_STRING,
      "ID of the secret that provides the AES encryption key", NULL },
    { NULL },
};

const struct vimg_driver vimg_driver_qcow = {
    .abi_version = VIMG_DRIVER_ABI_VERSION,
    .name = "qcow",
    .instance_size = sizeof(struct qcow_state),
    .probe = qcow_probe,
    .create_opts = qcow_create_opts,
    .open = qcow_open,
    .close = qcow_close,
    .create = qcow_create,
    .block_status = qcow_block_status,
    .read_special = qcow_read_special,
    .alloc_data = qcow_alloc_data,
    .write = qcow_write,
    .flush = qcow_flush,
    .has_zero_init = qcow_has_zero_init,
    .write_compressed = qcow_write_compressed,
    .image_info = qcow_image_info,
    .compress_cluster = qcow_compress_cluster,
    .write_compressed_data = qcow_write_compressed_data,
};

/* qcow2: the table cache, L1/L2 lookup, block status and compressed reads. */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "formats/qcow2/qcow2.h"
#include "util/util.h"

void qcow2_cache_free(struct qcow2_cache *c)
{
    for (int i = 0; i < QCOW2_L2_CACHE; i++) {
        free(c->ent[i].data);
        c->ent[i].data = NULL;
        c->ent[i].off = 0;
    }
}

void qcow2_cache_drop(struct qcow2_cache *c, uint64_t off)
{
    for (int i = 0; i < c->n; i++) {
        if (c->ent[i].off == off) {
            c->ent[i].off = 0;
            c->ent[i].dirty = false;
        }
    }
}

void qcow2_cache_mark_dirty(struct qcow2_cache *c, uint64_t off)
{
    for (int i = 0; i < c->n; i++) {
        if (c->ent[i].off == off && c->ent[i].data) {
            c->ent[i].dirty = true;
        }
    }
}

static int qcow2_cache_write(struct vimg_image *img, struct qcow2_cache_ent *e,
                             struct vimg_error *err)
{
    int ret = vimg_file_pwrite(img->file, e->data, qcow2_s(img)->cluster_size, e->off);
    if (ret < 0) {
        return qcow2_io_error(img, ret, "Could not write metadata", err);
    }
    e->dirty = false;
    return 0;
}

int qcow2_cache_flush(struct vimg_image *img, struct qcow2_cache *c, struct vimg_error *err)
{
    for (int i = 0; i < c->n; i++) {
        if (c->ent[i].off && c->ent[i].dirty) {
            int ret = qcow2_cache_write(img, &c->ent[i], err);
            if (ret < 0) {
                return ret;
            }
        }
    }
    return 0;
}

/* Tables are written through at once by their users, so an entry can be
 * evicted at any time without a write-back. */
int qcow2_cache_get(struct vimg_image *img, struct qcow2_cache *c, uint64_t off,
                    bool fill, uint8_t **out, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    int victim = 0;
    int ret;

    for (int i = 0; i < c->n; i++) {
        if (c->ent[i].off == off && c->ent[i].data) {
            c->ent[i].lru = ++c->tick;
            *out = c->ent[i].data;
            return 0;
        }
    }
    for (int i = 1; i < c->n; i++) {
        if (!c->ent[victim].off) {
            break;
        }
        if (!c->ent[i].off || c->ent[i].lru < c->ent[victim].lru) {
            victim = i;
        }
    }
    if (!c->ent[victim].data) {
        c->ent[victim].data = malloc(s->cluster_size);
        if (!c->ent[victim].data) {
            vimg_error_set(err, ENOMEM, "out of memory");
            return -ENOMEM;
        }
    }
    if (c->ent[victim].off && c->ent[victim].dirty) {
        ret = qcow2_cache_write(img, &c->ent[victim], err);
        if (ret < 0) {
            return ret;
        }
    }
    c->ent[victim].off = 0;
    c->ent[victim].dirty = false;
    if (fill) {
        ret = vimg_file_pread(img->file, c->ent[victim].data, s->cluster_size, off);
        if (ret < 0) {
            return qcow2_io_error(img, ret, "Could not read metadata", err);
        }
    } else {
        memset(c->ent[victim].data, 0, s->cluster_size);
    }
    c->ent[victim].off = off;
    c->ent[victim].lru = ++c->tick;
    *out = c->ent[victim].data;
    return 0;
}

uint64_t qcow2_l2_entry(const struct qcow2_state *s, const uint8_t *l2, uint64_t idx)
{
    return vimg_ld_be64(l2 + idx * s->l2_entry_size);
}

uint64_t qcow2_l2_bitmap(const struct qcow2_state *s, const uint8_t *l2, uint64_t idx)
{
    return s->ext_l2 ? vimg_ld_be64(l2 + idx * 16 + 8) : 0;
}

enum qcow2_ctype qcow2_entry_type(const struct qcow2_state *s, uint64_t entry,
                                  uint64_t bitmap, unsigned sc)
{
    bool data_file = !!(s->incompat & QCOW2_INCOMPAT_DATAFILE);
    uint64_t off = entry & QCOW2_L2E_OFFSET_MASK;

    if (entry & QCOW2_OFLAG_COMPRESSED) {
        return s->ext_l2 && bitmap ? QCOW2_C_INVALID : QCOW2_C_COMPRESSED;
    }
    if (!s->ext_l2) {
        if (entry & QCOW2_OFLAG_ZERO) {
            return off ? QCOW2_C_ZERO_ALLOC : QCOW2_C_ZERO;
        }
        if (!off && !(data_file && (entry & QCOW2_OFLAG_COPIED))) {
            return QCOW2_C_UNALLOC;
        }
        return QCOW2_C_NORMAL;
    }
    if ((bitmap >> 32) & bitmap & 0xffffffffull) {
        return QCOW2_C_INVALID;
    }
    if (off || (data_file && (entry & QCOW2_OFLAG_COPIED))) {
        if (bitmap & (1ull << (32 + sc))) {
            return QCOW2_C_ZERO_ALLOC;
        }
        if (bitmap & (1ull << sc)) {
            return QCOW2_C_NORMAL;
        }
        return QCOW2_C_UNALLOC_ALLOC;
    }
    if (bitmap & (1ull << (32 + sc))) {
        return QCOW2_C_ZERO;
    }
    if (bitmap & 0xffffffffull) {
        return QCOW2_C_INVALID;
    }
    return QCOW2_C_UNALLOC;
}

int qcow2_read_l2(struct vimg_image *img, uint64_t l2_off, uint8_t **out,
                  struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    if (0 == l2_off || qcow2_offset_into_cluster(s, l2_off)) {
        vimg_error_set(err, EIO, "'%s': L2 table offset %#" PRIx64 " unaligned",
                       img->filename, l2_off);
        return -EIO;
    }
    return qcow2_cache_get(img, &s->l2_cache, l2_off, true, out, err);
}

void qcow2_compressed_range(const struct qcow2_state *s, uint64_t entry,
                            uint64_t *host_off, uint64_t *nbytes)
{
    uint64_t off = entry & s->coffset_mask;
    uint64_t nsec = ((entry >> s->csize_shift) & s->csize_mask) + 1;
    *host_off = off;
    *nbytes = nsec * 512 - (off & 511);
}

/* qemu's guess that the image was made with preallocation=metadata: far
 * more clusters are in use than the file really has allocated.  Then data
 * runs are also looked up in the host file, whose holes read as zeros. */
static bool qcow2_prealloc_detected(struct vimg_image *img)
{
    struct qcow2_state *s = qcow2_s(img);
    struct vimg_error ign = { 0 };
    int64_t flen, alloc;
    uint64_t threshold, count = 0, real;

    if (s->prealloc_checked) {
        return s->prealloc_meta;
    }
    s->prealloc_checked = true;
    flen = vimg_file_size(img->file);
    alloc = img->file->ops->allocated(img->file);
    if (flen < 0 || alloc < 0) {
        return false;
    }
    real = (uint64_t)alloc / s->cluster_size;
    threshold = VIMG_MAX(real * 10 / 9, real + 2);
    for (uint64_t i = 0; i < vimg_div_round_up((uint64_t)flen, s->cluster_size) &&
                         count < threshold; i++) {
        uint64_t rc;
        if (qcow2_get_refcount(img, i, &rc, &ign) < 0) {
            return false;
        }
        count += !!rc;
    }
    s->prealloc_meta = count >= threshold;
    return s->prealloc_meta;
}

static void qcow2_recurse_host(struct qcow2_state *s, struct vimg_run *run)
{
    int64_t fsize = vimg_file_size(run->host);
    bool is_data;
    uint64_t n;

    if (fsize < 0) {
        return;
    }
    if (run->host_off >= (uint64_t)fsize) {
        run->flags |= VIMG_RUN_ZERO;
        return;
    }
    if (run->host->ops->extent(run->host, run->host_off,
                               VIMG_MIN(run->length, (uint64_t)fsize - run->host_off),
                               &is_data, &n) < 0 || 0 == n) {
        return;
    }
    run->length = VIMG_MIN(run->length, n);
    if (!is_data) {
        run->flags |= VIMG_RUN_ZERO;
    }
}

int qcow2_block_status(struct vimg_image *img, uint64_t offset, uint64_t max_len,
                       struct vimg_run *run, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t l1_idx = offset >> (s->cluster_bits + s->l2_bits);
    uint64_t l2_span = 1ull << (s->cluster_bits + s->l2_bits);
    uint64_t l1_end = (l1_idx + 1) * l2_span;
    uint64_t end = offset + max_len;
    uint64_t l2_off, l2_idx, entry, bitmap, host = 0;
    enum qcow2_ctype type;
    unsigned sc;
    uint8_t *l2;
    int ret;

    if (end > l1_end || end < offset) {
        end = l1_end;
    }
    if (l1_idx >= s->l1_size || !(s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK)) {
        run->length = end - offset;
        run->flags = 0;
        return 0;
    }
    l2_off = s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK;
    if (qcow2_offset_into_cluster(s, l2_off)) {
        vimg_error_set(err, EIO, "'%s': L2 table offset %#" PRIx64 " unaligned "
                       "(L1 index: %#" PRIx64 ")", img->filename, l2_off, l1_idx);
        return -EIO;
    }
    ret = qcow2_read_l2(img, l2_off, &l2, err);
    if (ret < 0) {
        return ret;
    }
    l2_idx = (offset >> s->cluster_bits) & (s->l2_entries - 1);
    sc = (unsigned)((offset >> s->sc_bits) & ((1u << (s->cluster_bits - s->sc_bits)) - 1));
    entry = qcow2_l2_entry(s, l2, l2_idx);
    bitmap = qcow2_l2_bitmap(s, l2, l2_idx);
    type = qcow2_entry_type(s, entry, bitmap, sc);

    if (QCOW2_C_INVALID == type) {
        vimg_error_set(err, EIO, "'%s': Invalid cluster entry found (L2 offset: %#" PRIx64
                       ", L2 index: %#" PRIx64 ")", img->filename, l2_off, l2_idx);
        return -EIO;
    }
    if ((QCOW2_C_ZERO == type || QCOW2_C_ZERO_ALLOC == type) && s->version < 3 &&
        !s->ext_l2) {
        vimg_error_set(err, EIO, "'%s': Zero cluster entry found in pre-v3 image "
                       "(L2 offset: %#" PRIx64 ", L2 index: %#" PRIx64 ")", img->filename,
                       l2_off, l2_idx);
        return -EIO;
    }
    if (QCOW2_C_COMPRESSED == type) {
        if (s->incompat & QCOW2_INCOMPAT_DATAFILE) {
            vimg_error_set(err, EIO, "'%s': Compressed cluster entry found in image with "
                           "external data file (L2 offset: %#" PRIx64 ", L2 index: %#"
                           PRIx64 ")", img->filename, l2_off, l2_idx);
            return -EIO;
        }
        /* one compressed cluster per run: only read_special can produce it */
        run->length = VIMG_MIN(end, qcow2_start_of_cluster(s, offset) + s->cluster_size) -
                      offset;
        run->flags = VIMG_RUN_DATA | VIMG_RUN_ALLOCATED | VIMG_RUN_COMPRESSED;
        return 0;
    }
    if (QCOW2_C_NORMAL == type || QCOW2_C_ZERO_ALLOC == type ||
        QCOW2_C_UNALLOC_ALLOC == type) {
        host = entry & QCOW2_L2E_OFFSET_MASK;
        if (qcow2_offset_into_cluster(s, host)) {
            vimg_error_set(err, EIO, "'%s': Cluster allocation offset %#" PRIx64
                           " unaligned (L2 offset: %#" PRIx64 ", L2 index: %#" PRIx64 ")",
                           img->filename, host, l2_off, l2_idx);
            return -EIO;
        }
        if (!s->data_file) {
            vimg_error_set(err, EIO, "'%s': the external data file is not open",
                           img->filename);
            return -EIO;
        }
    }

    /* Extend over following (sub)clusters of the same kind in this table. */
    uint64_t pos = (offset & ~(s->sc_size - 1)) + s->sc_size;
    uint64_t want_host = host + (pos - qcow2_start_of_cluster(s, offset));
    while (pos < end) {
        uint64_t idx = (pos >> s->cluster_bits) & (s->l2_entries - 1);
        unsigned psc = (unsigned)((pos >> s->sc_bits) &
                                  ((1u << (s->cluster_bits - s->sc_bits)) - 1));
        uint64_t e = qcow2_l2_entry(s, l2, idx);
        uint64_t b = qcow2_l2_bitmap(s, l2, idx);
        enum qcow2_ctype t = qcow2_entry_type(s, e, b, psc);
        if (t != type) {
            break;
        }
        if (QCOW2_C_NORMAL == type || QCOW2_C_ZERO_ALLOC == type ||
            QCOW2_C_UNALLOC_ALLOC == type) {
            uint64_t h = (e & QCOW2_L2E_OFFSET_MASK) + (pos & (s->cluster_size - 1));
            if (h != want_host) {
                break;
            }
        }
        pos += s->sc_size;
        want_host += s->sc_size;
    }
    run->length = VIMG_MIN(pos, end) - offset;
    switch (type) {
    case QCOW2_C_UNALLOC:
    case QCOW2_C_UNALLOC_ALLOC:
        run->flags = 0;
        break;
    case QCOW2_C_ZERO:
        run->flags = VIMG_RUN_ZERO | VIMG_RUN_ALLOCATED;
        break;
    case QCOW2_C_ZERO_ALLOC:
        run->flags = VIMG_RUN_ZERO | VIMG_RUN_ALLOCATED | VIMG_RUN_HOST_VALID;
        run->host = s->data_file;
        run->host_off = host + qcow2_offset_into_cluster(s, offset);
        break;
    default:
        run->flags = VIMG_RUN_DATA | VIMG_RUN_ALLOCATED | VIMG_RUN_HOST_VALID;
        run->host = s->data_file;
        run->host_off = host + qcow2_offset_into_cluster(s, offset);
        if (qcow2_prealloc_detected(img)) {
            qcow2_recurse_host(s, run);
        }
        break;
    }
    return 0;
}

/* Decompress the guest cluster at guest_cluster (whose L2 entry is entry)
 * into s->cbuf. */
static int qcow2_load_compressed(struct vimg_image *img, uint64_t guest_cluster,
                                 uint64_t entry, struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint64_t host, n;
    uint8_t *src;
    int ret;

    if (s->cbuf_guest == guest_cluster) {
        return 0;
    }
    qcow2_compressed_range(s, entry, &host, &n);
    src = malloc(n);
    if (!src) {
        vimg_error_set(err, ENOMEM, "out of memory");
        return -ENOMEM;
    }
    ret = vimg_file_pread(img->file, src, n, host);
    if (ret < 0) {
        free(src);
        return qcow2_io_error(img, ret, "Could not read compressed cluster", err);
    }
    s->cbuf_guest = UINT64_MAX;
    ret = qcow2_decompress((int)s->compression_type, s->cbuf, s->cluster_size, src, n);
    free(src);
    if (ret < 0) {
        vimg_error_set(err, EIO, "'%s': could not decompress the cluster at guest offset %"
                       PRIu64 " (host offset %#" PRIx64 ")", img->filename, guest_cluster,
                       host);
        return -EIO;
    }
    s->cbuf_guest = guest_cluster;
    return 0;
}

int qcow2_read_special(struct vimg_image *img, void *buf, size_t len, uint64_t offset,
                       struct vimg_error *err)
{
    struct qcow2_state *s = qcow2_s(img);
    uint8_t *p = buf;

    while (len) {
        uint64_t gc = qcow2_start_of_cluster(s, offset);
        uint64_t in = offset - gc;
        size_t n = (size_t)VIMG_MIN(len, s->cluster_size - in);
        uint64_t l1_idx = offset >> (s->cluster_bits + s->l2_bits);
        uint64_t l2_idx = (offset >> s->cluster_bits) & (s->l2_entries - 1);
        uint8_t *l2;
        uint64_t entry;
        int ret;

        if (l1_idx >= s->l1_size) {
            vimg_error_set(err, EIO, "'%s': no compressed cluster at %" PRIu64,
                           img->filename, offset);
            return -EIO;
        }
        ret = qcow2_read_l2(img, s->l1[l1_idx] & QCOW2_L1E_OFFSET_MASK, &l2, err);
        if (ret < 0) {
            return ret;
        }
        entry = qcow2_l2_entry(s, l2, l2_idx);
        if (!(entry & QCOW2_OFLAG_COMPRESSED)) {
            vimg_error_set(err, EIO, "'%s': no compressed cluster at %" PRIu64,
                           img->filename, offset);
            return -EIO;
        }
        ret = qcow2_load_compressed(img, gc, entry, err);
        if (ret < 0) {
            return ret;
        }
        memcpy(p, s->cbuf + in, n);
        p += n;
        offset += n;
        len -= n;
    }
    return 0;
}

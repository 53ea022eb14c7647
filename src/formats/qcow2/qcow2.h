/* qcow2 driver internals: on-disk constants, the open-image state, and the
 * functions the driver's files share. */
#ifndef VIMG_QCOW2_H
#define VIMG_QCOW2_H

#include <stdbool.h>
#include <stdint.h>

#include "core/image.h"

#define QCOW2_MAGIC 0x514649fbu

#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_MAX_REFTABLE_SIZE (8ull << 20)
#define QCOW2_MAX_L1_SIZE (32ull << 20)
#define QCOW2_MAX_SNAPSHOTS 65536
#define QCOW2_MAX_SNAPSHOT_EXTRA 1024
#define QCOW2_MAX_SNAPSHOT_TABLE (1024ull * 65536)
#define QCOW2_SNAPSHOT_HEADER 40
#define QCOW2_MAX_BACKING_NAME 1023

#define QCOW2_INCOMPAT_DIRTY    (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT  (1ull << 1)
#define QCOW2_INCOMPAT_DATAFILE (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESS (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2    (1ull << 4)
#define QCOW2_INCOMPAT_MASK     0x1full
#define QCOW2_COMPAT_LAZY       (1ull << 0)
#define QCOW2_AUTOCLEAR_BITMAPS (1ull << 0)
#define QCOW2_AUTOCLEAR_RAW     (1ull << 1)
#define QCOW2_AUTOCLEAR_MASK    0x3ull

#define QCOW2_EXT_END       0x00000000u
#define QCOW2_EXT_BACKFMT   0xe2792acau
#define QCOW2_EXT_FEATURES  0x6803f857u
#define QCOW2_EXT_BITMAPS   0x23852875u
#define QCOW2_EXT_CRYPTO    0x0537be77u
#define QCOW2_EXT_DATAFILE  0x44415441u

#define QCOW2_OFLAG_COPIED     (1ull << 63)
#define QCOW2_OFLAG_COMPRESSED (1ull << 62)
#define QCOW2_OFLAG_ZERO       1ull
#define QCOW2_L1E_OFFSET_MASK  0x00fffffffffffe00ull
#define QCOW2_L2E_OFFSET_MASK  0x00fffffffffffe00ull
#define QCOW2_REFT_OFFSET_MASK 0xfffffffffffffe00ull
#define QCOW2_L1E_RESERVED     0x7f000000000001ffull
#define QCOW2_L2E_RESERVED     0x3f000000000001feull

#define QCOW2_COMPRESS_ZLIB 0
#define QCOW2_COMPRESS_ZSTD 1

/* Small fixed caches: memory stays bounded whatever the image. */
#define QCOW2_L2_CACHE 16
#define QCOW2_RB_CACHE 8

enum qcow2_ctype {
    QCOW2_C_UNALLOC,      /* read from the backing image */
    QCOW2_C_ZERO,         /* zeros, backing not consulted */
    QCOW2_C_ZERO_ALLOC,   /* zeros, host cluster kept */
    QCOW2_C_NORMAL,
    QCOW2_C_COMPRESSED,
    QCOW2_C_UNALLOC_ALLOC, /* extended L2: allocated cluster, subcluster not */
    QCOW2_C_INVALID,      /* a bad subcluster bitmap */
};

struct qcow2_cache_ent {
    uint64_t off;          /* host offset of the table, 0 = empty slot */
    uint64_t lru;
    uint8_t *data;         /* one cluster, big-endian as on disk */
    bool dirty;            /* written through entry by entry, not yet as a
                              whole cluster (qemu writes whole tables) */
};

struct qcow2_cache {
    int n;
    uint64_t tick;
    struct qcow2_cache_ent ent[QCOW2_L2_CACHE];
};

struct qcow2_ext {
    uint32_t type;
    uint32_t len;
    uint8_t *data;
};

struct qcow2_snapshot {
    uint64_t l1_offset;
    uint32_t l1_size;
    char *id;
    char *name;
    uint32_t date_sec, date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t vm_state_size;
    uint64_t disk_size;
    int64_t icount;
    bool has_disk_size, has_icount;
    uint32_t extra_size;
    uint8_t *extra;       /* extra data beyond what vimg knows, kept */
};

enum { QCOW2_APPEND_UNKNOWN, QCOW2_APPEND_ON, QCOW2_APPEND_OFF };

/* The append-mode writer's state (append.c). */
struct qcow2_append {
    int state;
    uint64_t start, next;       /* first host cluster handed out; append point */
    uint64_t l1_idx;            /* the L2 table being filled */
    uint8_t *tbl;               /* that table, big endian, as it will be written */
    uint64_t tbl_host;          /* the cluster reserved for it */
    bool tbl_used;
    uint64_t fill_from;         /* host offset where the last run ended mid-cluster */
    uint8_t *zbuf;              /* one cluster of zeros */
};

struct qcow2_state {
    uint32_t version;
    uint32_t cluster_bits;
    uint64_t cluster_size;
    uint32_t l2_bits;           /* log2(entries per L2 table) */
    uint64_t l2_entries;
    uint32_t l2_entry_size;     /* 8, or 16 with extended L2 */
    bool ext_l2;
    uint32_t sc_bits;           /* subcluster size bits */
    uint64_t sc_size;
    uint32_t refcount_order;
    uint32_t refcount_bits;
    uint64_t refcount_max;
    uint64_t rb_entries;        /* refcounts per refcount block */
    uint32_t csize_shift;
    uint64_t csize_mask;
    uint64_t coffset_mask;

    uint64_t header_size;       /* virtual size as stored */
    uint32_t header_length;
    uint8_t *unknown_header;    /* fields beyond 112 bytes, kept */
    uint32_t unknown_header_len;
    uint32_t crypt_method;
    uint64_t incompat, compat, autoclear;
    uint32_t compression_type;

    uint64_t l1_offset;
    uint32_t l1_size;
    uint64_t *l1;               /* host order */

    uint64_t rt_offset;
    uint32_t rt_clusters;
    uint64_t rt_size;           /* entries */
    uint64_t *rt;               /* host order */

    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    struct qcow2_snapshot *snapshots;

    char *backing_name;
    char *backing_fmt;
    char *data_file_name;
    uint8_t *feature_table;
    uint32_t feature_table_len;
    bool has_bitmaps_ext;
    uint8_t bitmaps_ext[24];
    bool has_crypto_ext;
    uint8_t crypto_ext[16];
    struct qcow2_ext *unknown_ext;  /* in file order */
    uint32_t n_unknown_ext;

    struct vimg_file *data_file;    /* the image file itself or an external one */
    bool own_data_file;

    struct qcow2_cache l2_cache;
    struct qcow2_cache rb_cache;
    uint64_t free_hint;             /* first cluster index that may be free */
    uint64_t free_byte_off;         /* where the next compressed cluster may go */
    bool dirty_set_by_us;
    bool needs_repair;              /* dirty: repair before the first write */
    bool repair_failed;             /* the repair found damage: refuse writes */
    bool lazy;                      /* lazy refcounts active */
    bool check_mode;
    bool creating;                  /* create may allocate cluster 0 */
    bool prealloc_checked, prealloc_meta;
    struct qcow2_append app;
    uint8_t *cbuf;                  /* one cluster of scratch for decompression */
    uint64_t cbuf_guest;            /* guest cluster held in cbuf, or UINT64_MAX */
};

static inline struct qcow2_state *qcow2_s(struct vimg_image *img)
{
    return img->opaque;
}

static inline uint64_t qcow2_start_of_cluster(const struct qcow2_state *s, uint64_t off)
{
    return off & ~(s->cluster_size - 1);
}

static inline uint64_t qcow2_offset_into_cluster(const struct qcow2_state *s, uint64_t off)
{
    return off & (s->cluster_size - 1);
}

/* header.c */
int qcow2_write_header(struct vimg_image *img, struct vimg_error *err);
int qcow2_update_incompat(struct vimg_image *img, uint64_t incompat,
                          struct vimg_error *err);
int qcow2_io_error(struct vimg_image *img, int ret, const char *what,
                   struct vimg_error *err);
void qcow2_free_snapshots(struct qcow2_state *s);
/* Build the whole first cluster (header + extensions + backing name). */
int qcow2_build_header(struct qcow2_state *s, uint8_t *buf, struct vimg_error *err);
uint64_t qcow2_bitmaps_size(struct vimg_image *img, uint64_t cs);
int qcow2_snapshot_list(struct vimg_image *img, struct vimg_qobj **out,
                        struct vimg_error *err);

/* cache (cluster.c) */
void qcow2_cache_free(struct qcow2_cache *c);
int qcow2_cache_get(struct vimg_image *img, struct qcow2_cache *c, uint64_t off,
                    bool fill, uint8_t **out, struct vimg_error *err);
void qcow2_cache_drop(struct qcow2_cache *c, uint64_t off);
void qcow2_cache_mark_dirty(struct qcow2_cache *c, uint64_t off);
int qcow2_cache_flush(struct vimg_image *img, struct qcow2_cache *c, struct vimg_error *err);

/* cluster.c */
uint64_t qcow2_l2_entry(const struct qcow2_state *s, const uint8_t *l2, uint64_t idx);
uint64_t qcow2_l2_bitmap(const struct qcow2_state *s, const uint8_t *l2, uint64_t idx);
enum qcow2_ctype qcow2_entry_type(const struct qcow2_state *s, uint64_t entry,
                                  uint64_t bitmap, unsigned sc);
int qcow2_block_status(struct vimg_image *img, uint64_t offset, uint64_t max_len,
                       struct vimg_run *run, struct vimg_error *err);
int qcow2_read_special(struct vimg_image *img, void *buf, size_t len, uint64_t offset,
                       struct vimg_error *err);
int qcow2_read_l2(struct vimg_image *img, uint64_t l2_off, uint8_t **out,
                  struct vimg_error *err);
void qcow2_compressed_range(const struct qcow2_state *s, uint64_t entry,
                            uint64_t *host_off, uint64_t *nbytes);

/* compress.c */
int qcow2_decompress(int type, void *dst, size_t dlen, const void *src, size_t slen);
/* Returns the compressed length, -ENOSPC when it does not fit in dlen. */
long qcow2_compress(int type, void *dst, size_t dlen, const void *src, size_t slen);

/* refcount.c */
int qcow2_get_refcount(struct vimg_image *img, uint64_t cluster, uint64_t *rc,
                       struct vimg_error *err);
int qcow2_update_refcount(struct vimg_image *img, uint64_t host_off, uint64_t len,
                          int64_t delta, struct vimg_error *err);
/* Allocate n contiguous clusters (refcount 1); returns the host offset. */
int qcow2_alloc_clusters(struct vimg_image *img, uint64_t n, uint64_t *host_off,
                         struct vimg_error *err);
/* Allocate len bytes for compressed data, packed; returns host offset. */
int qcow2_alloc_bytes(struct vimg_image *img, uint64_t len, uint64_t *host_off,
                      struct vimg_error *err);
/* qemu's qcow2_refcount_area: new refcount table and blocks at start that
 * cover the file and `additional` clusters past them, entry new_rb_idx set
 * to new_rb_off when that is not 0; *end = their end. */
int qcow2_refcount_area(struct vimg_image *img, uint64_t start, uint64_t additional,
                        bool exact, uint64_t new_rb_idx, uint64_t new_rb_off, uint64_t *end,
                        struct vimg_error *err);
/* How many clusters from the start of a file of fsize bytes reach up to
 * the last one with a non-zero refcount (0: none in use). */
int qcow2_clusters_in_use(struct vimg_image *img, uint64_t fsize, uint64_t *n,
                          struct vimg_error *err);
/* Refcount blocks (and, in *table_out, table clusters) needed to count
 * `clusters` clusters plus themselves, as qemu computes it; `generous`
 * leaves room for a table half as large again. */
uint64_t qcow2_rc_blocks_needed(uint64_t clusters, uint64_t cs, unsigned order,
                                bool generous, uint64_t *table_out);
uint64_t qcow2_rb_get(const struct qcow2_state *s, const uint8_t *rb, uint64_t i);
void qcow2_rb_set(const struct qcow2_state *s, uint8_t *rb, uint64_t i, uint64_t v);

/* write.c */
int qcow2_write(struct vimg_image *img, const void *buf, size_t len, uint64_t offset,
                struct vimg_error *err);
int qcow2_write_zeroes(struct vimg_image *img, uint64_t offset, uint64_t len,
                       unsigned flags, struct vimg_error *err);
int qcow2_discard(struct vimg_image *img, uint64_t offset, uint64_t len,
                  struct vimg_error *err);
int qcow2_flush(struct vimg_image *img, struct vimg_error *err);
int qcow2_truncate(struct vimg_image *img, uint64_t size, enum vimg_prealloc prealloc,
                   struct vimg_error *err);
int qcow2_write_compressed(struct vimg_image *img, const void *buf, size_t len,
                           uint64_t offset, struct vimg_error *err);
int qcow2_mark_dirty(struct vimg_image *img, struct vimg_error *err);

/* The L2 table for l1_idx, made present and private (COPIED). */
int qcow2_get_l2_for_write(struct vimg_image *img, uint64_t l1_idx, uint64_t *l2_off,
                           struct vimg_error *err);

/* prealloc.c */
int qcow2_preallocate(struct vimg_image *img, struct vimg_error *err);

/* append.c */
int qcow2_alloc_data(struct vimg_image *img, uint64_t offset, uint64_t len,
                     struct vimg_run *run, struct vimg_error *err);
int qcow2_append_commit(struct vimg_image *img, struct vimg_error *err);
long qcow2_compress_cluster(struct vimg_image *img, void *out, size_t out_cap,
                            const void *buf, size_t len, struct vimg_error *err);
int qcow2_write_compressed_data(struct vimg_image *img, const void *cdata, size_t clen,
                                size_t len, uint64_t offset, struct vimg_error *err);

/* create.c */
extern const struct vimg_opt_desc qcow2_create_opts[];
/* Allocate L2 tables and data clusters for [from, to), as qemu's
 * preallocation=metadata does. */
int qcow2_prealloc_metadata(struct vimg_image *img, uint64_t from, uint64_t to,
                            struct vimg_error *err);
int qcow2_create(const char *filename, const struct vimg_opts *opts,
                 struct vimg_error *err);

/* check.c */
int qcow2_check(struct vimg_image *img, struct vimg_check_result *res, int fix,
                struct vimg_error *err);

/* measure.c */
int qcow2_measure(const struct vimg_opts *opts, struct vimg_image *in,
                  struct vimg_measure *out, struct vimg_error *err);

#endif

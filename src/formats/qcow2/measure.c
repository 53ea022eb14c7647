/* qcow2 measure: qemu's formula for the size a new image needs. */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "core/opts.h"
#include "formats/qcow2/qcow2.h"
#include "util/util.h"

static uint64_t qcow2_prealloc_size(uint64_t size, uint64_t cs, unsigned order, bool ext)
{
    uint64_t l2e = ext ? 16 : 8, meta = cs, nl1e, nl2e, aligned = 0;

    vimg_round_up(size, cs, &aligned);
    nl2e = aligned / cs;
    vimg_round_up(nl2e, cs / l2e, &nl2e);
    meta += nl2e * l2e;
    nl1e = nl2e * l2e / cs;
    vimg_round_up(nl1e, cs / 8, &nl1e);
    meta += nl1e * 8;
    {
        /* refcount blocks and table, counting themselves too */
        uint64_t table, blocks = qcow2_rc_blocks_needed((meta + aligned) / cs, cs, order,
                                                        false, &table);
        meta += (blocks + table) * cs;
    }
    return meta + aligned;
}

int qcow2_measure(const struct vimg_opts *opts, struct vimg_image *in,
                  struct vimg_measure *out, struct vimg_error *err)
{
    bool ext = vimg_internal_opt_bool(opts, "extended_l2", false);
    uint64_t cs = vimg_internal_opt_size(opts, "cluster_size", 65536);
    const char *compat = vimg_internal_opt_str(opts, "compat", NULL);
    const char *rb = vimg_internal_opt_str(opts, "refcount_bits", NULL);
    const char *pstr = vimg_internal_opt_str(opts, "preallocation", NULL);
    bool backing = NULL != vimg_internal_opt_str(opts, "backing_file", NULL);
    enum vimg_prealloc prealloc = VIMG_PREALLOC_OFF;
    uint64_t refcount_bits = 16, size, required = 0, l2_tables;
    int version = 3;

    if (!vimg_is_pow2(cs) || cs < 512 || cs > (2u << 20)) {
        vimg_error_set(err, EINVAL, "Cluster size must be a power of two between 512 and "
                       "2048k");
        return -EINVAL;
    }
    if (ext && cs < 16384) {
        vimg_error_set(err, EINVAL, "Extended L2 entries are only supported with cluster "
                       "sizes of at least 16384 bytes");
        return -EINVAL;
    }
    if (compat) {
        if (0 == strcmp(compat, "0.10")) {
            version = 2;
        } else if (strcmp(compat, "1.1")) {
            vimg_error_set(err, EINVAL, "Invalid compatibility level: '%s'", compat);
            return -EINVAL;
        }
    }
    if (rb) {
        refcount_bits = strtoull(rb, NULL, 0);
    }
    if (refcount_bits > 64 || !vimg_is_pow2(refcount_bits)) {
        vimg_error_set(err, EINVAL, "Refcount width must be a power of two and may not "
                       "exceed 64 bits");
        return -EINVAL;
    }
    if (version < 3 && 16 != refcount_bits) {
        vimg_error_set(err, EINVAL, "Different refcount widths than 16 bits require "
                       "compatibility level 1.1 or above (use compat=1.1 or greater)");
        return -EINVAL;
    }
    if (pstr && vimg_prealloc_parse(pstr, &prealloc) < 0) {
        vimg_error_set(err, EINVAL, "invalid parameter value: %s", pstr);
        return -EINVAL;
    }
    if (!vimg_round_up(vimg_internal_opt_size(opts, "size", 0), cs, &size)) {
        size = UINT64_MAX & ~(cs - 1);
    }
    l2_tables = vimg_div_round_up(size / cs, cs / (ext ? 16 : 8));
    if (l2_tables * 8 > QCOW2_MAX_L1_SIZE) {
        vimg_error_set(err, EFBIG, "The image size is too large (try using a larger cluster "
                       "size)");
        return -EFBIG;
    }
    if (in) {
        uint64_t ssize = vimg_size(in);
        vimg_round_up(ssize, cs, &size);
        if (backing) {
            required = size;
        } else {
            for (uint64_t off = 0; off < ssize;) {
                struct vimg_status st;
                int ret = vimg_block_status(in, off, ssize - off, &st, err);
                uint64_t pnum;
                if (ret < 0) {
                    vimg_error_clear(err);
                    vimg_error_set(err, -ret, "Unable to get block status: %s",
                                   strerror(-ret));
                    return ret;
                }
                pnum = st.length;
                if (st.flags & VIMG_STATUS_ZERO) {
                    /* holes cost nothing */
                } else if ((st.flags & (VIMG_STATUS_DATA | VIMG_STATUS_ALLOCATED)) ==
                           (VIMG_STATUS_DATA | VIMG_STATUS_ALLOCATED)) {
                    uint64_t end = 0;
                    vimg_round_up(off + pnum, cs, &end);
                    pnum = end - off;
                    required += off % cs + pnum;
                }
                off += pnum;
            }
        }
    }
    if (VIMG_PREALLOC_FULL == prealloc || VIMG_PREALLOC_FALLOC == prealloc) {
        required = size;
    }
    out->fully_allocated = qcow2_prealloc_size(size, cs, (unsigned)__builtin_ctzll(refcount_bits),
                                               ext);
    out->required = out->fully_allocated - size + required;
    out->has_bitmaps = version >= 3 && in && 0 == strcmp(in->drv->name, "qcow2");
    out->bitmaps = out->has_bitmaps ? qcow2_bitmaps_size(in, cs) : 0;
    return 0;
}

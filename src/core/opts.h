/* Option lists (-o) checked against typed option tables. */
#ifndef VIMG_CORE_OPTS_H
#define VIMG_CORE_OPTS_H

#include <stdbool.h>
#include <stdio.h>

#include "vimg/driver.h"

struct vimg_opts {
    size_t n, cap;
    char **keys;
    char **vals;
};

/* The options of the host file layer (qemu's "file" protocol), which every
 * format's create accepts in addition to its own. */
extern const struct vimg_opt_desc vimg_internal_file_create_opts[];

/* The full option table of a driver: its own options, then the file layer's
 * not already present.  Returned array is static per driver. */
const struct vimg_opt_desc *vimg_internal_create_opts(const struct vimg_driver *drv);

const struct vimg_opt_desc *vimg_internal_opt_find(const struct vimg_opt_desc *table,
                                                   const char *name);
/* Check every option in opts against table: unknown names and badly typed
 * values fail with qemu's messages (no file name prefix). */
int vimg_internal_opts_validate(const struct vimg_opts *opts,
                                const struct vimg_opt_desc *table,
                                struct vimg_error *err);
/* Typed getters; they return def when unset.  Values were validated. */
uint64_t vimg_internal_opt_size(const struct vimg_opts *opts, const char *key,
                                uint64_t def);
bool vimg_internal_opt_bool(const struct vimg_opts *opts, const char *key, bool def);
const char *vimg_internal_opt_str(const struct vimg_opts *opts, const char *key,
                                  const char *def);
/* True when a -o string asks for help ("help" or "?" among its items). */
bool vimg_internal_opts_wants_help(const char *text);

#endif

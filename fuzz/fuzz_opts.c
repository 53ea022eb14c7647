/* The -o option parser and validation against the raw create table. */
#include "config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/image.h"
#include "core/opts.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);
    struct vimg_opts *opts = vimg_opts_new();
    struct vimg_error err = { 0 };

    if (s && opts) {
        memcpy(s, data, size);
        s[size] = '\0';
        vimg_internal_opts_wants_help(s);
        if (0 == vimg_opts_parse(opts, s, &err)) {
            const struct vimg_driver *raw = vimg_internal_find_driver("raw");
            vimg_internal_opts_validate(opts, vimg_internal_create_opts(raw), &err);
            vimg_internal_opt_size(opts, "size", 0);
            vimg_internal_opt_bool(opts, "nocow", false);
        }
    }
    vimg_opts_free(opts);
    free(s);
    return 0;
}

#include "config.h"

#include <inttypes.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/options.h"
#include "core/copy.h"
#include "core/image.h"
#include "core/opts.h"

static void convert_progress(void *opaque, float pct)
{
    cli_progress_print(opaque, pct, 0);
}

int cmd_convert(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "object", required_argument, NULL, 'j' + 256 },
        { "image-opts", no_argument, NULL, 'i' + 256 },
        { "target-image-opts", no_argument, NULL, 'I' + 256 },
        { "salvage", no_argument, NULL, 's' + 256 },
        { "target-is-zero", no_argument, NULL, 'z' + 256 },
        { "bitmaps", no_argument, NULL, 'b' + 256 },
        { "skip-broken-bitmaps", no_argument, NULL, 'k' + 256 },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 },
    };
    const char *fmt = NULL, *out_fmt = NULL, *out_base = NULL, *backing_fmt = NULL;
    char *options = NULL;
    bool compress = false, progress = false, quiet = false, skip_create = false;
    bool target_is_zero = false, copy_range = false, explicit_sparse = false;
    bool bitmaps = false, skip_broken = false, target_image_opts = false;
    uint64_t sparse_size = 4096;
    unsigned src_flags = VIMG_OPEN_NO_SHARE;
    int c, ret = 1;

    while ((c = getopt_long(argc, argv, ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:", long_options,
                            NULL)) != -1) {
        switch (c) {
        CLI_GETOPT_COMMON(argv)
        case 'h':
            cli_help();
        case 'f':
            fmt = optarg;
            break;
        case 'O':
            out_fmt = optarg;
            break;
        case 'B':
            out_base = optarg;
            break;
        case 'C':
            copy_range = true;
            break;
        case 'c':
            compress = true;
            break;
        case 'F':
            backing_fmt = optarg;
            break;
        case 'o':
            if (cli_accumulate_options(&options, optarg) < 0) {
                goto out;
            }
            break;
        case 'l':
            break;
        case 'S': {
            int64_t v = cli_cvtnum("buffer size for sparse output", optarg);
            if (v < 0) {
                goto out;
            }
            if (v > 16 * 1024 * 1024 || v % 512) {
                cli_report("Invalid buffer size for sparse output specified. Valid sizes "
                           "are multiples of 512 up to 16777216. Select 0 to disable "
                           "sparse detection (fully allocates output).");
                goto out;
            }
            sparse_size = (uint64_t)v;
            explicit_sparse = true;
            break;
        }
        case 'p':
            progress = true;
            break;
        case 't':
            if (!cli_cache_mode_valid(optarg)) {
                cli_report("Invalid cache option: %s", optarg);
                goto out;
            }
            break;
        case 'T':
            if (!cli_cache_mode_valid(optarg)) {
                cli_report("Invalid source cache option: %s", optarg);
                goto out;
            }
            break;
        case 'q':
            quiet = true;
            break;
        case 'n':
            skip_create = true;
            break;
        case 'm': {
            char *end;
            long m = strtol(optarg, &end, 10);
            if (*end || m < 1 || m > 16) {
                cli_report("Invalid number of coroutines. Allowed number of coroutines is "
                           "between 1 and 16");
                goto out;
            }
            break;
        }
        case 'W':
        case 'r':
            break;
        case 'U':
            src_flags |= VIMG_OPEN_FORCE_SHARE;
            break;
        case 'I' + 256:
            target_image_opts = true;
            break;
        case 'z' + 256:
            target_is_zero = true;
            break;
        case 'b' + 256:
            bitmaps = true;
            break;
        case 'k' + 256:
            skip_broken = true;
            break;
        }
    }
    if (!out_fmt && !target_image_opts) {
        out_fmt = "raw";
    }
    if (skip_broken && !bitmaps) {
        cli_report("Use of --skip-broken-bitmaps requires --bitmaps");
        goto out;
    }
    if (copy_range && compress) {
        cli_report("Cannot enable copy offloading when -c is used");
        goto out;
    }
    if (copy_range && explicit_sparse) {
        cli_report("Cannot enable copy offloading when -S is used");
        goto out;
    }
    if (target_image_opts && !skip_create) {
        cli_report("--target-image-opts requires use of -n flag");
        goto out;
    }
    if (skip_create && options) {
        cli_report("-o has no effect when skipping image creation");
        goto out;
    }
    if (target_is_zero && !skip_create) {
        cli_report("--target-is-zero requires use of -n flag");
        goto out;
    }
    int nsrc = argc - optind - 1;
    const char *out_filename = nsrc >= 1 ? argv[argc - 1] : NULL;
    if (options && vimg_internal_opts_wants_help(options)) {
        if (out_fmt) {
            ret = cli_print_create_help(out_filename, out_fmt);
        } else {
            cli_report("Option help requires a format be specified");
        }
        goto out;
    }
    if (nsrc < 1) {
        cli_report("Must specify image file name");
        goto out;
    }
    if (quiet) {
        progress = false;
    }
    struct cli_progress prog;
    cli_progress_init(&prog, progress, 1.0f);
    cli_progress_print(&prog, 0, 100);

    struct vimg_image **srcs = calloc((size_t)nsrc, sizeof(*srcs));
    struct vimg_image *dst = NULL;
    uint64_t total = 0;
    if (!srcs) {
        goto out_prog;
    }
    for (int i = 0; i < nsrc; i++) {
        srcs[i] = cli_open(argv[optind + i], fmt, src_flags, quiet);
        if (!srcs[i]) {
            goto out_close;
        }
        total += vimg_size(srcs[i]);
    }
    if (!skip_create) {
        const struct vimg_driver *drv = vimg_internal_find_driver(out_fmt);
        struct vimg_error err = { 0 };
        if (!drv) {
            cli_report("Unknown file format '%s'", out_fmt);
            goto out_close;
        }
        if (!drv->create) {
            cli_report("Format driver '%s' does not support image creation", out_fmt);
            goto out_close;
        }
        struct vimg_opts *opts = vimg_opts_new();
        if (!opts || (options && vimg_opts_parse(opts, options, &err) < 0) ||
            vimg_internal_opts_validate(opts, vimg_internal_create_opts(drv), &err) < 0) {
            cli_report_err(&err);
            vimg_opts_free(opts);
            goto out_close;
        }
        if ((out_base || backing_fmt) &&
            !vimg_internal_opt_find(vimg_internal_create_opts(drv), "backing_file")) {
            cli_report("Backing file not supported for file format '%s'", out_fmt);
            vimg_opts_free(opts);
            goto out_close;
        }
        char sz[32];
        snprintf(sz, sizeof(sz), "%" PRIu64, total);
        vimg_opts_set(opts, "size", sz);
        if (out_base) {
            vimg_opts_set(opts, "backing_file", out_base);
            vimg_opts_set(opts, "backing_fmt", backing_fmt);
        }
        if ((out_base && !backing_fmt) ||
            (vimg_opts_get(opts, "backing_file") && !vimg_opts_get(opts, "backing_fmt"))) {
            cli_report("Use of backing file requires explicit backing format");
            vimg_opts_free(opts);
            goto out_close;
        }
        if (compress) {
            cli_report("Compression not supported for this file format");
            vimg_opts_free(opts);
            goto out_close;
        }
        if (vimg_create(out_filename, out_fmt, opts, &err) < 0) {
            char prefix[4200];
            snprintf(prefix, sizeof(prefix), "%s: error while converting %s: ", out_filename,
                     out_fmt);
            cli_report_err_prefix(&err, prefix);
            vimg_opts_free(opts);
            goto out_close;
        }
        vimg_opts_free(opts);
    }
    dst = cli_open(out_filename, skip_create ? out_fmt : out_fmt,
                   VIMG_OPEN_RDWR | VIMG_OPEN_NO_BACKING, quiet);
    if (!dst) {
        goto out_close;
    }
    if (skip_create && vimg_size(dst) < total) {
        cli_report("output file is smaller than input file");
        goto out_close;
    }
    if (compress) {
        cli_report("Compression not supported for this file format");
        goto out_close;
    }
    struct vimg_copy_opts copts = {
        .sparse_size = sparse_size,
        .target_has_zero_init = target_is_zero ||
            (!skip_create && sparse_size && dst->drv->has_zero_init &&
             dst->drv->has_zero_init(dst)),
        .progress = convert_progress,
        .progress_opaque = &prog,
    };
    struct vimg_error err = { 0 };
    if (vimg_copy(srcs, nsrc, dst, &copts, &err) < 0) {
        cli_report_err(&err);
        goto out_close;
    }
    cli_progress_print(&prog, 100, 0);
    ret = 0;
out_close:
    vimg_close(dst);
    for (int i = 0; srcs && i < nsrc; i++) {
        vimg_close(srcs[i]);
    }
    free(srcs);
out_prog:
    cli_progress_end(&prog);
out:
    free(options);
    return ret;
}

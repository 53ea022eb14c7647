#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/image.h"
#include "core/qobj.h"

static void check_dump_human(const struct vimg_check_result *r)
{
    if (!(r->corruptions || r->leaks || r->check_errors)) {
        printf("No errors were found on the image.\n");
    } else {
        if (r->corruptions) {
            printf("\n%d errors were found on the image.\n"
                   "Data may be corrupted, or further writes to the image may corrupt it.\n",
                   r->corruptions);
        }
        if (r->leaks) {
            printf("\n%d leaked clusters were found on the image.\n"
                   "This means waste of disk space, but no harm to data.\n", r->leaks);
        }
        if (r->check_errors) {
            printf("\n%d internal errors have occurred during the check.\n", r->check_errors);
        }
    }
    if (r->total_clusters && r->allocated_clusters) {
        printf("%" PRIu64 "/%" PRIu64 " = %0.2f%% allocated, %0.2f%% fragmented, "
               "%0.2f%% compressed clusters\n",
               r->allocated_clusters, r->total_clusters,
               r->allocated_clusters * 100.0 / r->total_clusters,
               r->fragmented_clusters * 100.0 / r->allocated_clusters,
               r->compressed_clusters * 100.0 / r->allocated_clusters);
    }
    if (r->image_end_offset) {
        printf("Image end offset: %" PRIu64 "\n", r->image_end_offset);
    }
}

static void check_dump_json(const struct vimg_check_result *r, const char *filename,
                            const char *format)
{
    struct vimg_qobj *d = vimg_q_dict();
    /* ImageCheck fields in qemu's visit order; optional ones only when set */
    vimg_q_put(d, "filename", vimg_q_str(filename));
    vimg_q_put(d, "format", vimg_q_str(format));
    vimg_q_put(d, "check-errors", vimg_q_int(r->check_errors));
    if (r->image_end_offset) {
        vimg_q_put(d, "image-end-offset", vimg_q_int((int64_t)r->image_end_offset));
    }
    if (r->corruptions) {
        vimg_q_put(d, "corruptions", vimg_q_int(r->corruptions));
    }
    if (r->leaks) {
        vimg_q_put(d, "leaks", vimg_q_int(r->leaks));
    }
    if (r->corruptions_fixed) {
        vimg_q_put(d, "corruptions-fixed", vimg_q_int(r->corruptions_fixed));
    }
    if (r->leaks_fixed) {
        vimg_q_put(d, "leaks-fixed", vimg_q_int(r->leaks_fixed));
    }
    if (r->total_clusters) {
        vimg_q_put(d, "total-clusters", vimg_q_int((int64_t)r->total_clusters));
    }
    if (r->allocated_clusters) {
        vimg_q_put(d, "allocated-clusters", vimg_q_int((int64_t)r->allocated_clusters));
    }
    if (r->fragmented_clusters) {
        vimg_q_put(d, "fragmented-clusters", vimg_q_int((int64_t)r->fragmented_clusters));
    }
    if (r->compressed_clusters) {
        vimg_q_put(d, "compressed-clusters", vimg_q_int((int64_t)r->compressed_clusters));
    }
    char *s = vimg_q_to_json(d);
    printf("%s\n", s ? s : "");
    free(s);
    vimg_q_free(d);
}

int cmd_check(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { "repair", required_argument, NULL, 'r' },
        { "output", required_argument, NULL, 'o' + 256 },
        { "object", required_argument, NULL, 'j' + 256 },
        { "image-opts", no_argument, NULL, 'i' + 256 },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 },
    };
    const char *fmt = NULL, *output = NULL;
    enum cli_output ofmt = CLI_OUT_HUMAN;
    unsigned flags = 0;
    bool quiet = false;
    int fix = 0;
    int c;

    while ((c = getopt_long(argc, argv, ":hf:r:T:qU", long_options, NULL)) != -1) {
        switch (c) {
        CLI_GETOPT_COMMON(argv)
        case 'h':
            cli_help();
        case 'f':
            fmt = optarg;
            break;
        case 'r':
            flags |= VIMG_OPEN_RDWR;
            if (0 == strcmp(optarg, "leaks")) {
                fix = 1;
            } else if (0 == strcmp(optarg, "all")) {
                fix = 3;
            } else {
                cli_error_exit("Unknown option value for -r "
                               "(expecting 'leaks' or 'all'): %s", optarg);
            }
            break;
        case 'T':
            if (!cli_cache_mode_valid(optarg)) {
                cli_report("Invalid source cache option: %s", optarg);
                return 1;
            }
            break;
        case 'q':
            quiet = true;
            break;
        case 'U':
            flags |= VIMG_OPEN_FORCE_SHARE;
            break;
        case 'o' + 256:
            output = optarg;
            break;
        }
    }
    if (optind != argc - 1) {
        cli_error_exit("Expecting one image file name");
    }
    const char *filename = argv[optind];
    if (output && cli_parse_output(output, &ofmt) < 0) {
        return 1;
    }
    struct vimg_image *img = cli_open(filename, fmt, flags, quiet);
    if (!img) {
        return 1;
    }
    if (!img->drv->check) {
        cli_report("This image format does not support checks");
        vimg_close(img);
        return 63;
    }
    struct vimg_check_result r = { 0 };
    struct vimg_error err = { 0 };
    int ret = img->drv->check(img, &r, fix, &err);
    if (r.log) {
        fputs(r.log, stderr);
        free(r.log);
        r.log = NULL;
    }
    if (ret >= 0 && (r.corruptions_fixed || r.leaks_fixed)) {
        /* as qemu-img: report the repair, then check the result again */
        int cfixed = r.corruptions_fixed, lfixed = r.leaks_fixed;
        if (!quiet && CLI_OUT_HUMAN == ofmt) {
            printf("The following inconsistencies were found and repaired:\n\n"
                   "    %d leaked clusters\n    %d corruptions\n\n"
                   "Double checking the fixed image now...\n", lfixed, cfixed);
        }
        memset(&r, 0, sizeof(r));
        ret = img->drv->check(img, &r, 0, &err);
        if (r.log) {
            fputs(r.log, stderr);
            free(r.log);
            r.log = NULL;
        }
        r.corruptions_fixed = cfixed;
        r.leaks_fixed = lfixed;
    }
    if (-ENOTSUP == ret) {
        /* qemu: a driver that cannot repair answers like one without check */
        cli_report("This image format does not support checks");
        vimg_close(img);
        return 63;
    }
    if (ret < 0) {
        /* a driver's own diagnostic line, printed as qemu's driver does */
        if (0 == strncmp(err.msg, "ERROR: ", 7)) {
            fprintf(stderr, "%s\n", err.msg);
        }
        cli_report("Check failed: %s", strerror(-ret));
        vimg_close(img);
        return 1;
    }
    if (!quiet) {
        if (CLI_OUT_JSON == ofmt) {
            check_dump_json(&r, filename, vimg_format(img));
        } else {
            check_dump_human(&r);
        }
    }
    vimg_close(img);
    if (r.check_errors) {
        cli_report("Check failed");
        return 1;
    }
    return r.corruptions ? 2 : r.leaks ? 3 : 0;
}

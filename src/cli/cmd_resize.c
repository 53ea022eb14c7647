#include "config.h"

#include <inttypes.h>
#include <errno.h>
#include <string.h>

#include "cli/cli.h"

int cmd_resize(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "object", required_argument, NULL, 'j' + 256 },
        { "image-opts", no_argument, NULL, 'i' + 256 },
        { "preallocation", required_argument, NULL, 'p' + 256 },
        { "shrink", no_argument, NULL, 's' + 256 },
        { NULL, 0, NULL, 0 },
    };
    enum vimg_prealloc prealloc = VIMG_PREALLOC_OFF;
    const char *fmt = NULL, *size;
    bool quiet = false, shrink = false;
    int relative = 0;
    uint64_t n;
    int c;

    /* The size is taken off argv first so "-1G" is not read as an option. */
    if (argc < 3) {
        cli_error_exit("Not enough arguments");
    }
    size = argv[--argc];
    while ((c = getopt_long(argc, argv, ":f:hq", long_options, NULL)) != -1) {
        switch (c) {
        CLI_GETOPT_COMMON(argv)
        case 'h':
            cli_help();
        case 'f':
            fmt = optarg;
            break;
        case 'q':
            quiet = true;
            break;
        case 'p' + 256:
            if (vimg_prealloc_parse(optarg, &prealloc) < 0) {
                cli_report("Invalid preallocation mode '%s'", optarg);
                return 1;
            }
            break;
        case 's' + 256:
            shrink = true;
            break;
        }
    }
    if (optind != argc - 1) {
        cli_error_exit("Expecting image file name and size");
    }
    const char *filename = argv[optind];
    if ('+' == size[0]) {
        relative = 1;
        size++;
    } else if ('-' == size[0]) {
        relative = -1;
        size++;
    }
    if (vimg_parse_size(size, 'B', &n) < 0) {
        cli_report("Parameter 'size' expects a non-negative number below 2^64");
        fprintf(stderr, "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                "tera-, peta-\nand exabytes, respectively.\n");
        return 1;
    }
    struct vimg_image *img = cli_open(filename, fmt, VIMG_OPEN_RDWR | VIMG_OPEN_RESIZE | VIMG_OPEN_NO_BACKING,
                                      quiet);
    if (!img) {
        return 1;
    }
    int64_t current = (int64_t)vimg_size(img);
    int64_t total = relative ? current + (int64_t)n * relative : (int64_t)n;
    int ret = 1;
    if (total <= 0) {
        cli_report("New image size must be positive");
    } else if (total <= current && VIMG_PREALLOC_OFF != prealloc) {
        cli_report("Preallocation can only be used for growing images");
    } else if (total < current && !shrink) {
        cli_report("Use the --shrink option to perform a shrink operation.");
        fprintf(stderr, "%s: warning: Shrinking an image will delete all data beyond the "
                "shrunken image's end. Before performing such an operation, make sure "
                "there is no important data there.\n", cli_progname);
    } else {
        struct vimg_error err = { 0 };
        if (vimg_truncate(img, (uint64_t)total, prealloc, shrink, &err) < 0) {
            cli_report_err(&err);
        } else {
            if (!quiet) {
                printf("Image resized.\n");
            }
            ret = 0;
        }
    }
    vimg_close(img);
    return ret;
}

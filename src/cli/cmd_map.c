#include "config.h"

#include <inttypes.h>
#include <string.h>

#include "cli/cli.h"

struct map_entry {
    uint64_t start, length, offset;
    int depth;
    bool present, zero, data, has_offset;
    const char *filename;
};

static void map_dump(const struct map_entry *e, const struct map_entry *next,
                     enum cli_output ofmt)
{
    if (CLI_OUT_HUMAN == ofmt) {
        if (e->data && !e->zero) {
            printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n", e->start, e->length,
                   e->offset, e->filename ? e->filename : "");
        }
        return;
    }
    printf("{ \"start\": %" PRId64 ", \"length\": %" PRId64 ", \"depth\": %d, "
           "\"present\": %s, \"zero\": %s, \"data\": %s",
           (int64_t)e->start, (int64_t)e->length, e->depth, e->present ? "true" : "false",
           e->zero ? "true" : "false", e->data ? "true" : "false");
    if (e->has_offset) {
        printf(", \"offset\": %" PRId64, (int64_t)e->offset);
    }
    printf("}");
    if (next) {
        printf(",\n");
    }
}

/* qemu merges a run into the previous one when everything but the length
 * matches and, with an offset, the offsets continue. */
static bool map_can_merge(const struct map_entry *cur, const struct map_entry *next)
{
    return cur->length && cur->start + cur->length == next->start &&
           cur->depth == next->depth && cur->present == next->present &&
           cur->zero == next->zero && cur->data == next->data &&
           cur->has_offset == next->has_offset &&
           (!cur->has_offset || cur->offset + cur->length == next->offset) &&
           ((!cur->filename && !next->filename) ||
            (cur->filename && next->filename && 0 == strcmp(cur->filename, next->filename)));
}

int cmd_map(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { "output", required_argument, NULL, 'o' + 256 },
        { "object", required_argument, NULL, 'j' + 256 },
        { "start-offset", required_argument, NULL, 's' },
        { "max-length", required_argument, NULL, 'l' },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 },
    };
    const char *fmt = NULL, *output = NULL;
    enum cli_output ofmt = CLI_OUT_HUMAN;
    unsigned flags = 0;
    int64_t start = 0, max_length = -1;
    int c;

    while ((c = getopt_long(argc, argv, ":f:s:l:hU", long_options, NULL)) != -1) {
        switch (c) {
        CLI_GETOPT_COMMON(argv)
        case 'h':
            cli_help();
        case 'f':
            fmt = optarg;
            break;
        case 'U':
            flags |= VIMG_OPEN_FORCE_SHARE;
            break;
        case 'o' + 256:
            output = optarg;
            break;
        case 's':
            start = cli_cvtnum("start offset", optarg);
            if (start < 0) {
                return 1;
            }
            break;
        case 'l':
            max_length = cli_cvtnum("max length", optarg);
            if (max_length < 0) {
                return 1;
            }
            break;
        case 'j' + 256:
            break;
        }
    }
    if (optind != argc - 1) {
        cli_error_exit("Expecting one image file name");
    }
    if (output && cli_parse_output(output, &ofmt) < 0) {
        return 1;
    }
    struct vimg_image *img = cli_open(argv[optind], fmt, flags, false);
    if (!img) {
        return 1;
    }
    if (CLI_OUT_HUMAN == ofmt) {
        printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
    } else {
        printf("[");
    }
    uint64_t length = vimg_size(img);
    uint64_t end = length;
    if (max_length >= 0 && (uint64_t)start + (uint64_t)max_length < end) {
        end = (uint64_t)start + (uint64_t)max_length;
    }
    struct map_entry cur = { .start = (uint64_t)start };
    int ret = 0;
    for (uint64_t off = (uint64_t)start; off < end;) {
        struct vimg_error err = { 0 };
        struct vimg_status st;
        uint64_t n = end - off;
        if (n > (1ull << 30)) {
            n = 1ull << 30;
        }
        if (vimg_block_status(img, off, n, &st, &err) < 0) {
            cli_report("Could not read file metadata: %s", strerror(err.code));
            ret = 1;
            break;
        }
        struct map_entry e = {
            .start = off,
            .length = st.length,
            .depth = st.depth,
            .present = !!(st.flags & VIMG_STATUS_ALLOCATED),
            .zero = !!(st.flags & VIMG_STATUS_ZERO),
            .data = !!(st.flags & VIMG_STATUS_DATA),
            .has_offset = !!(st.flags & VIMG_STATUS_HOST_VALID),
            .offset = st.host_offset,
            .filename = (st.flags & VIMG_STATUS_HOST_VALID) ? st.host_file : NULL,
        };
        if (CLI_OUT_HUMAN == ofmt && e.data && !e.has_offset) {
            cli_report("File contains external, encrypted or compressed clusters.");
            ret = 1;
            break;
        }
        if (CLI_OUT_HUMAN == ofmt && !(e.data && !e.zero)) {
            /* human output folds everything that is not data together */
            e.zero = true;
            e.data = false;
            e.has_offset = false;
            e.offset = 0;
            e.filename = NULL;
            e.depth = 0;
            e.present = false;
        }
        if (map_can_merge(&cur, &e)) {
            cur.length += e.length;
        } else {
            if (cur.length) {
                map_dump(&cur, &e, ofmt);
            }
            cur = e;
        }
        off += st.length;
    }
    if (0 == ret) {
        if (0 == cur.length && CLI_OUT_JSON == ofmt) {
            /* an empty image still gets one (empty) entry */
            cur.start = (uint64_t)start;
        }
        if (cur.length || CLI_OUT_JSON == ofmt) {
            map_dump(&cur, NULL, ofmt);
        }
        if (CLI_OUT_JSON == ofmt) {
            printf("]\n");
        }
    }
    vimg_close(img);
    return ret;
}

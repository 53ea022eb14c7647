#include "config.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/cli.h"
#include "core/info.h"

static void info_dump_human(const struct vimg_qobj *d)
{
    struct vimg_qobj *o;
    char vs[64], ds[64];

    uint64_t vsize = (uint64_t)vimg_q_get_int(vimg_q_get(d, "virtual-size"));
    o = vimg_q_get(d, "actual-size");
    if (o) {
        vimg_format_size((uint64_t)vimg_q_get_int(o), ds, sizeof(ds));
    } else {
        strcpy(ds, "unavailable");
    }
    printf("image: %s\nfile format: %s\nvirtual size: %s (%" PRIu64 " bytes)\n"
           "disk size: %s\n",
           vimg_q_get_str(vimg_q_get(d, "filename")), vimg_q_get_str(vimg_q_get(d, "format")),
           vimg_format_size(vsize, vs, sizeof(vs)), vsize, ds);
    if ((o = vimg_q_get(d, "encrypted")) && vimg_q_get_bool(o)) {
        printf("encrypted: yes\n");
    }
    if ((o = vimg_q_get(d, "cluster-size"))) {
        printf("cluster_size: %" PRId64 "\n", vimg_q_get_int(o));
    }
    if ((o = vimg_q_get(d, "dirty-flag")) && vimg_q_get_bool(o)) {
        printf("cleanly shut down: no\n");
    }
    if ((o = vimg_q_get(d, "backing-filename"))) {
        struct vimg_qobj *full = vimg_q_get(d, "full-backing-filename");
        printf("backing file: %s", vimg_q_get_str(o));
        if (!full) {
            printf(" (cannot determine actual path)");
        } else if (strcmp(vimg_q_get_str(o), vimg_q_get_str(full))) {
            printf(" (actual path: %s)", vimg_q_get_str(full));
        }
        printf("\n");
        if ((o = vimg_q_get(d, "backing-filename-format"))) {
            printf("backing file format: %s\n", vimg_q_get_str(o));
        }
    }
    if ((o = vimg_q_get(d, "snapshots")) && vimg_q_count(o)) {
        printf("Snapshot list:\n%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE",
               "VM CLOCK", "ICOUNT");
        for (size_t i = 0; i < vimg_q_count(o); i++) {
            struct vimg_qobj *sn = vimg_q_index(o, i);
            struct vimg_qobj *ic = vimg_q_get(sn, "icount");
            char size[64], date[64], clock[64], icount[32] = "";
            time_t t = (time_t)vimg_q_get_int(vimg_q_get(sn, "date-sec"));
            struct tm tm;
            int64_t secs = vimg_q_get_int(vimg_q_get(sn, "vm-clock-sec"));
            int64_t nsec = vimg_q_get_int(vimg_q_get(sn, "vm-clock-nsec"));
            localtime_r(&t, &tm);
            strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
            snprintf(clock, sizeof(clock), "%02d:%02d:%02d.%03d", (int)(secs / 3600),
                     (int)((secs / 60) % 60), (int)(secs % 60), (int)((nsec / 1000000) % 1000));
            if (ic) {
                snprintf(icount, sizeof(icount), "%" PRId64, vimg_q_get_int(ic));
            }
            vimg_format_size((uint64_t)vimg_q_get_int(vimg_q_get(sn, "vm-state-size")), size,
                             sizeof(size));
            printf("%-9s %-16s %8s%20s%13s%11s\n", vimg_q_get_str(vimg_q_get(sn, "id")),
                   vimg_q_get_str(vimg_q_get(sn, "name")), size, date, clock, icount);
        }
    }
    if ((o = vimg_q_get(d, "format-specific"))) {
        char *s = vimg_q_to_human(vimg_q_get(o, "data"), 1);
        printf("Format specific information:\n%s", s ? s : "");
        free(s);
    }
}

int cmd_info(int argc, char **argv)
{
    static const struct option long_options[] = {
        { "help", no_argument, NULL, 'h' },
        { "format", required_argument, NULL, 'f' },
        { "output", required_argument, NULL, 'o' + 256 },
        { "backing-chain", no_argument, NULL, 'b' + 256 },
        { "force-share", no_argument, NULL, 'U' },
        { NULL, 0, NULL, 0 },
    };
    const char *fmt = NULL, *output = NULL;
    enum cli_output ofmt = CLI_OUT_HUMAN;
    bool chain = false;
    unsigned flags = VIMG_OPEN_NO_IO;
    int c;

    while ((c = getopt_long(argc, argv, ":f:hU", long_options, NULL)) != -1) {
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
        case 'b' + 256:
            chain = true;
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
    if (!chain) {
        flags |= VIMG_OPEN_NO_BACKING;
    }
    struct vimg_image *top = cli_open(filename, fmt, flags, false);
    if (!top) {
        return 1;
    }
    struct vimg_qobj *list = vimg_q_list();
    for (struct vimg_image *img = top; img; img = chain ? vimg_backing(img) : NULL) {
        struct vimg_error err = { 0 };
        struct vimg_qobj *d;
        if (vimg_internal_image_info(img, &d, &err) < 0) {
            cli_report_err(&err);
            vimg_q_free(list);
            vimg_close(top);
            return 1;
        }
        vimg_q_append(list, d);
    }
    if (CLI_OUT_JSON == ofmt) {
        char *s = vimg_q_to_json(chain ? list : vimg_q_index(list, 0));
        printf("%s\n", s ? s : "");
        free(s);
    } else {
        for (size_t i = 0; i < vimg_q_count(list); i++) {
            if (i) {
                printf("\n");
            }
            info_dump_human(vimg_q_index(list, i));
        }
    }
    vimg_q_free(list);
    vimg_close(top);
    return 0;
}

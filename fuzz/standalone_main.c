/* Replays corpus files through LLVMFuzzerTestOneInput when libFuzzer is not
 * available (gcc builds), so every corpus file runs in `make check`. */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define MAX_INPUT (64 * 1024 * 1024)

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        if (!f) {
            perror(argv[i]);
            return 1;
        }
        uint8_t *buf = malloc(MAX_INPUT);
        size_t n = buf ? fread(buf, 1, MAX_INPUT, f) : 0;
        fclose(f);
        if (!buf) {
            return 1;
        }
        LLVMFuzzerTestOneInput(buf, n);
        free(buf);
        printf("ran %s (%zu bytes)\n", argv[i], n);
    }
    return 0;
}

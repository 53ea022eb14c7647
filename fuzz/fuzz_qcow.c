/* The qcow driver under the shared driver fuzz body (fuzz_driver.h). */
#include "config.h"

#include "fuzz_driver.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    return vimg_fuzz_driver(data, size, "qcow", "fuzz.qcow");
}

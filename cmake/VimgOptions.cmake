# Every build option of vimg, in one place.
option(VIMG_SANITIZE "Build with AddressSanitizer and UndefinedBehaviorSanitizer" OFF)
option(VIMG_WERROR "Treat warnings as errors (CI)" OFF)
option(VIMG_TESTS "Build the unit tests (needs cmocka)" ON)
option(VIMG_FUZZ "Build fuzz targets with libFuzzer (needs clang)" OFF)

# vimg_add_unit_test(name): tests/unit/<name>.c linked against vimg_core and cmocka.
# Exit code 77 means "host feature missing": CTest reports a skip.
function(vimg_add_unit_test name)
    add_executable(${name} ${CMAKE_CURRENT_SOURCE_DIR}/${name}.c)
    target_link_libraries(${name} PRIVATE vimg_core PkgConfig::CMOCKA)
    add_test(NAME unit/${name} COMMAND ${name})
    set_tests_properties(unit/${name} PROPERTIES SKIP_RETURN_CODE 77
        ENVIRONMENT "VIMG_TEST_TMP=${CMAKE_BINARY_DIR}/tmp")
endfunction()

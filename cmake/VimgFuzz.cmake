# vimg_add_fuzzer(name): fuzz/<name>.c defines LLVMFuzzerTestOneInput.
# With clang and VIMG_FUZZ=ON it links libFuzzer and registers a short run over
# corpus/<name>/; otherwise it links standalone_main.c, which replays files, and
# every corpus file becomes a CTest, so the corpora run in every `make check`.
function(vimg_add_fuzzer name)
    set(corpus ${CMAKE_CURRENT_SOURCE_DIR}/corpus/${name})
    if(VIMG_FUZZ)
        add_executable(${name} ${CMAKE_CURRENT_SOURCE_DIR}/${name}.c)
        target_compile_options(${name} PRIVATE -fsanitize=fuzzer,address,undefined)
        target_link_options(${name} PRIVATE -fsanitize=fuzzer,address,undefined)
        target_link_libraries(${name} PRIVATE vimg_core)
        add_test(NAME fuzz/${name} COMMAND ${name} -max_total_time=10 -rss_limit_mb=1024 ${corpus})
    else()
        add_executable(${name} ${CMAKE_CURRENT_SOURCE_DIR}/${name}.c
                               ${CMAKE_CURRENT_SOURCE_DIR}/standalone_main.c)
        target_link_libraries(${name} PRIVATE vimg_core)
        file(GLOB seeds LIST_DIRECTORIES false ${corpus}/*)
        foreach(seed ${seeds})
            get_filename_component(base ${seed} NAME)
            add_test(NAME fuzz/${name}/${base} COMMAND ${name} ${seed})
        endforeach()
    endif()
endfunction()

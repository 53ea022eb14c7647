# Thin wrapper around CMake + Ninja.  `make demo` and `make check` work on a
# fresh Debian 12 machine: they install what is missing first.
BUILD      ?= build
ASAN_BUILD ?= build-asan
JOBS       ?= 2

.PHONY: all setup build asan demo check unit conformance fuzz-replay fuzz bench clean

all: build

setup:
	@./scripts/setup.sh

$(BUILD)/build.ninja:
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo

build: setup $(BUILD)/build.ninja
	ninja -C $(BUILD) -j $(JOBS)

$(ASAN_BUILD)/build.ninja:
	cmake -S . -B $(ASAN_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Debug -DVIMG_SANITIZE=ON \
	    -DVIMG_WERROR=$(if $(CI),ON,OFF)

asan: setup $(ASAN_BUILD)/build.ninja
	ninja -C $(ASAN_BUILD) -j $(JOBS)

demo: build
	@./scripts/demo.sh $(BUILD)/src/vimg

# Everything, under ASan+UBSan: unit tests and fuzz corpus replay (CTest),
# then the conformance suite against the real qemu-img.
check: asan
	mkdir -p $(ASAN_BUILD)/tmp
	cd $(ASAN_BUILD) && ctest --output-on-failure -j $(JOBS)
	VIMG_TEST_TMP=$(CURDIR)/$(ASAN_BUILD)/tmp python3 tests/conformance/run.py \
	    --vimg $(ASAN_BUILD)/src/vimg

fuzz: setup
	cmake -S . -B build-fuzz -G Ninja -DCMAKE_C_COMPILER=clang -DVIMG_FUZZ=ON \
	    -DVIMG_TESTS=OFF -DCMAKE_BUILD_TYPE=Debug
	ninja -C build-fuzz -j $(JOBS)
	./scripts/fuzz.sh build-fuzz $(or $(FUZZ_SECONDS),300)

bench: build
	./bench/run.sh $(BUILD)/src/vimg

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) build-fuzz

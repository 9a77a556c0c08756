# chatd: keep a device's chat identity logged in over MQTT.
# `make help` lists the targets.

GO       ?= go
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)
LDFLAGS  := -s -w -X main.version=$(VERSION)
GOFLAGS_BUILD := -trimpath -ldflags '$(LDFLAGS)'
BIN      := bin
CMDS     := chatd chatctl chatgw

.DEFAULT_GOAL := help
.PHONY: help build test test-cluster check check-fast check-system system-deps deps apt-deps npm-deps vet fmt-check fuzz demo demo-smoke test-arm cross check-units packages check-debs test-board clean

help: ## List the targets.
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

build: ## Build the binaries into bin/.
	@mkdir -p $(BIN)
	@for c in $(CMDS); do \
		CGO_ENABLED=0 $(GO) build $(GOFLAGS_BUILD) -o $(BIN)/$$c ./cmd/$$c || exit 1; \
	done

test: ## Fast pure-Go tests; needs nothing installed (skips what needs Mosquitto or npm).
	$(GO) test ./...

deps: apt-deps npm-deps ## Install what `make check` needs (Debian packages, the npm package).

# Debian packages the tests use: Mosquitto and its clients for the
# integration tests, prometheus for promtool (the metrics check), a C toolchain for the race detector (cgo), curl for the
# end-to-end tests, QEMU for the ARM runs. As root they are installed with
# apt-get; otherwise the exact command is printed.
APT_PKGS := mosquitto mosquitto-clients prometheus gcc libc6-dev curl systemd qemu-user-static binfmt-support
# And for check-system: lintian for the packages, mmdebstrap and file for
# the chroot and the board's root file system, QEMU for the board.
APT_SYSTEM_PKGS := $(APT_PKGS) lintian mmdebstrap file jq arch-test e2fsprogs qemu-system-arm
apt-deps:
	@$(call apt_install,$(APT_PKGS))
system-deps: apt-deps npm-deps ## Install what `make check-system` needs too (lintian, mmdebstrap, QEMU).
	@$(call apt_install,$(APT_SYSTEM_PKGS))

define apt_install
missing=""; for p in $(1); do \
	dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
done; \
if [ -n "$$missing" ]; then \
	if [ "$$(id -u)" = 0 ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null || exit 1; \
	else \
		echo "missing Debian packages:$$missing"; \
		echo "run: sudo apt-get install -y$$missing"; exit 1; \
	fi; \
fi
endef

npm-deps: usersig/interop/node_modules/.installed ## Install the official tls-sig-api-v2 npm package for the interop test.
usersig/interop/node_modules/.installed: usersig/interop/package.json usersig/interop/package-lock.json
	cd usersig/interop && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

vet: ## go vet.
	$(GO) vet ./...

fmt-check: ## Fail if gofmt would change a file.
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi

FUZZ_TARGETS := ./usersig:FuzzDecode ./mqtt:FuzzDecode ./gateway:FuzzHandleMessage ./storage:FuzzOpenBolt
fuzz: ## Run each fuzz target for FUZZTIME (default 10s); the corpora live in testdata/.
	@for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t##*:}; echo "== $$pkg $$name"; \
		$(GO) test $$pkg -run '^$$' -fuzz "^$$name\$$" -fuzztime $(or $(FUZZTIME),10s) || exit 1; \
	done

check: ## Everything CI runs: check-fast, then check-system.
	$(MAKE) --no-print-directory check-fast
	$(MAKE) --no-print-directory check-system

check-fast: deps fmt-check vet ## gofmt, vet, every Go test with the race detector (end to end on loopback, Mosquitto, npm interop, manual pages), the cluster tests (test-cluster), the demo. No root needed once deps are installed.
	CGO_ENABLED=1 CHATD_REQUIRE_MOSQUITTO=1 CHATD_REQUIRE_INTEROP=1 CHATD_REQUIRE_TOOLS=1 $(GO) test -race -count=1 ./...
	$(MAKE) --no-print-directory test-cluster
	$(MAKE) --no-print-directory demo-smoke

# The cluster tests start real nats-server processes (built from the
# version go.mod pins), chatgw gateways and chatd devices on loopback.
test-cluster: ## Three nats-server nodes, gateways and devices on loopback: node kill -9 and restart, partition, the fleet's fault scenarios (go test -tags cluster).
	$(GO) vet -tags cluster ./internal/natstest/ ./cluster/
	CGO_ENABLED=0 $(GO) test -tags cluster -count=1 -p 1 -timeout 9m ./internal/natstest/ ./cluster/

check-system: system-deps ## As root: the units (systemd-analyze), the packages (lintian, Debian 12 chroot, upgrade), ARM under qemu-user, the QEMU board.
	@[ "$$(id -u)" = 0 ] || { echo "check-system: run it as root (chroot, binfmt_misc, mmdebstrap): sudo make check-system"; exit 1; }
	$(MAKE) --no-print-directory check-units
	$(MAKE) --no-print-directory check-debs
	$(MAKE) --no-print-directory test-arm
	BOARD_DEBS="$$(ls dist/chatd_*_arm64.deb dist/chatgw_*_arm64.deb | tr '\n' ' ')" $(MAKE) --no-print-directory test-board

test-arm: deps ## Run the test suite under qemu-user for ARMv6, ARMv7 and arm64, and the end-to-end test on arm64.
	CHATD_REQUIRE_MOSQUITTO=1 CHATD_REQUIRE_INTEROP=1 ./build/test-arm.sh

check-units: ## Verify the systemd units and their exposure score (at most 2.0).
	./build/check-units.sh

packages: ## Build the Debian packages into dist/: chatd (armhf = ARMv6 build, arm64, amd64) and chatgw (arm64, amd64).
	./build/packages.sh $(DEB_VERSION)

check-debs: packages ## Inspect the .debs (files, lintian) and install, upgrade and purge the amd64 ones in a Debian 12 chroot (root).
	./build/check-packages.sh

test-board: build ## Boot a whole ARM board (Debian 12, systemd) in QEMU with the chatd and chatgw packages: login, permissions, broker outage, clock step, reboot (ARCH=armhf too).
	./build/board/test-board.sh $(or $(ARCH),arm64)

cross: ## Build chatd, chatctl, chatgw for ARMv6, ARMv7, arm64 and amd64 into dist/cross/ (static, stripped, reproducible) and print their sizes.
	@./build/cross.sh

demo-smoke: build ## Start the demo, check it logs in, stop it.
	@./build/demo.sh --smoke

demo: build ## Run the gateway with its embedded broker and a demo device under .demo/ (Ctrl-C stops all).
	@./build/demo.sh

# Benchmarks: not part of `make check` (go test ./bench runs a tiny smoke).
.PHONY: bench
DEVICES ?= 2000
RUNS    ?= 3
bench: ## Measure each figure against its baseline in the same run, print ratios, write docs/benchmarks.md (DEVICES=2000 RUNS=3).
	$(GO) run ./bench -devices $(DEVICES) -runs $(RUNS) -out docs/benchmarks.md

clean: ## Remove build output and demo state.
	rm -rf $(BIN) .demo dist

#!/usr/bin/env bash
# Build the chatd Debian packages: chatd, chatctl and chatgw cross-compiled
# for armhf (GOARM=6: one package for every Raspberry Pi, Zero and 1
# included), arm64 and amd64, then packaged with nfpm (a Go tool of this
# module: go tool nfpm).
#
#   build/packages.sh [VERSION]
#
# VERSION must be a Debian version; by default it comes from
# `git describe --tags --always --dirty`:
#   v1.2.3             -> 1.2.3
#   v1.2.3-4-gabc1234  -> 1.2.3+git4.gabc1234   (after 1.2.3)
#   abc1234 (no tag)   -> 0.0.0~gitabc1234      (before any release)
#   ...-dirty          -> ....dirty
# Output: dist/<arch>/{chatd,chatctl,chatgw}, dist/chatd_<version>_<arch>.deb.
# The builds are reproducible: no build id, trimmed paths, and file times
# from SOURCE_DATE_EPOCH (default: the last commit's time).
set -euo pipefail
cd "$(dirname "$0")/.."

GO=${GO:-go}
ARCHES=(armhf arm64 amd64)
CMDS=(chatd chatctl chatgw)

debian_version() {
	local d
	d=$(git describe --tags --always --dirty 2>/dev/null) || d=""
	if [ -z "$d" ]; then
		echo "0.0.0~unknown"
		return
	fi
	local dirty=""
	case $d in *-dirty) dirty=.dirty d=${d%-dirty} ;; esac
	if ! git describe --tags --abbrev=0 >/dev/null 2>&1; then
		# No tag: d is an abbreviated commit hash (which may start
		# with a digit).
		d="0.0.0~git$d"
	elif [[ $d =~ ^v?([0-9][A-Za-z0-9.+~]*)-([0-9]+)-(g[0-9a-f]+)$ ]]; then
		d="${BASH_REMATCH[1]}+git${BASH_REMATCH[2]}.${BASH_REMATCH[3]}"
	elif [[ $d =~ ^v?([0-9][A-Za-z0-9.+~]*)$ ]]; then
		d=${BASH_REMATCH[1]}
	else
		# A tag that is no version: keep it, made Debian-safe.
		d="0.0.0~${d//[^A-Za-z0-9.+~]/.}"
	fi
	echo "$d$dirty"
}

VERSION=${1:-$(debian_version)}
# Debian: starts with a digit; letters, digits and . + ~ (and - only before
# a Debian revision).
if ! [[ $VERSION =~ ^[0-9][A-Za-z0-9.+~]*(-[A-Za-z0-9.+~]+)?$ ]]; then
	echo "packages: $VERSION is not a Debian version (e.g. 1.2.3, 1.2.3~rc1, 1.2.3-1)" >&2
	exit 1
fi
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
	SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

for f in build/package/nfpm.yaml build/package/chatd.toml build/package/get-usersig \
	build/systemd/chatd.service build/systemd/chatd.socket; do
	[ -f "$f" ] || { echo "packages: $f is missing" >&2; exit 1; }
done

start=$(date +%s)
echo "packages: chatd $VERSION (SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"

# The documentation, the same for every architecture. operations.md is
# optional until it is written.
doc=dist/doc
rm -rf "$doc"
mkdir -p "$doc/examples"
if [ -f README.md ]; then
	install -m 0644 README.md "$doc/README.md"
else
	echo "packages: warning: README.md is missing; the package ships without it" >&2
fi
if [ -f docs/operations.md ]; then
	install -m 0644 docs/operations.md "$doc/operations.md"
else
	echo "packages: note: docs/operations.md does not exist yet; not packaged" >&2
fi
install -m 0755 build/package/get-usersig "$doc/examples/get-usersig"
# nfpm takes a tree's file times from the disk.
find "$doc" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

rm -f dist/chatd_*.deb
debs=()
for arch in "${ARCHES[@]}"; do
	goarm=""
	case $arch in
	armhf) goarch=arm goarm=6 nfpm_arch=arm6 ;;
	arm64) goarch=arm64 nfpm_arch=arm64 ;;
	amd64) goarch=amd64 nfpm_arch=amd64 ;;
	esac
	out=dist/$arch
	rm -rf "$out"
	mkdir -p "$out"
	pkgs=()
	for c in "${CMDS[@]}"; do pkgs+=("./cmd/$c"); done
	echo "packages: building ${CMDS[*]} for $arch (GOARCH=$goarch${goarm:+ GOARM=$goarm})"
	CGO_ENABLED=0 GOOS=linux GOARCH=$goarch GOARM=$goarm \
		"$GO" build -trimpath -ldflags "-s -w -buildid= -X main.version=$VERSION" \
		-o "$out/" "${pkgs[@]}"

	CHATD_ARCH=$nfpm_arch CHATD_VERSION=$VERSION CHATD_BIN_DIR=$out CHATD_DOC_DIR=$doc \
		"$GO" tool nfpm package --packager deb --config build/package/nfpm.yaml --target dist/ >/dev/null
	deb=dist/chatd_${VERSION}_${arch}.deb
	[ -f "$deb" ] || { echo "packages: nfpm did not write $deb" >&2; ls dist >&2; exit 1; }
	debs+=("$deb")
done

echo "packages: done in $(($(date +%s) - start))s"
for d in "${debs[@]}"; do
	printf '%s\t%s bytes (%s)\n' "$d" "$(stat -c %s "$d")" "$(du -h "$d" | cut -f1)"
done

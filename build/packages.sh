#!/usr/bin/env bash
# Build the Debian packages, with nfpm (a Go tool of this module: go tool
# nfpm):
#   chatd   chatd and chatctl, their units and config: armhf (GOARM=6: one
#           package for every Raspberry Pi, Zero and 1 included), arm64, amd64
#   chatgw  the login gateway, its unit and config: arm64, amd64
#
#   build/packages.sh [VERSION]
#
# VERSION must be a Debian version; by default it comes from
# `git describe --tags --always --dirty`:
#   v1.2.3             -> 1.2.3
#   v1.2.3-4-gabc1234  -> 1.2.3+git4.gabc1234   (after 1.2.3)
#   abc1234 (no tag)   -> 0.0.0~gitabc1234      (before any release)
#   ...-dirty          -> ....dirty
# Output: dist/<arch>/{chatd,chatctl,chatgw}, dist/<package>_<version>_<arch>.deb.
# Every package carries its manual pages, a changelog (build/package/changelog,
# with an entry for VERSION added when it has none), a machine-readable
# copyright file (build/package/copyright plus the licenses of the Go
# modules built into its binaries) and its lintian overrides.
# The builds are reproducible: no build id, trimmed paths, and file times
# from SOURCE_DATE_EPOCH (default: the last commit's time).
#
# ARCHES="amd64" build/packages.sh   builds only the listed architectures;
# PACKAGES_OUT=DIR puts the .debs in DIR instead of dist/.
set -euo pipefail
cd "$(dirname "$0")/.."

GO=${GO:-go}
read -r -a ARCHES <<<"${ARCHES:-armhf arm64 amd64}"
# Which architectures each package is built for, and its binaries.
declare -A PKG_ARCHES=([chatd]="armhf arm64 amd64" [chatgw]="arm64 amd64")
declare -A PKG_CMDS=([chatd]="chatd chatctl" [chatgw]="chatgw")
# Manual pages (docs/man) of each package.
declare -A PKG_MAN=([chatd]="chatd.8 chatctl.1 chatd.toml.5" [chatgw]="chatgw.8 chatgw.toml.5")
MAINTAINER="chatd maintainers <chatd@example.invalid>"

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

for f in build/package/chatd.yaml build/package/chatgw.yaml build/package/chatd.toml \
	build/package/chatgw.toml build/package/get-usersig build/package/changelog \
	build/package/copyright build/systemd/chatd.service build/systemd/chatd.socket \
	build/systemd/chatgw.service; do
	[ -f "$f" ] || { echo "packages: $f is missing" >&2; exit 1; }
done

start=$(date +%s)
echo "packages: $VERSION (SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"

# The licenses of the Go modules that may be built in, as Debian names
# them. A module missing here stops the build: add it after reading its
# license.
declare -A MODULE_LICENSE=(
	[github.com/BurntSushi/toml]=Expat
	[github.com/VictoriaMetrics/metrics]=Expat
	[github.com/coreos/go-systemd/v22]=Apache-2.0
	[github.com/eclipse/paho.mqtt.golang]="EPL-2.0 or EDL-1.0"
	[github.com/gorilla/websocket]=BSD-2-clause
	[github.com/klauspost/compress]="BSD-3-clause and Apache-2.0 and Expat"
	[github.com/mochi-mqtt/server/v2]=Expat
	[github.com/nats-io/nats.go]=Apache-2.0
	[github.com/nats-io/nkeys]=Apache-2.0
	[github.com/nats-io/nuid]=Apache-2.0
	[github.com/rs/xid]=Expat
	[github.com/valyala/fastrand]=Expat
	[github.com/valyala/histogram]=Expat
	[go.etcd.io/bbolt]=Expat
	[golang.org/x/crypto]=BSD-3-clause
	[golang.org/x/net]=BSD-3-clause
	[golang.org/x/sync]=BSD-3-clause
	[golang.org/x/sys]=BSD-3-clause
)

# A license file as the body of a copyright-format paragraph: indented by
# one space, empty lines as " .".
indent() { sed -e 's/[[:space:]]*$//' -e 's/^$/./' -e 's/^/ /' "$1"; }

# copyright PKG: the package's copyright file on stdout.
copyright() {
	local pkg=$1 cmds=() m dir lic f
	for c in ${PKG_CMDS[$pkg]}; do cmds+=("./cmd/$c"); done
	cat build/package/copyright
	printf '\nFiles: go/*\nCopyright: The Go Authors\nComment: the Go standard library and runtime, %s\nLicense: BSD-3-clause\n' "$("$GO" env GOVERSION)"
	indent "$("$GO" env GOROOT)/LICENSE"
	for m in $(CGO_ENABLED=0 GOOS=linux "$GO" list -deps -f '{{with .Module}}{{if not .Main}}{{.Path}}@{{.Version}}{{end}}{{end}}' "${cmds[@]}" | sort -u); do
		lic=${MODULE_LICENSE[${m%@*}]:-}
		[ -n "$lic" ] || { echo "packages: no license known for the Go module ${m%@*}: add it to MODULE_LICENSE in $0" >&2; exit 1; }
		dir=$("$GO" list -m -f '{{.Dir}}' "${m%@*}")
		f=$(ls "$dir" | grep -iE '^(licen[cs]e|copying)(\.md|\.txt)?$' | head -n 1)
		[ -n "$f" ] || { echo "packages: ${m%@*} has no license file in $dir" >&2; exit 1; }
		printf '\nFiles: go/%s/*\nCopyright: the authors of %s (see below)\nComment: Go module %s\nLicense: %s\n' "${m%@*}" "${m%@*}" "$m" "$lic"
		if [ "$lic" = Apache-2.0 ]; then
			echo " On Debian systems the full text of the Apache License 2.0 is in"
			echo " /usr/share/common-licenses/Apache-2.0."
			[ ! -f "$dir/NOTICE" ] || { echo " ."; echo " Its NOTICE file:"; echo " ."; indent "$dir/NOTICE"; }
		else
			# A file that carries the Apache License 2.0 among others
			# (for some of the module's directories): its text is in
			# common-licenses.
			awk '/^ *Apache License$/ && !done { print "   [The Apache License 2.0: on Debian systems its full text is in"; print "   /usr/share/common-licenses/Apache-2.0.]"; skip = 1; done = 1; next }
				skip && /END OF TERMS AND CONDITIONS/ { skip = 0; next }
				!skip' "$dir/$f" | indent /dev/stdin
		fi
	done
}

# changelog: build/package/changelog for $VERSION. Its newest entry is
# either the coming release's, "chatd (UNRELEASED)" dated "DATE", which
# becomes $VERSION dated SOURCE_DATE_EPOCH; or a released version's, and a
# build after it (1.2.3+git4.gabc1234) gets an entry of its own on top.
changelog() {
	local top date
	top=$(sed -n '1s/^chatd (\([^)]*\)).*/\1/p' build/package/changelog)
	date=$(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")
	if [ "$top" = UNRELEASED ]; then
		sed -e "1s/(UNRELEASED)/($VERSION)/" -e "0,/^ -- .*  DATE\$/s//\
 -- $MAINTAINER  $date/" build/package/changelog
		return
	fi
	if [ "$top" != "$VERSION" ]; then
		printf 'chatd (%s) unstable; urgency=medium\n\n  * Built from %s.\n\n -- %s  %s\n\n' \
			"$VERSION" "$(git describe --tags --always --dirty 2>/dev/null || echo 'a source tree')" \
			"$MAINTAINER" "$date"
	fi
	cat build/package/changelog
}

# Stage what does not depend on the architecture: dist/stage/PKG/usr/share.
rm -rf dist/stage
for pkg in chatd chatgw; do
	st=dist/stage/$pkg/usr/share
	mkdir -p "$st/doc/$pkg" "$st/lintian/overrides"
	copyright "$pkg" >"$st/doc/$pkg/copyright"
	chmod 0644 "$st/doc/$pkg/copyright"
	# A native package (no Debian revision): changelog.gz.
	changelog | gzip -9n >"$st/doc/$pkg/changelog.gz"
	for m in ${PKG_MAN[$pkg]}; do
		sec=${m##*.}
		mkdir -p "$st/man/man$sec"
		gzip -9n <"docs/man/$m" >"$st/man/man$sec/$m.gz"
	done
	# Lintian overrides (each with its reason in a comment).
	install -m 0644 "build/package/$pkg.lintian-overrides" "$st/lintian/overrides/$pkg"
done
chmod 0644 dist/stage/*/usr/share/doc/*/changelog.gz dist/stage/*/usr/share/man/*/*.gz
d=dist/stage/chatd/usr/share/doc/chatd
install -m 0644 README.md "$d/README.md"
install -m 0644 docs/operations.md "$d/operations.md"
install -D -m 0755 build/package/get-usersig "$d/examples/get-usersig"
d=dist/stage/chatgw/usr/share/doc/chatgw
install -m 0644 docs/protocol.md "$d/protocol.md"
# nfpm takes a tree's file times from the disk.
find dist/stage -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

OUT=${PACKAGES_OUT:-dist}
mkdir -p "$OUT"
debs=()
for arch in "${ARCHES[@]}"; do
	goarm=""
	case $arch in
	armhf) goarch=arm goarm=6 nfpm_arch=arm6 ;;
	arm64) goarch=arm64 nfpm_arch=arm64 ;;
	amd64) goarch=amd64 nfpm_arch=amd64 ;;
	*) echo "packages: unknown architecture $arch (armhf, arm64, amd64)" >&2; exit 1 ;;
	esac
	rm -f "$OUT"/chatd_*_"$arch".deb "$OUT"/chatgw_*_"$arch".deb
	out=dist/$arch
	rm -rf "$out"
	mkdir -p "$out"
	pkgs=() cmds=()
	for pkg in chatd chatgw; do
		[[ " ${PKG_ARCHES[$pkg]} " == *" $arch "* ]] || continue
		for c in ${PKG_CMDS[$pkg]}; do pkgs+=("./cmd/$c"); cmds+=("$c"); done
	done
	echo "packages: building ${cmds[*]} for $arch (GOARCH=$goarch${goarm:+ GOARM=$goarm})"
	CGO_ENABLED=0 GOOS=linux GOARCH=$goarch GOARM=$goarm \
		"$GO" build -trimpath -ldflags "-s -w -buildid= -X main.version=$VERSION" \
		-o "$out/" "${pkgs[@]}"

	for pkg in chatd chatgw; do
		[[ " ${PKG_ARCHES[$pkg]} " == *" $arch "* ]] || continue
		CHATD_ARCH=$nfpm_arch CHATD_VERSION=$VERSION CHATD_BIN_DIR=$out CHATD_STAGE=dist/stage/$pkg \
			"$GO" tool nfpm package --packager deb --config "build/package/$pkg.yaml" --target "$OUT/" >/dev/null
		deb=$OUT/${pkg}_${VERSION}_${arch}.deb
		[ -f "$deb" ] || { echo "packages: nfpm did not write $deb" >&2; ls "$OUT" >&2; exit 1; }
		debs+=("$deb")
	done
done

echo "packages: done in $(($(date +%s) - start))s"
for d in "${debs[@]}"; do
	printf '%s\t%s bytes (%s), Installed-Size %s KiB\n' "$d" "$(stat -c %s "$d")" "$(du -h "$d" | cut -f1)" \
		"$(dpkg-deb -f "$d" Installed-Size)"
done

#!/usr/bin/env bash
# Check the Debian packages that build/packages.sh wrote to dist/:
#
#  1. Every dist/chatd_*.deb, statically: control fields (Package, Version,
#     Architecture), the files with their modes and owners, the conffile in
#     DEBIAN/conffiles, the maintainer scripts, the units and config equal
#     to the sources, and the binaries built for the right CPU (file(1),
#     and `go version -m` for GOARCH, GOARM=6 on armhf, CGO_ENABLED=0).
#  2. The amd64 package in a real Debian 12 userland: a minbase bookworm
#     root made by mmdebstrap (cached in $CACHE, keyed on its package list),
#     unpacked afresh for every run. The maintainer scripts run there, as
#     on a device, but with no systemd running: install, upgrade, remove,
#     purge, installing again with the host's `dpkg --root`, installing
#     where deb-systemd-helper is missing, and with
#     --force-script-chrootless (DPKG_ROOT) into a root inside the root.
#
# Run as root (chroot). Missing Debian packages (mmdebstrap, file) are
# installed with apt-get. The first run downloads the root file system
# from the Debian mirror; later runs need no network.
#
#   build/check-packages.sh            (after build/packages.sh)
#   CHATD_TEST_REFRESH=1 build/check-packages.sh   (rebuild the cached root)
set -euo pipefail
cd "$(dirname "$0")/.."

GO=${GO:-go}
CACHE=${CHATD_TEST_CACHE:-/var/cache/chatd-test}
SUITE=bookworm
# What apt would install with chatd (its Depends:); minbase has the rest.
INCLUDE=passwd

pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok   $*"; }
bad() { fail=$((fail + 1)); echo "FAIL $*"; }
expect() { # expect DESCRIPTION GOT WANT: ok if GOT is WANT
	if [ "$2" = "$3" ]; then ok "$1: $2"; else bad "$1: got '$2', want '$3'"; fi
}
run_ok() { # run_ok DESCRIPTION LOG COMMAND...: ok if it succeeds, else show LOG
	local what=$1 log=$2
	shift 2
	if "$@" >"$log" 2>&1; then
		ok "$what"
	else
		bad "$what:"
		sed 's/^/     /' "$log"
	fi
}
check() { # check DESCRIPTION COMMAND...: ok if the command succeeds
	local what=$1
	shift
	if "$@" >/dev/null 2>&1; then ok "$what"; else bad "$what"; fi
}

if [ "$(id -u)" != 0 ]; then
	echo "check-packages: run as root (it installs the package into a chroot)" >&2
	exit 1
fi

# --- prerequisites -----------------------------------------------------------
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v file >/dev/null || need+=(file)
command -v dpkg-deb >/dev/null || need+=(dpkg)
if [ ${#need[@]} -gt 0 ]; then
	echo "check-packages: installing ${need[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v "$GO" >/dev/null || { echo "check-packages: go not found (needed for go version -m)" >&2; exit 1; }

shopt -s nullglob
debs=(dist/chatd_*.deb)
shopt -u nullglob
if [ ${#debs[@]} -eq 0 ]; then
	echo "check-packages: no dist/chatd_*.deb; run build/packages.sh first" >&2
	exit 1
fi

work=$(mktemp -d /var/tmp/chatd-check.XXXXXX)
cleanup() {
	# Nothing is mounted in the root; a plain removal is enough.
	rm -rf "$work"
}
trap cleanup EXIT
start=$(date +%s)

# --- 1. static checks ----------------------------------------------------------
# Expected files: mode, owner, path (as dpkg-deb --contents prints them).
expected_files() {
	cat <<-EOF
		-rwxr-xr-x root/root ./usr/bin/chatd
		-rwxr-xr-x root/root ./usr/bin/chatctl
		-rwxr-xr-x root/root ./usr/bin/chatgw
		-rw-r--r-- root/root ./lib/systemd/system/chatd.service
		-rw-r--r-- root/root ./lib/systemd/system/chatd.socket
		-rw-r----- root/root ./etc/chatd/chatd.toml
		-rwxr-xr-x root/root ./usr/share/doc/chatd/examples/get-usersig
	EOF
	[ ! -f README.md ] || echo "-rw-r--r-- root/root ./usr/share/doc/chatd/README.md"
	[ ! -f docs/operations.md ] || echo "-rw-r--r-- root/root ./usr/share/doc/chatd/operations.md"
}

for deb in "${debs[@]}"; do
	name=${deb##*/}
	arch=${name##*_}
	arch=${arch%.deb}
	echo "== $deb"
	x=$work/static-$arch
	mkdir -p "$x"
	field() { dpkg-deb --field "$deb" "$1"; }
	expect "$arch: Package" "$(field Package)" chatd
	expect "$arch: Architecture (as in the file name)" "$(field Architecture)" "$arch"
	ver=$(field Version)
	expect "$arch: file name from Version $ver" "$name" "chatd_${ver}_${arch}.deb"
	check "$arch: Depends: passwd" grep -qx 'passwd' <(field Depends | tr -s ', ' '\n')
	dpkg-deb --info "$deb" >"$x/info"
	for s in postinst prerm postrm; do
		check "$arch: maintainer script $s, executable" grep -Eq "^ +[0-9]+ bytes, +[0-9]+ lines +\* +$s " "$x/info"
	done
	conffiles=$(dpkg-deb --info "$deb" conffiles 2>/dev/null || true)
	expect "$arch: DEBIAN/conffiles" "$conffiles" /etc/chatd/chatd.toml

	dpkg-deb --contents "$deb" | awk '$1 !~ /^d/ { print $1, $2, $6 }' | sort >"$x/contents"
	expected_files | sort >"$x/expected"
	if diff -u "$x/expected" "$x/contents" >"$x/diff"; then
		ok "$arch: files, modes and owners as expected ($(wc -l <"$x/expected") files, nothing else)"
	else
		bad "$arch: files differ (- expected, + in the package):"
		tail -n +3 "$x/diff" | grep -E '^[-+]' | sed 's/^/     /'
	fi

	dpkg-deb --extract "$deb" "$x/root"
	for pair in build/systemd/chatd.service:lib/systemd/system/chatd.service \
		build/systemd/chatd.socket:lib/systemd/system/chatd.socket \
		build/package/chatd.toml:etc/chatd/chatd.toml \
		build/package/get-usersig:usr/share/doc/chatd/examples/get-usersig; do
		check "$arch: /${pair#*:} is ${pair%%:*}" cmp "${pair%%:*}" "$x/root/${pair#*:}"
	done

	case $arch in
	amd64) want_file='ELF 64-bit LSB executable, x86-64' goarch=amd64 ;;
	arm64) want_file='ELF 64-bit LSB executable, ARM aarch64' goarch=arm64 ;;
	armhf) want_file='ELF 32-bit LSB executable, ARM, EABI5' goarch=arm ;;
	*) want_file='?' goarch='?' ;;
	esac
	for b in chatd chatctl chatgw; do
		bin=$x/root/usr/bin/$b
		desc=$(file -b "$bin")
		if [[ $desc == "$want_file"* && $desc == *"statically linked"* ]]; then
			ok "$arch: $b is $want_file, static"
		else
			bad "$arch: $b is '$desc'"
		fi
		m=$("$GO" version -m "$bin")
		want="GOARCH=$goarch"
		[ "$arch" = armhf ] && want="$want GOARM=6"
		got=$(awk '$1 == "build" && $2 ~ /^(GOARCH|GOARM|CGO_ENABLED)=/ { print $2 }' <<<"$m" | sort | paste -sd' ')
		if grep -qw "GOARCH=$goarch" <<<"$got" && grep -qw CGO_ENABLED=0 <<<"$got" &&
			{ [ "$arch" != armhf ] || grep -qw GOARM=6 <<<"$got"; }; then
			ok "$arch: $b go version -m: $got"
		else
			bad "$arch: $b go version -m: $got (want $want CGO_ENABLED=0)"
		fi
	done
done

# --- 2. install into a Debian 12 root ------------------------------------------
amd64_deb=""
for deb in "${debs[@]}"; do
	case $deb in *_amd64.deb) amd64_deb=$deb ;; esac
done
if [ -z "$amd64_deb" ]; then
	bad "no amd64 package in dist/ to install"
else
	echo "== installing $amd64_deb into a $SUITE minbase root"
	key=$(printf '%s\n' "$SUITE" minbase "$INCLUDE" | sha256sum | cut -c1-12)
	tarball=$CACHE/$SUITE-minbase-$key.tar
	mkdir -p "$CACHE"
	if [ -n "${CHATD_TEST_REFRESH:-}" ] || [ ! -s "$tarball" ]; then
		echo "check-packages: building $tarball with mmdebstrap (downloads from the Debian mirror)"
		t0=$(date +%s)
		mmdebstrap --quiet --mode=root --format=tar --variant=minbase --include="$INCLUDE" \
			"$SUITE" "$tarball.tmp" >"$work/mmdebstrap.log" 2>&1 || {
			cat "$work/mmdebstrap.log" >&2
			rm -rf "$tarball.tmp"
			echo "check-packages: mmdebstrap failed" >&2
			exit 1
		}
		mv "$tarball.tmp" "$tarball"
		# Other keys are from an older package list.
		find "$CACHE" -maxdepth 1 -name "$SUITE-minbase-*.tar" ! -name "${tarball##*/}" -delete
		echo "check-packages: root built in $(($(date +%s) - t0))s ($(du -h "$tarball" | cut -f1))"
	fi
	R=$work/root
	mkdir "$R"
	tar -C "$R" -xf "$tarball"
	# The root's own resolv.conf etc. are irrelevant: nothing in it needs
	# the network.
	cp "$amd64_deb" "$R/tmp/chatd.deb"
	version=$(dpkg-deb --field "$amd64_deb" Version)
	in_root() { chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }
	# shellcheck disable=SC2016 # a dpkg-query format, not a shell expression
	status() { in_root dpkg-query -W -f='${db:Status-Abbrev}' chatd 2>/dev/null | tr -d ' ' || true; }
	# Only the service is enabled; socket activation is opt-in.
	wants=(etc/systemd/system/multi-user.target.wants/chatd.service)

	check "no systemd running in the root (no /run/systemd/system)" test ! -d "$R/run/systemd/system"
	check "deb-systemd-helper present (init-system-helpers is Essential)" test -x "$R/usr/bin/deb-systemd-helper"

	# -- install
	run_ok "dpkg -i chatd.deb (in the chroot)" "$work/install.log" in_root dpkg -i /tmp/chatd.deb
	expect "dpkg status of chatd $version" "$(status)" ii
	if grep -Eiq 'warning|error' "$work/install.log"; then
		bad "dpkg -i printed warnings:"
		sed 's/^/     /' "$work/install.log"
	else
		ok "dpkg -i printed no warning"
	fi
	grp=$(in_root getent group chatd || true)
	pw=$(in_root getent passwd chatd || true)
	check "group chatd exists: $grp" test -n "$grp"
	IFS=: read -r _ _ uid gid _ home shell <<<"$pw"
	if [ -n "$pw" ] && [ "$uid" -lt 1000 ] && [ "$gid" = "$(cut -d: -f3 <<<"$grp")" ] &&
		[ "$home" = /var/lib/chatd ] && [ "$shell" = /usr/sbin/nologin ]; then
		ok "user chatd: $pw (system uid, group chatd, home /var/lib/chatd, nologin)"
	else
		bad "user chatd: '$pw'"
	fi
	check "no home directory created (systemd's StateDirectory makes it)" test ! -e "$R/var/lib/chatd"
	perm=$(in_root stat -c '%A %U:%G' /etc/chatd/chatd.toml 2>/dev/null || echo missing)
	expect "/etc/chatd/chatd.toml" "$perm" "-rw-r----- root:chatd"
	so=$(in_root dpkg-statoverride --list /etc/chatd/chatd.toml || true)
	expect "dpkg-statoverride" "$so" "root chatd 640 /etc/chatd/chatd.toml"
	for u in chatd.service chatd.socket; do
		check "/lib/systemd/system/$u installed" test -f "$R/lib/systemd/system/$u"
	done
	for w in "${wants[@]}"; do
		t=$(readlink "$R/$w" || true)
		expect "enabled: /$w links to" "$t" "/lib/systemd/system/${w##*/}"
	done
	check "nothing started (no /run/chatd)" test ! -e "$R/run/chatd"

	for b in chatd chatctl chatgw; do
		expect "$b --version" "$(in_root /usr/bin/$b --version 2>&1)" "$b $version"
	done
	rc=0
	out=$(in_root chroot --userspec=chatd:chatd / /usr/bin/chatd --check-config 2>&1) || rc=$?
	if [ "$rc" = 2 ] && grep -q 'error: sdkappid: not set' <<<"$out" && ! grep -q socket_group <<<"$out"; then
		ok "chatd --check-config as user chatd: exit 2, 'sdkappid: not set' (config readable, group chatd found)"
	else
		bad "chatd --check-config as user chatd: exit $rc:"
		sed 's/^/     /' <<<"$out"
	fi
	rc=0
	out=$(in_root chroot --userspec=chatd:chatd / /usr/bin/chatd --config /etc/chatd/chatd.toml --configured 2>&1) || rc=$?
	if [ "$rc" = 1 ] && ! grep -qi 'flag provided but not defined' <<<"$out"; then
		ok "chatd --configured (the unit's ExecCondition): exit 1, unit would be skipped: $(head -1 <<<"$out")"
	else
		bad "chatd --configured: exit $rc: $out"
	fi

	# -- upgrade (same version again: postinst configure <old-version>),
	# with an administrator's change to the conffile, which must survive.
	sed -i 's/^#sdkappid = 1400000001$/sdkappid = 1400000001/' "$R/etc/chatd/chatd.toml"
	mkdir -p "$R/var/lib/chatd" && echo state >"$R/var/lib/chatd/state.db"
	run_ok "dpkg -i again (upgrade path: postinst configure $version)" "$work/upgrade.log" \
		in_root dpkg -i /tmp/chatd.deb
	check "the administrator's change to chatd.toml is kept" grep -q '^sdkappid = 1400000001' "$R/etc/chatd/chatd.toml"
	perm=$(in_root stat -c '%A %U:%G' /etc/chatd/chatd.toml 2>/dev/null || echo missing)
	expect "after the upgrade: chatd.toml" "$perm" "-rw-r----- root:chatd"
	rc=0
	out=$(in_root chroot --userspec=chatd:chatd / /usr/bin/chatd --check-config 2>&1) || rc=$?
	if grep -q 'sdkappid      1400000001' <<<"$out"; then
		ok "chatd --check-config reads the changed config as user chatd"
	else
		bad "chatd --check-config after the change: exit $rc: $out"
	fi

	# -- remove
	uid_before=$(in_root id -u chatd || true)
	run_ok "dpkg -r chatd" "$work/remove.log" in_root dpkg -r chatd
	expect "dpkg status after remove (config files kept)" "$(status)" rc
	check "binaries removed" test ! -e "$R/usr/bin/chatd"
	check "units removed" test ! -e "$R/lib/systemd/system/chatd.service"
	check "conffile kept after remove" test -f "$R/etc/chatd/chatd.toml"
	check "state kept after remove" test -f "$R/var/lib/chatd/state.db"
	check "user chatd kept" in_root getent passwd chatd

	# -- purge
	run_ok "dpkg -P chatd" "$work/purge.log" in_root dpkg -P chatd
	check "dpkg status after purge: not installed" test -z "$(status)" -o "$(status)" = un
	check "/etc/chatd removed by purge" test ! -e "$R/etc/chatd"
	check "/var/lib/chatd removed by purge" test ! -e "$R/var/lib/chatd"
	check "statoverride removed by purge" test -z "$(in_root dpkg-statoverride --list /etc/chatd/chatd.toml || true)"
	for w in "${wants[@]}"; do check "purge disabled: /$w gone" test ! -L "$R/$w"; done
	check "no mask left: /etc/systemd/system/chatd.{service,socket}" \
		test ! -e "$R/etc/systemd/system/chatd.service" -a ! -e "$R/etc/systemd/system/chatd.socket"
	check "user chatd kept after purge (Debian policy)" in_root getent passwd chatd

	# -- install with the host's dpkg --root (dpkg chroots for the scripts)
	run_ok "dpkg --root=ROOT -i (host dpkg)" "$work/root-install.log" dpkg --root="$R" -i "$amd64_deb"
	expect "the existing user chatd is reused: uid" "$(in_root id -u chatd)" "$uid_before"
	for w in "${wants[@]}"; do check "enabled again: /$w" test -L "$R/$w"; done
	run_ok "dpkg --root=ROOT -P" "$work/root-purge.log" dpkg --root="$R" -P chatd

	# -- no deb-systemd-helper, no systemctl: enabling is skipped, nothing fails
	mv "$R/usr/bin/deb-systemd-helper" "$R/usr/bin/deb-systemd-helper.hidden"
	run_ok "install without deb-systemd-helper or systemctl" "$work/nodsh.log" in_root dpkg -i /tmp/chatd.deb
	for w in "${wants[@]}"; do check "  ...leaves it disabled: no /$w" test ! -L "$R/$w"; done
	run_ok "  ...and purge" "$work/nodsh-purge.log" in_root dpkg -P chatd
	mv "$R/usr/bin/deb-systemd-helper.hidden" "$R/usr/bin/deb-systemd-helper"

	# -- dpkg --force-script-chrootless: the scripts run outside the target
	# with DPKG_ROOT set. The outer system is the chroot (not this host),
	# with a second copy of the root inside it as the target.
	T=$R/target
	mkdir "$T"
	tar -C "$T" -xf "$tarball"
	cp "$R/etc/passwd" "$work/outer-passwd"
	run_ok "dpkg --root=TARGET --force-script-chrootless -i" "$work/chrootless.log" \
		in_root dpkg --root=/target --force-script-chrootless -i /tmp/chatd.deb
	check "  ...created user chatd in the target" grep -q '^chatd:' "$T/etc/passwd"
	check "  ...not in the system running the scripts" cmp -s "$R/etc/passwd" "$work/outer-passwd"
	expect "  ...chatd.toml group (gid)" "$(stat -c %g "$T/etc/chatd/chatd.toml")" \
		"$(awk -F: '$1 == "chatd" { print $3 }' "$T/etc/group")"
	for w in "${wants[@]}"; do check "  ...enabled in the target: /$w" test -L "$T/$w"; done
	run_ok "dpkg --root=TARGET --force-script-chrootless -P" "$work/chrootless-purge.log" \
		in_root dpkg --root=/target --force-script-chrootless -P chatd
	check "  ...purged /etc/chatd and the statoverride" test ! -e "$T/etc/chatd" -a ! -s "$T/var/lib/dpkg/statoverride"
fi

echo "== check-packages: $pass passed, $fail failed ($(($(date +%s) - start))s; ${#debs[@]} packages: ${debs[*]##*/})"
[ "$fail" -eq 0 ]

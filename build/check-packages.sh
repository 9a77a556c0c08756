#!/usr/bin/env bash
# Check the Debian packages that build/packages.sh wrote to dist/:
#
#  1. Every dist/chatd_*.deb and dist/chatgw_*.deb, statically: control
#     fields (Package, Version, Architecture), the files with their modes
#     and owners, the conffile in DEBIAN/conffiles, the maintainer scripts,
#     the units and config equal to the sources, and the binaries built for
#     the right CPU (file(1), and `go version -m` for GOARCH, GOARM=6 on
#     armhf, CGO_ENABLED=0); and lintian: no error, no warning.
#  2. The amd64 packages in a real Debian 12 userland: a minbase bookworm
#     root made by mmdebstrap (cached in $CACHE, keyed on its package list),
#     unpacked afresh for every run. The maintainer scripts run there, as
#     on a device, but with no systemd running: install, upgrade, remove,
#     purge, installing again with the host's `dpkg --root`, installing
#     where deb-systemd-helper is missing, and with
#     --force-script-chrootless (DPKG_ROOT) into a root inside the root.
#  3. An upgrade with state: version N of both packages installed, chatgw
#     and chatd configured (edits to both conffiles) and run in the root as
#     their users, chatd logged in; then version N+1 (built here, amd64)
#     installed over them: the edits survive, chatd resumes the same
#     session at the same gateway. remove keeps the state, purge removes it.
#
# Run as root (chroot). Missing Debian packages (mmdebstrap, file, lintian,
# curl, jq) are installed with apt-get. The first run downloads the root file system
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
command -v lintian >/dev/null || need+=(lintian)
command -v curl >/dev/null || need+=(curl)
command -v jq >/dev/null || need+=(jq)
command -v dpkg-deb >/dev/null || need+=(dpkg)
if [ ${#need[@]} -gt 0 ]; then
	echo "check-packages: installing ${need[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v "$GO" >/dev/null || { echo "check-packages: go not found (needed for go version -m)" >&2; exit 1; }

shopt -s nullglob
debs=(dist/chatd_*.deb dist/chatgw_*.deb)
shopt -u nullglob
if [ ${#debs[@]} -eq 0 ]; then
	echo "check-packages: no dist/chatd_*.deb; run build/packages.sh first" >&2
	exit 1
fi

work=$(mktemp -d /var/tmp/chatd-check.XXXXXX)
mounts=()
procs=()
cleanup() {
	local p m
	for p in "${procs[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${procs[@]}"; do wait "$p" 2>/dev/null || true; done
	for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
	# Nothing is mounted in the root any more: a plain removal is enough.
	if [ -n "$(findmnt -rn -o TARGET | grep -F "$work" || true)" ]; then
		echo "check-packages: something is still mounted under $work; not removing it" >&2
		return
	fi
	rm -rf "$work"
}
trap cleanup EXIT
start=$(date +%s)

# --- 1. static checks ----------------------------------------------------------
# Expected files of package $1: mode, owner, path (as dpkg-deb --contents
# prints them).
expected_files() {
	case $1 in
	chatd)
		cat <<-EOF
			-rwxr-xr-x root/root ./usr/bin/chatd
			-rwxr-xr-x root/root ./usr/bin/chatctl
			-rw-r--r-- root/root ./lib/systemd/system/chatd.service
			-rw-r--r-- root/root ./lib/systemd/system/chatd.socket
			-rw-r--r-- root/root ./etc/chatd/chatd.toml
			-rwxr-xr-x root/root ./usr/share/doc/chatd/examples/get-usersig
			-rw-r--r-- root/root ./usr/share/doc/chatd/README.md
			-rw-r--r-- root/root ./usr/share/doc/chatd/operations.md
			-rw-r--r-- root/root ./usr/share/doc/chatd/copyright
			-rw-r--r-- root/root ./usr/share/doc/chatd/changelog.gz
			-rw-r--r-- root/root ./usr/share/lintian/overrides/chatd
			-rw-r--r-- root/root ./usr/share/man/man1/chatctl.1.gz
			-rw-r--r-- root/root ./usr/share/man/man5/chatd.toml.5.gz
			-rw-r--r-- root/root ./usr/share/man/man8/chatd.8.gz
		EOF
		;;
	chatgw)
		cat <<-EOF
			-rwxr-xr-x root/root ./usr/bin/chatgw
			-rw-r--r-- root/root ./lib/systemd/system/chatgw.service
			-rw-r--r-- root/root ./etc/chatgw/chatgw.toml
			-rw-r--r-- root/root ./usr/share/doc/chatgw/protocol.md
			-rw-r--r-- root/root ./usr/share/doc/chatgw/copyright
			-rw-r--r-- root/root ./usr/share/doc/chatgw/changelog.gz
			-rw-r--r-- root/root ./usr/share/lintian/overrides/chatgw
			-rw-r--r-- root/root ./usr/share/man/man5/chatgw.toml.5.gz
			-rw-r--r-- root/root ./usr/share/man/man8/chatgw.8.gz
		EOF
		;;
	esac
}
# Files of package $1 that are copies of sources: source:installed.
copies() {
	case $1 in
	chatd)
		echo build/systemd/chatd.service:lib/systemd/system/chatd.service \
			build/systemd/chatd.socket:lib/systemd/system/chatd.socket \
			build/package/chatd.toml:etc/chatd/chatd.toml \
			build/package/get-usersig:usr/share/doc/chatd/examples/get-usersig \
			build/package/chatd.lintian-overrides:usr/share/lintian/overrides/chatd
		;;
	chatgw)
		echo build/systemd/chatgw.service:lib/systemd/system/chatgw.service \
			build/package/chatgw.toml:etc/chatgw/chatgw.toml \
			build/package/chatgw.lintian-overrides:usr/share/lintian/overrides/chatgw
		;;
	esac
}
declare -A BINS=([chatd]="chatd chatctl" [chatgw]="chatgw")

for deb in "${debs[@]}"; do
	name=${deb##*/}
	arch=${name##*_}
	arch=${arch%.deb}
	echo "== $deb"
	x=$work/static-${name%.deb}
	mkdir -p "$x"
	pkg=${name%%_*}
	field() { dpkg-deb --field "$deb" "$1"; }
	expect "$arch: Package" "$(field Package)" "$pkg"
	expect "$arch: Architecture (as in the file name)" "$(field Architecture)" "$arch"
	ver=$(field Version)
	expect "$arch: file name from Version $ver" "$name" "${pkg}_${ver}_${arch}.deb"
	check "$arch: Depends: passwd" grep -qx 'passwd' <(field Depends | tr -s ', ' '\n')
	dpkg-deb --info "$deb" >"$x/info"
	for s in postinst prerm postrm; do
		check "$arch: maintainer script $s, executable" grep -Eq "^ +[0-9]+ bytes, +[0-9]+ lines +\* +$s " "$x/info"
	done
	conffiles=$(dpkg-deb --info "$deb" conffiles 2>/dev/null || true)
	expect "$arch: DEBIAN/conffiles" "$conffiles" "/etc/$pkg/$pkg.toml"

	dpkg-deb --contents "$deb" | awk '$1 !~ /^d/ { print $1, $2, $6 }' | sort >"$x/contents"
	expected_files "$pkg" | sort >"$x/expected"
	if diff -u "$x/expected" "$x/contents" >"$x/diff"; then
		ok "$arch: files, modes and owners as expected ($(wc -l <"$x/expected") files, nothing else)"
	else
		bad "$arch: files differ (- expected, + in the package):"
		tail -n +3 "$x/diff" | grep -E '^[-+]' | sed 's/^/     /'
	fi

	dpkg-deb --extract "$deb" "$x/root"
	for pair in $(copies "$pkg"); do
		check "$arch: /${pair#*:} is ${pair%%:*}" cmp "${pair%%:*}" "$x/root/${pair#*:}"
	done

	case $arch in
	amd64) want_file='ELF 64-bit LSB executable, x86-64' goarch=amd64 ;;
	arm64) want_file='ELF 64-bit LSB executable, ARM aarch64' goarch=arm64 ;;
	armhf) want_file='ELF 32-bit LSB executable, ARM, EABI5' goarch=arm ;;
	*) want_file='?' goarch='?' ;;
	esac
	for m in $(cd "$x/root/usr/share/man" && ls */*.gz); do
		check "$arch: man page ${m#*/} is docs/man/${m##*/}" cmp <(zcat "$x/root/usr/share/man/$m") "docs/man/$(basename "$m" .gz)"
	done
	lint=$(lintian --tag-display-limit 0 "$deb" 2>&1 | grep -v '^running with root privileges' || true)
	if [ -z "$(grep -E '^[EW]: ' <<<"$lint")" ]; then
		ok "$arch: lintian: no errors, no warnings"
	else
		bad "$arch: lintian:"
		sed 's/^/     /' <<<"$lint"
	fi
	for b in ${BINS[$pkg]}; do
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
	case $deb in */chatd_*_amd64.deb | chatd_*_amd64.deb) amd64_deb=$deb ;; esac
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

	for b in chatd chatctl; do
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

	# -- chatgw: install, the same checks, remove, purge
	gw_deb=""
	for deb in "${debs[@]}"; do
		case $deb in */chatgw_*_amd64.deb | chatgw_*_amd64.deb) gw_deb=$deb ;; esac
	done
	if [ -z "$gw_deb" ]; then
		bad "no chatgw amd64 package in dist/ to install"
	else
		echo "== installing $gw_deb into the root"
		cp "$gw_deb" "$R/tmp/chatgw.deb"
		# shellcheck disable=SC2016
		gw_status() { in_root dpkg-query -W -f='${db:Status-Abbrev}' chatgw 2>/dev/null | tr -d ' ' || true; }
		gw_wants=etc/systemd/system/multi-user.target.wants/chatgw.service
		run_ok "dpkg -i chatgw.deb (in the chroot)" "$work/gw-install.log" in_root dpkg -i /tmp/chatgw.deb
		expect "dpkg status of chatgw" "$(gw_status)" ii
		check "dpkg -i chatgw printed no warning" test -z "$(grep -Ei 'warning|error' "$work/gw-install.log")"
		pw=$(in_root getent passwd chatgw || true)
		IFS=: read -r _ _ uid gid _ home shell <<<"$pw"
		if [ -n "$pw" ] && [ "$uid" -lt 1000 ] && [ "$gid" = "$(in_root getent group chatgw | cut -d: -f3)" ] &&
			[ "$home" = /var/lib/chatgw ] && [ "$shell" = /usr/sbin/nologin ]; then
			ok "user chatgw: $pw (system uid, group chatgw, home /var/lib/chatgw, nologin)"
		else
			bad "user chatgw: '$pw'"
		fi
		expect "/etc/chatgw/chatgw.toml" "$(in_root stat -c '%A %U:%G' /etc/chatgw/chatgw.toml 2>/dev/null || echo missing)" "-rw-r----- root:chatgw"
		expect "dpkg-statoverride" "$(in_root dpkg-statoverride --list /etc/chatgw/chatgw.toml || true)" "root chatgw 640 /etc/chatgw/chatgw.toml"
		expect "enabled: /$gw_wants links to" "$(readlink "$R/$gw_wants" || true)" /lib/systemd/system/chatgw.service
		expect "chatgw --version" "$(in_root /usr/bin/chatgw --version 2>&1)" "chatgw $version"
		rc=0
		out=$(in_root chroot --userspec=chatgw:chatgw / /usr/bin/chatgw serve --config /etc/chatgw/chatgw.toml --configured 2>&1) || rc=$?
		if [ "$rc" = 1 ] && grep -q 'does not set sdkappid, embedded_broker, broker or nats yet' <<<"$out"; then
			ok "chatgw serve --configured as user chatgw (the unit's ExecCondition): exit 1: $out"
		else
			bad "chatgw serve --configured: exit $rc: $out"
		fi
		run_ok "dpkg -r chatgw" "$work/gw-remove.log" in_root dpkg -r chatgw
		expect "dpkg status after remove (config files kept)" "$(gw_status)" rc
		check "conffile kept after remove" test -f "$R/etc/chatgw/chatgw.toml"
		run_ok "dpkg -P chatgw" "$work/gw-purge.log" in_root dpkg -P chatgw
		check "/etc/chatgw removed by purge" test ! -e "$R/etc/chatgw"
		check "statoverride removed by purge" test -z "$(in_root dpkg-statoverride --list /etc/chatgw/chatgw.toml || true)"
		check "purge disabled: /$gw_wants gone" test ! -L "$R/$gw_wants"
		check "no mask left: /etc/systemd/system/chatgw.service" test ! -e "$R/etc/systemd/system/chatgw.service"
	fi

	# --- 3. upgrade N -> N+1 with state ----------------------------------------
	next_version="$version+1"
	echo "== upgrade: chatd and chatgw $version, logged in, then $next_version over them"
	if ! PACKAGES_OUT="$work/next" ARCHES=amd64 build/packages.sh "$next_version" >"$work/next.log" 2>&1; then
		bad "building version $next_version:"
		sed 's/^/     /' "$work/next.log"
	elif [ -z "$gw_deb" ]; then
		bad "upgrade: no chatgw package"
	else
		mkdir -p "$R/tmp/next"
		cp "$work/next/chatd_${next_version}_amd64.deb" "$work/next/chatgw_${next_version}_amd64.deb" "$R/tmp/next/"
		# chatd reads its peers' credentials in /proc; the daemons need /dev/null.
		mount -t proc proc "$R/proc" && mounts=("$R/proc" "${mounts[@]}")
		[ -c "$R/dev/null" ] || { mount --bind /dev "$R/dev" && mounts=("$R/dev" "${mounts[@]}"); }
		run_ok "install chatd and chatgw $version" "$work/n-install.log" in_root dpkg -i /tmp/chatd.deb /tmp/chatgw.deb
		port=""
		for _ in $(seq 1 50); do
			p=$((20000 + RANDOM % 20000))
			if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then port=$p; break; fi
		done
		# The administrator's edits to both conffiles.
		sed -i -e 's/^#sdkappid = 1400000001$/sdkappid = 1400000001/' \
			-e "s|^#embedded_broker = .*|embedded_broker = \"127.0.0.1:$port\"|" "$R/etc/chatgw/chatgw.toml"
		echo "# edited by the administrator (upgrade test)" >>"$R/etc/chatgw/chatgw.toml"
		sed -i -e 's/^#sdkappid = 1400000001$/sdkappid = 1400000001/' -e 's/^#user_id = .*/user_id = "dev-42"/' \
			-e "s|^#broker = \"tcp://127.0.0.1:1883\"\$|broker = \"tcp://127.0.0.1:$port\"|" \
			-e 's|^#usersig_file = .*|usersig_file = "/etc/chatd/usersig"|' "$R/etc/chatd/chatd.toml"
		echo "# edited by the administrator (upgrade test)" >>"$R/etc/chatd/chatd.toml"
		cp "$R/etc/chatd/chatd.toml" "$work/chatd.toml.edited"
		cp "$R/etc/chatgw/chatgw.toml" "$work/chatgw.toml.edited"
		head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$R/etc/chatgw/key"
		in_root chown root:chatgw /etc/chatgw/key
		chmod 0640 "$R/etc/chatgw/key"
		in_root chatgw usersig gen --sdkappid 1400000001 --key-file /etc/chatgw/key --user dev-42 --expire 86400 >"$R/etc/chatd/usersig"
		in_root chown root:chatd /etc/chatd/usersig
		chmod 0640 "$R/etc/chatd/usersig"
		# What systemd would make: the units' State- and RuntimeDirectory.
		dirs() {
			install -d -m 0700 -o "$(in_root id -u chatd)" -g "$(in_root id -g chatd)" "$R/var/lib/chatd"
			install -d -m 0755 -o "$(in_root id -u chatd)" -g "$(in_root id -g chatd)" "$R/run/chatd"
			install -d -m 0700 -o "$(in_root id -u chatgw)" -g "$(in_root id -g chatgw)" "$R/var/lib/chatgw"
			install -d -m 0755 -o "$(in_root id -u chatgw)" -g "$(in_root id -g chatgw)" "$R/run/chatgw"
		}
		gw_pid="" d_pid=""
		# start_both: chatgw and chatd as their users, with the units' command lines.
		start_both() {
			dirs
			chroot --userspec=chatgw:chatgw "$R" /usr/bin/env -i PATH=/usr/bin:/bin \
				/usr/bin/chatgw serve --config /etc/chatgw/chatgw.toml >>"$work/chatgw.log" 2>&1 &
			gw_pid=$!
			procs+=("$gw_pid")
			local _
			for _ in $(seq 1 100); do
				curl -sf --unix-socket "$R/run/chatgw/admin.sock" http://chatgw/healthz >/dev/null 2>&1 && break
				sleep 0.1
			done
			chroot --userspec=chatd:chatd "$R" /usr/bin/env -i PATH=/usr/bin:/bin \
				/usr/bin/chatd --config /etc/chatd/chatd.toml >>"$work/chatd.log" 2>&1 &
			d_pid=$!
			procs+=("$d_pid")
		}
		stop_both() {
			kill -TERM "$d_pid" "$gw_pid" 2>/dev/null || true
			local rc1=0 rc2=0
			wait "$d_pid" || rc1=$?
			wait "$gw_pid" || rc2=$?
			expect "$1: chatd and chatgw exit 0 on SIGTERM" "$rc1 $rc2" "0 0"
		}
		gw_view() {
			curl -sf --unix-socket "$R/run/chatgw/admin.sock" http://chatgw/v1/users/dev-42 |
				jq -r '.state + " " + ([.sessions[] | select(.online) | .id] | join(","))'
		}
		start_both
		run_ok "version $version: chatd logs in (chatctl wait --status LOGINED)" "$work/n-wait.log" \
			in_root chatctl wait --status LOGINED --timeout 60s
		s1=$(in_root chatctl status --json | jq -r .session)
		check "version $version: a session: $s1" test -n "$s1" -a "$s1" != null
		expect "version $version: the gateway has dev-42 online with it" "$(gw_view)" "online $s1"
		stop_both "version $version"

		run_ok "dpkg -i chatd and chatgw $next_version (the upgrade)" "$work/upgrade-next.log" \
			in_root dpkg -i "/tmp/next/chatd_${next_version}_amd64.deb" "/tmp/next/chatgw_${next_version}_amd64.deb"
		check "  ...without a conffile prompt or warning" test -z "$(grep -Ei 'warning|error|conffile' "$work/upgrade-next.log")"
		# shellcheck disable=SC2016
		expect "  ...dpkg: both at $next_version" \
			"$(in_root dpkg-query -W -f='${Package}=${Version} ${db:Status-Abbrev}\n' chatd chatgw | tr -s ' ' | sed 's/ $//' | paste -sd' ')" \
			"chatd=$next_version ii chatgw=$next_version ii"
		check "  ...the edits to chatd.toml are kept" cmp "$work/chatd.toml.edited" "$R/etc/chatd/chatd.toml"
		check "  ...the edits to chatgw.toml are kept" cmp "$work/chatgw.toml.edited" "$R/etc/chatgw/chatgw.toml"
		expect "  ...chatd.toml still" "$(in_root stat -c '%A %U:%G' /etc/chatd/chatd.toml)" "-rw-r----- root:chatd"
		expect "  ...chatgw.toml still" "$(in_root stat -c '%A %U:%G' /etc/chatgw/chatgw.toml)" "-rw-r----- root:chatgw"
		check "  ...no .dpkg-dist or .dpkg-new files" test -z "$(find "$R/etc/chatd" "$R/etc/chatgw" -name '*.dpkg-*')"
		start_both
		run_ok "version $next_version: chatd is LOGINED again" "$work/n1-wait.log" \
			in_root chatctl wait --status LOGINED --timeout 60s
		s2=$(in_root chatctl status --json | jq -r .session)
		expect "version $next_version: the same session (resumed from state.db)" "$s2" "$s1"
		expect "version $next_version: the gateway still knows it, one session online" "$(gw_view)" "online $s1"
		expect "version $next_version: chatd --version" "$(in_root chatd --version)" "chatd $next_version"
		stop_both "version $next_version"

		run_ok "dpkg -r chatd chatgw" "$work/n1-remove.log" in_root dpkg -r chatd chatgw
		check "remove keeps chatd's state (/var/lib/chatd/state.db)" test -s "$R/var/lib/chatd/state.db"
		check "remove keeps chatgw's state (/var/lib/chatgw/state.db)" test -s "$R/var/lib/chatgw/state.db"
		check "remove keeps the edited chatd.toml" cmp "$work/chatd.toml.edited" "$R/etc/chatd/chatd.toml"
		check "remove keeps the edited chatgw.toml" cmp "$work/chatgw.toml.edited" "$R/etc/chatgw/chatgw.toml"
		run_ok "dpkg -P chatd chatgw" "$work/n1-purge.log" in_root dpkg -P chatd chatgw
		check "purge removes /var/lib/chatd" test ! -e "$R/var/lib/chatd"
		check "purge removes /var/lib/chatgw" test ! -e "$R/var/lib/chatgw"
		check "purge removes chatgw.toml" test ! -e "$R/etc/chatgw/chatgw.toml"
		check "purge keeps the key the administrator made (/etc/chatgw/key)" test -s "$R/etc/chatgw/key"
		if [ "$fail" -ne 0 ]; then
			echo "     chatd.log:" && sed 's/^/     /' "$work/chatd.log" | tail -n 30
			echo "     chatgw.log:" && sed 's/^/     /' "$work/chatgw.log" | tail -n 30
		fi
	fi
fi

echo "== check-packages: $pass passed, $fail failed ($(($(date +%s) - start))s; ${#debs[@]} packages: ${debs[*]##*/})"
[ "$fail" -eq 0 ]

#!/usr/bin/env bash
# make test-board: boot a whole ARM board (Debian 12 with systemd) in QEMU,
# install the chatd and chatgw packages on it, and check chatd logs in to a
# chatgw running on this host, through a broker outage, a step of the
# board's clock and a reboot; and that the packaged chatgw.service runs.
#
#   build/board/test-board.sh [ARCH]      ARCH: arm64 (default) or armhf (or $ARCH)
#   build/board/test-board.sh --rootfs-only [ARCH]   only build (or find) the cached root fs
#
# Environment:
#   BOARD_DEBS="FILE..." the chatd and chatgw .debs to test (default: build them
#                       with build/packages.sh for ARCH)
#   BOARD_CLOCK_STEP=S  the clock scenario, a third boot: it starts with the clock S
#                       seconds behind (default 31536000, a year), NTP off; chatd
#                       logs in, then the clock is stepped forward with date -s
#                       and chatgw restarted. 0 leaves it out (reported as SKIP).
#   BOARD_CACHE=DIR     where root file systems are cached (default /var/cache/chatd-board)
#   BOARD_TIMEOUT=SECS  hard limit on the QEMU run (default 1200); the root fs build
#                       has its own (BOARD_ROOTFS_TIMEOUT, default 2400)
#   BOARD_KEEP=1        keep the run's directory (logs, image) after success too
#
# Steps (timings on a 2-core host, software emulation, in docs/benchmarks.md):
# 1. The root file system: mmdebstrap --variant=minbase with systemd and
#    Debian's kernel, built once and cached under $BOARD_CACHE/ARCH-HASH
#    (HASH covers the package list and the hook scripts: editing them
#    rebuilds it). The initramfs holds only the virtio and ext4 modules
#    (rootfs-setup-hook.sh); rootfs-customize-hook.sh sets up the network.
# 2. Per run: a copy of it gets the .deb installed with dpkg in a chroot
#    (through binfmt_misc and qemu-user, so the maintainer scripts run for
#    real: user chatd, the conffile's statoverride, the units enabled), the
#    test config and users, and guest/board-check.service; then an ext4 image.
# 3. The host's side is a Go test (build/board/board_test.go, TestBoard):
#    it starts the host's chatgw and QEMU (-M virt, serial console to
#    console.log). The check unit reports "BOARD: key=value" lines on a
#    virtio serial port (report.log) and the test acts on them: it queries
#    chatgw's admin API, stops chatgw for 20 s when the guest is ready for
#    the broker outage, restarts it once the guest stepped its clock. The
#    guest reboots itself once, checks again, and powers off.
# 4. The test judges the report and prints a PASS/FAIL line per check.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
board=$repo/build/board

rootfs_only=false
if [ "${1:-}" = --rootfs-only ]; then
	rootfs_only=true
	shift
fi
ARCH=${1:-${ARCH:-arm64}}
CACHE=${BOARD_CACHE:-/var/cache/chatd-board}
TIMEOUT=${BOARD_TIMEOUT:-1200}
SUITE=bookworm

log() { printf 'board: %s\n' "$*" >&2; }
die() { printf 'board: %s\n' "$*" >&2; exit 1; }

case $ARCH in
arm64)
	qemu_system=qemu-system-aarch64
	qemu_machine=(-M virt -cpu cortex-a53)
	binfmt=qemu-aarch64
	kernel_pkg=linux-image-arm64
	console=ttyAMA0
	;;
armhf)
	# ARMv7 with LPAE (Cortex-A15); the package's GOARM=6 binaries run on
	# it. ARMv6 boards (Pi Zero/1) cannot be booted from Debian packages:
	# make test-arm covers them under qemu-user.
	qemu_system=qemu-system-arm
	qemu_machine=(-M virt -cpu cortex-a15)
	binfmt=qemu-arm
	kernel_pkg=linux-image-armmp-lpae
	console=ttyAMA0
	;;
*) die "unknown ARCH $ARCH: use arm64 or armhf" ;;
esac

[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap --mode=root, chroot, binfmt_misc): run it with sudo"

total_start=$SECONDS

# --- host prerequisites ---------------------------------------------------

host_prereqs() {
	local need=() p
	for p in qemu-system-arm qemu-user-static binfmt-support mmdebstrap arch-test e2fsprogs; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
	done
	if [ ${#need[@]} -gt 0 ]; then
		log "installing ${need[*]}"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
	fi
	# The chroot and mmdebstrap run ARM binaries through binfmt_misc.
	mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc none /proc/sys/fs/binfmt_misc
	if [ ! -e /proc/sys/fs/binfmt_misc/$binfmt ]; then
		update-binfmts --enable $binfmt >/dev/null 2>&1 || true
	fi
	[ -e /proc/sys/fs/binfmt_misc/$binfmt ] ||
		die "binfmt_misc has no $binfmt entry: run update-binfmts --enable $binfmt (package qemu-user-static)"
	grep -q '^enabled' /proc/sys/fs/binfmt_misc/$binfmt || update-binfmts --enable $binfmt
}

# --- 1. the cached root file system ---------------------------------------

# Packages beyond minbase. passwd (useradd) and util-linux (runuser) are
# already in it; jq reads the status JSON in the checks.
PACKAGES=(systemd-sysv udev kmod "$kernel_pkg" initramfs-tools iproute2 procps zstd
	init-system-helpers passwd util-linux jq)

rootfs_build_seconds=""
rootfs=""
ensure_rootfs() {
	local key
	key=$({
		echo "$ARCH $SUITE minbase"
		printf '%s\n' "${PACKAGES[@]}"
		cat "$board/rootfs-setup-hook.sh" "$board/rootfs-customize-hook.sh"
	} | sha256sum | cut -c1-16)
	local dir=$CACHE/$ARCH-$key
	rootfs=$dir/rootfs
	mkdir -p "$CACHE"
	# One build at a time; a second run waits for it and uses it.
	exec 9>"$CACHE/.lock-$ARCH-$key"
	flock 9
	if [ -e "$dir/complete" ]; then
		log "root file system: cached in $dir (built in $(cat "$dir/build-seconds" 2>/dev/null || echo ?)s)"
		[ ! -e "$dir/no-security-updates" ] || log "root file system: built WITHOUT Debian security updates (the mirror failed then); rm -rf $dir to rebuild"
		return
	fi
	log "root file system: building $ARCH $SUITE in $dir (a few minutes under emulation; cached afterwards)"
	rm -rf "$dir"
	mkdir -p "$dir"
	local start=$SECONDS try nosec=()
	# A mirror mid-sync ("File has unexpected size") fails apt-get update:
	# try again a little later; if it is the security suite's index that
	# keeps failing, build without it (a test image only; said in the
	# summary; delete the cache directory to rebuild with it).
	for try in 1 2 3; do
		rm -rf "$dir/rootfs.tmp"
		if timeout "${BOARD_ROOTFS_TIMEOUT:-2400}" mmdebstrap --mode=root --arch="$ARCH" --variant=minbase \
			--include="$(IFS=,; echo "${PACKAGES[*]}")" \
			--setup-hook="$board/rootfs-setup-hook.sh \"\$1\"" \
			"${nosec[@]}" \
			--customize-hook="$board/rootfs-customize-hook.sh \"\$1\"" \
			"$SUITE" "$dir/rootfs.tmp" >"$dir/mmdebstrap.log" 2>&1; then
			break
		fi
		if [ "$try" = 3 ] || ! grep -q 'Failed to fetch' "$dir/mmdebstrap.log"; then
			tail -n 30 "$dir/mmdebstrap.log" >&2
			die "mmdebstrap failed; full log: $dir/mmdebstrap.log"
		fi
		if [ "$try" = 2 ] && grep -q 'Failed to fetch.*-security' "$dir/mmdebstrap.log"; then
			log "root file system: the security suite's index cannot be fetched; building without security updates"
			# The setup hooks run before apt-get update.
			nosec=(--setup-hook='sed -i "/-security/d" "$1/etc/apt/sources.list"')
			touch "$dir/no-security-updates"
		else
			log "root file system: a download failed (mirror syncing?); trying again in 20 s"
			sleep 20
		fi
	done
	mv "$dir/rootfs.tmp" "$rootfs"
	rootfs_build_seconds=$((SECONDS - start))
	echo "$rootfs_build_seconds" > "$dir/build-seconds"
	touch "$dir/complete"
	log "root file system: built in ${rootfs_build_seconds}s ($(du -sh "$rootfs" | cut -f1))"
	# Older builds for this ARCH (other package lists or hooks) are stale.
	local old
	for old in "$CACHE/$ARCH"-*; do
		if [ "$old" != "$dir" ] && [ -d "$old" ]; then
			log "root file system: removing the stale $old"
			rm -rf "$old" "$CACHE/.lock-${old##*/}"
		fi
	done
}

host_prereqs
ensure_rootfs
flock -u 9
if $rootfs_only; then
	exit 0
fi

# --- 2. this run's image --------------------------------------------------

APPID=1400000001
USER_ID=dev-42
CLOCK_STEP=${BOARD_CLOCK_STEP:-31536000}
[[ $CLOCK_STEP =~ ^[0-9]+$ ]] || die "BOARD_CLOCK_STEP=$CLOCK_STEP: give seconds (0 leaves the clock scenario out)"

if [ -n "${BOARD_DEBS:-}" ]; then
	read -r -a debs <<<"$BOARD_DEBS"
else
	log "building the packages (build/packages.sh for $ARCH)"
	ARCHES=$ARCH build/packages.sh >&2
	debs=()
	for p in chatd chatgw; do
		debs+=("$(ls -t dist/${p}_*_"$ARCH".deb 2>/dev/null | head -n 1)")
	done
fi
declare -A deb=()
for d in "${debs[@]}"; do
	[ -n "$d" ] && [ -f "$d" ] || die "no such package '$d' (build/packages.sh writes dist/{chatd,chatgw}_VERSION_$ARCH.deb; or set BOARD_DEBS)"
	[ "$(dpkg-deb -f "$d" Architecture)" = "$ARCH" ] || die "$d is not for $ARCH"
	deb[$(dpkg-deb -f "$d" Package)]=$d
done
[ -n "${deb[chatd]:-}" ] && [ -n "${deb[chatgw]:-}" ] || die "BOARD_DEBS needs a chatd and a chatgw package for $ARCH"
version=$(dpkg-deb -f "${deb[chatd]}" Version)
# The host's gateway, from the same tree as the packages.
make --no-print-directory build >&2
chatgw=$repo/bin/chatgw

mkdir -p /var/tmp
run=$(mktemp -d /var/tmp/chatd-board.XXXXXX)
keep=${BOARD_KEEP:-0}
cleanup() {
	local rc=$?
	rm -rf "$run/root"
	[ "$keep" = 1 ] || rm -f "$run/disk.img"
	if [ "$rc" = 0 ] && [ "$keep" != 1 ]; then
		rm -rf "$run"
	else
		log "logs kept in $run (console.log: the serial console, report.log: the checks' report, qemu.log)"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The gateway: a key, a UserSig, a free port for the embedded broker.
(umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$run/key")
"$chatgw" usersig gen --sdkappid $APPID --key-file "$run/key" --user $USER_ID --expire 86400 > "$run/usersig"
port=""
for _ in $(seq 1 50); do
	# Below the kernel's ephemeral range (32768 and up), so that no other
	# process's outgoing connection or port-0 listener takes it before the
	# host's chatgw binds it.
	p=$((20000 + RANDOM % 12000))
	if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
		port=$p
		break
	fi
done
[ -n "$port" ] || die "found no free port for the broker"

prep_start=$SECONDS
log "image: ${deb[chatd]} and ${deb[chatgw]} into a copy of the root file system (run directory $run)"
root=$run/root
cp -a "$rootfs" "$root"
od -An -tx1 -N16 /dev/urandom | tr -d ' \n' > "$root/etc/machine-id"
echo >> "$root/etc/machine-id"
mkdir -p "$root/tmp/debs"
cp "${deb[chatd]}" "${deb[chatgw]}" "$root/tmp/debs/"
# dpkg in the board's own root, through qemu-user: the maintainer scripts
# run as they would on a board.
if ! chroot "$root" sh -c 'dpkg -i /tmp/debs/*.deb' > "$run/dpkg.log" 2>&1; then
	cat "$run/dpkg.log" >&2
	die "dpkg -i of the packages failed in the board's root"
fi
rm -rf "$root/tmp/debs"
# What the maintainer scripts did, for the Go side to judge. chatd.socket
# is opt-in (and not needed: chatd then makes the socket itself): reported,
# not required.
enabled() { if [ -L "$root/etc/systemd/system/$1" ]; then echo yes; else echo no; fi; }
{
	echo "ARCH=$ARCH"
	echo "VERSION=$version"
	echo "APPID=$APPID"
	echo "USER_ID=$USER_ID"
	echo "PORT=$port"
	echo "TIMEOUT=$TIMEOUT"
	echo "SILENT_LIMIT=${BOARD_SILENT_LIMIT:-300}"
	echo "CLOCK_STEP=$CLOCK_STEP"
	echo "PKG_USER=$(chroot "$root" getent passwd chatd | cut -d: -f1,7)"
	echo "PKG_CONF=$(chroot "$root" stat -c '%U:%G %a' /etc/chatd/chatd.toml)"
	echo "PKG_SERVICE=$(enabled multi-user.target.wants/chatd.service)"
	echo "PKG_SOCKET=$(enabled sockets.target.wants/chatd.socket)"
	echo "GW_USER=$(chroot "$root" getent passwd chatgw | cut -d: -f1,7)"
	echo "GW_CONF=$(chroot "$root" stat -c '%U:%G %a' /etc/chatgw/chatgw.toml)"
	echo "GW_SERVICE=$(enabled multi-user.target.wants/chatgw.service)"
} > "$run/image.env"

# The test config: the identity, the host's broker (10.0.2.2 is the host's
# loopback through QEMU's user networking), short backoff.
cat > "$root/etc/chatd/chatd.toml" <<TOML
# Written by build/board/test-board.sh.
sdkappid = $APPID
user_id = "$USER_ID"
broker = "tcp://10.0.2.2:$port"
usersig_file = "/etc/chatd/usersig"

[reconnect]
max_delay = "5s"

[api]
socket_group = "chatd"
TOML
install -m 0640 "$run/usersig" "$root/etc/chatd/usersig"
chroot "$root" chown root:chatd /etc/chatd/chatd.toml /etc/chatd/usersig
chroot "$root" chmod 0640 /etc/chatd/chatd.toml
# A member of group chatd (may read the status) and a plain user.
chroot "$root" useradd --create-home --groups chatd member
chroot "$root" useradd --create-home plain
install -D -m 0755 "$board/guest/board-check.sh" "$root/usr/local/lib/board/board-check.sh"
install -m 0644 "$board/guest/board-check.service" "$root/etc/systemd/system/board-check.service"
ln -sf /etc/systemd/system/board-check.service "$root/etc/systemd/system/multi-user.target.wants/board-check.service"
if [ "$CLOCK_STEP" != 0 ]; then
	# The first boot's clock, set back before chatd starts (a board
	# without RTC or NTP); board-check.sh steps it forward later.
	echo "$CLOCK_STEP" > "$root/usr/local/lib/board/clock-step"
	install -m 0644 "$board/guest/board-clock.service" "$root/etc/systemd/system/board-clock.service"
	mkdir -p "$root/etc/systemd/system/sysinit.target.wants"
	ln -sf /etc/systemd/system/board-clock.service "$root/etc/systemd/system/sysinit.target.wants/board-clock.service"
fi

kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n 1)
initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -n 1)
cp "$kernel" "$run/vmlinuz"
cp "$initrd" "$run/initrd.img"
truncate -s 2G "$run/disk.img"
mkfs.ext4 -q -F -L board -d "$root" "$run/disk.img"
rm -rf "$root"
prep_seconds=$((SECONDS - prep_start))
log "image: ready in ${prep_seconds}s"

# --- 3. boot it: the Go side runs QEMU and judges --------------------------

# -kernel boots it directly: no firmware, and no PXE ROM for the NIC
# (romfile=: Debian's qemu-system-arm does not pull in ipxe-qemu).
printf '%s\n' "$qemu_system" "${qemu_machine[@]}" -m 512 -smp 2 \
	-kernel "$run/vmlinuz" -initrd "$run/initrd.img" \
	-append "console=$console root=/dev/vda rw quiet systemd.firstboot=off" \
	-drive file="$run/disk.img",format=raw,if=virtio \
	-netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= \
	-device virtio-serial-pci -chardev file,id=report,path="$run/report.log" \
	-device virtserialport,chardev=report,name=board \
	-serial file:"$run/console.log" -monitor none -display none -nographic > "$run/qemu.args"

rc=0
BOARD_RUN=$run BOARD_CHATGW=$chatgw go test ./build/board/ -run '^TestBoard$' -count=1 -v \
	-timeout "$((TIMEOUT + 300))s" || rc=$?
echo "root file system build:          ${rootfs_build_seconds:-cached}${rootfs_build_seconds:+s}$([ ! -e "$rootfs/../no-security-updates" ] || echo " (WITHOUT Debian security updates: the mirror's security index failed)")"
echo "image preparation:               ${prep_seconds}s (copy, dpkg -i under qemu-user, mkfs.ext4)"
echo "total:                           $((SECONDS - total_start))s"
exit "$rc"

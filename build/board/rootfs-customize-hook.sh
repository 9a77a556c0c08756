#!/bin/sh
# mmdebstrap --customize-hook for the board's root file system: runs after
# every package is installed, with the new root as $1. Only what every run
# shares goes here (the result is cached); the chatd package, its config
# and the checks are added per run by test-board.sh.
set -eu
root=$1

echo board > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tboard\n' > "$root/etc/hosts"
# The root is given on the kernel command line (root=/dev/vda rw).
: > "$root/etc/fstab"

# QEMU user networking: the guest is 10.0.2.15, the host's loopback is
# 10.0.2.2, its DNS 10.0.2.3. A static address: no wait for DHCP.
mkdir -p "$root/etc/systemd/network"
cat > "$root/etc/systemd/network/10-board.network" <<'NET'
[Match]
Name=en* eth*

[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
DNS=10.0.2.3
NET
chroot "$root" systemctl enable systemd-networkd.service >/dev/null 2>&1
# network-online.target (chatd.service waits for it): one link is enough,
# and never hold the boot long.
mkdir -p "$root/etc/systemd/system/systemd-networkd-wait-online.service.d"
cat > "$root/etc/systemd/system/systemd-networkd-wait-online.service.d/board.conf" <<'UNIT'
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=30
UNIT

# A persistent journal, so the checks can read the first boot's after the
# reboot.
mkdir -p "$root/var/log/journal"

# Nothing that runs by itself during a test.
for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
	e2scrub_reap.service; do
	chroot "$root" systemctl disable "$u" >/dev/null 2>&1 || true
done

# The machine id is written per run (an empty one would make the boot a
# "first boot").
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"

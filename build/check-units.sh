#!/usr/bin/env bash
# Check the systemd units in build/systemd/ without a running systemd:
#
#  1. systemd-analyze verify: no errors and no warnings. An unknown or
#     misspelled key is only a warning (rc 0), so any line on stderr fails.
#  2. systemd-analyze security --offline=true: the exposure of chatd.service
#     and of chatgw.service must be MAX_EXPOSURE (2.0) or lower.
#
# verify refuses a unit whose ExecStart binary does not exist. Rather than
# needing chatd and chatgw installed, it checks copies of the units (same
# names, so Service=/Also= still resolve) in a temporary directory, with
# /usr/bin/chatd and /usr/bin/chatgw rewritten to executable stubs there. Nothing else in them changes.
# (--root=DIR would check the files as they are, but then DIR also needs
# all of systemd's own units, sysinit.target and the rest.)
#
# Usage: build/check-units.sh        (from any directory; no network)
set -euo pipefail
cd "$(dirname "$0")/.."

UNITS=(build/systemd/chatd.service build/systemd/chatd.socket build/systemd/chatgw.service)
SERVICES=(build/systemd/chatd.service build/systemd/chatgw.service)
MAX_EXPOSURE=2.0

command -v systemd-analyze >/dev/null || {
	echo "check-units: systemd-analyze not found; install it: apt-get install systemd" >&2
	exit 1
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mkdir "$tmp/bin"
for b in chatd chatgw; do
	printf '#!/bin/sh\nexit 0\n' >"$tmp/bin/$b"
	chmod 0755 "$tmp/bin/$b"
done
copies=()
for u in "${UNITS[@]}"; do
	sed "s#/usr/bin/chat\(d\|gw\)\b#$tmp/bin/chat\1#g" "$u" >"$tmp/${u##*/}"
	copies+=("$tmp/${u##*/}")
done

fail=0

echo "== systemd-analyze verify ${UNITS[*]}"
rc=0
# --man=no: the units name no man pages, and looking them up needs man-db.
systemd-analyze verify --man=no "${copies[@]}" >"$tmp/verify.out" 2>"$tmp/verify.err" || rc=$?
# Report the real file names, not the copies'.
sed -i "s#$tmp/bin/#/usr/bin/#g; s#$tmp/#build/systemd/#g" "$tmp/verify.out" "$tmp/verify.err"
cat "$tmp/verify.out"
if [ "$rc" -ne 0 ] || [ -s "$tmp/verify.err" ]; then
	sed 's/^/  /' "$tmp/verify.err" >&2
	echo "FAIL verify (rc $rc, $(wc -l <"$tmp/verify.err") line(s) on stderr)" >&2
	fail=1
else
	echo "ok   verify: no errors, no warnings"
fi

threshold=$(awk -v m="$MAX_EXPOSURE" 'BEGIN { printf "%d", m * 10 }')
for unit in "${SERVICES[@]}"; do
	echo "== systemd-analyze security --offline=true $unit"
	rc=0
	systemd-analyze security --offline=true --threshold="$threshold" --no-pager \
		"$unit" >"$tmp/security.out" 2>&1 || rc=$?
	line=$(grep -a 'Overall exposure level' "$tmp/security.out" || true)
	if [ -z "$line" ]; then
		cat "$tmp/security.out" >&2
		echo "FAIL security ${unit##*/}: no 'Overall exposure level' line" >&2
		fail=1
	else
		echo "$line"
		score=$(sed -n 's/.*: \([0-9][0-9.]*\) .*/\1/p' <<<"$line")
		if [ "$rc" -ne 0 ] || awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s > m) }'; then
			# Show what costs exposure, worst first.
			grep -a '✗' "$tmp/security.out" | awk '{ print $NF "\t" $0 }' | sort -rn | cut -f2- | sed 's/^/  /' >&2
			echo "FAIL security ${unit##*/}: exposure $score is above $MAX_EXPOSURE (rc $rc)" >&2
			fail=1
		else
			echo "ok   security ${unit##*/}: exposure $score <= $MAX_EXPOSURE"
		fi
	fi
done

if [ "$fail" -ne 0 ]; then
	echo "check-units: FAILED" >&2
	exit 1
fi
echo "check-units: OK"

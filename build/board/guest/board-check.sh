#!/bin/bash
# The board's side of build/board/test-board.sh: checks chatd on this boot
# and reports "BOARD: key=value" lines to the host on the virtio serial port
# "board" (mirrored on the console). Keys start with b1_ (first boot) or
# b2_ (after the reboot). The host judges them; this script only measures.
#
# First boot: LOGINED, permissions, then the broker outage (the host stops
# chatgw when it reads b1_outage=ready), then a reboot. Second boot:
# LOGINED again with the same session (resumed from chatd's state), memory
# after 60 s idle, the journal holds no UserSig, then power off.
set -u
export LC_ALL=C
PORT=/dev/virtio-ports/board
STATE=/var/lib/board
mkdir -p "$STATE"

for _ in $(seq 1 60); do
	[ -e "$PORT" ] && break
	sleep 0.5
done
if [ -e "$PORT" ]; then
	exec 3>>"$PORT"
else
	exec 3>/dev/null
	echo "BOARD: error=no virtio serial port $PORT"
fi

if [ -e "$STATE/boot1-done" ]; then
	boot=2
else
	boot=1
fi
report() {
	# One line each: the values are single-line by construction.
	echo "BOARD: b${boot}_$*" >&3
	echo "BOARD: b${boot}_$*"
}
uptime_s() { cut -d' ' -f1 /proc/uptime; }
status_json() { chatctl status --json 2>/dev/null | jq -c . 2>/dev/null || echo '{}'; }
field() { jq -r "$1 // empty" <<<"$2"; }

# What the host needs when something failed.
report_chatd_log() {
	journalctl -u chatd -b --no-pager -o cat -n 15 2>/dev/null | tr -d '\r' |
		while IFS= read -r l; do report "log=$l"; done
}

# Unit state of chatd: active, its user, restarts.
report_unit() {
	local pid
	report "chatd_active=$(systemctl is-active chatd.service)"
	pid=$(systemctl show -p MainPID --value chatd.service)
	report "chatd_pid=$pid"
	report "chatd_user=$(ps -o user= -p "$pid" 2>/dev/null | tr -d ' ')"
	report "chatd_nrestarts=$(systemctl show -p NRestarts --value chatd.service)"
}

report "start=$(uptime_s)"

# --- LOGINED ----------------------------------------------------------------
rc=0
chatctl wait --status LOGINED --timeout 180s >/dev/null 2>&1 || rc=$?
up=$(uptime_s)
report "wait_logined_rc=$rc"
report "logined_uptime=$up"
st=$(status_json)
report "status=$st"
# When chatd became LOGINED, in seconds since the kernel started: its
# "since" against the boot time on the same clock.
since=$(field .since "$st")
if [ -n "$since" ]; then
	now=$(date +%s.%N)
	since_epoch=$(date -d "$since" +%s.%N 2>/dev/null || echo "")
	if [ -n "$since_epoch" ]; then
		report "logined_since_uptime=$(awk -v n="$now" -v u="$(uptime_s)" -v s="$since_epoch" 'BEGIN { printf "%.1f", s - (n - u) }')"
	fi
fi
report "chatd_active_uptime=$(awk -v us="$(systemctl show -p ActiveEnterTimestampMonotonic --value chatd.service)" 'BEGIN { printf "%.1f", us / 1e6 }')"
report "session=$(field .session "$st")"
report "phase=logined"
report_unit
[ "$rc" = 0 ] || report_chatd_log

if [ "$boot" = 1 ]; then
	# --- permissions --------------------------------------------------------
	rc=0
	runuser -u member -- chatctl status >/dev/null 2>"$STATE/member.err" || rc=$?
	report "member_status_rc=$rc"
	[ "$rc" = 0 ] || report "member_status_err=$(head -c 300 "$STATE/member.err" | tr '\n' ' ')"
	rc=0
	out=$(runuser -u plain -- chatctl logout 2>&1) || rc=$?
	report "plain_logout_rc=$rc"
	report "plain_logout_out=$(head -c 300 <<<"$out" | tr '\n' ' ')"
	rc=0
	out=$(runuser -u member -- chatctl logout 2>&1) || rc=$?
	report "member_logout_rc=$rc"
	report "member_logout_out=$(head -c 300 <<<"$out" | tr '\n' ' ')"
	st=$(status_json)
	report "after_logout_login_status=$(field .login_status "$st")"

	# --- broker outage --------------------------------------------------------
	# The host stops chatgw (its embedded broker) when it reads this line,
	# and starts it again 20 s later.
	report "outage=ready"
	t0=$(uptime_s)
	seen=0
	for _ in $(seq 1 240); do
		st=$(status_json)
		if [ "$(field .connected "$st")" = false ]; then
			seen=1
			break
		fi
		sleep 0.5
	done
	report "outage_disconnected=$seen"
	report "outage_disconnected_status=$st"
	report "outage_disconnected_after=$(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }')"
	t1=$(uptime_s)
	recovered=0
	for _ in $(seq 1 180); do
		chatctl wait --status LOGINED --timeout 60s >/dev/null 2>&1 || true
		st=$(status_json)
		if [ "$(field .login_status "$st")" = 1 ] && [ "$(field .connected "$st")" = true ]; then
			recovered=1
			break
		fi
		sleep 1
	done
	report "outage_recovered=$recovered"
	report "outage_recovered_after=$(awk -v a="$t1" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }')"
	report "outage_status=$st"
	report "outage_session=$(field .session "$st")"
	report_unit
	[ "$recovered" = 1 ] || report_chatd_log
	report "phase=recovered"

	# --- reboot -----------------------------------------------------------------
	field .session "$st" > "$STATE/boot1-session"
	touch "$STATE/boot1-done"
	sync
	report "reboot=now"
	systemctl reboot
	exit 0
fi

# --- second boot: resumed ------------------------------------------------------
report "session_before=$(cat "$STATE/boot1-session" 2>/dev/null)"

# Memory after 60 s idle (LOGINED, nothing asked of it).
sleep 60
pid=$(systemctl show -p MainPID --value chatd.service)
report "vmrss_kb=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)"
report "vmhwm_kb=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)"
report "idle_status=$(status_json)"
report_unit

# --- the journal holds no UserSig ----------------------------------------------
sig=$(tr -d ' \n\r\t' < /etc/chatd/usersig)
report "journal_boots=$(journalctl --list-boots --no-pager 2>/dev/null | grep -c .)"
report "journal_chatd_lines=$(journalctl -u chatd --no-pager -o cat 2>/dev/null | grep -c .)"
report "journal_usersig_hits=$(journalctl --no-pager -o cat 2>/dev/null | grep -cF -- "$sig")"
report "journal_eJ_hits=$(journalctl -u chatd --no-pager -o verbose 2>/dev/null | grep -cE 'eJ[A-Za-z0-9_*-]{20,}')"

report "phase=done"
sync
systemctl poweroff

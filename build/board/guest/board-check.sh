#!/bin/bash
# The board's side of build/board/test-board.sh: checks chatd on this boot
# and reports "BOARD: key=value" lines to the host on the virtio serial port
# "board" (mirrored on the console). Keys start with b1_ (first boot) or
# b2_ (after the reboot). The host judges them; this script only measures.
#
# First boot: LOGINED, permissions, then the broker outage (the host stops
# chatgw when it reads b1_outage=ready), then a reboot. Second boot:
# LOGINED again with the same session (resumed from chatd's state), the
# packaged chatgw.service configured and started, memory after 60 s idle,
# the journal holds no UserSig, then power off; or, with the clock scenario
# (/usr/local/lib/board/clock-step), a reboot into a third boot whose clock
# board-clock.service set back: a fresh login, the clock stepped forward
# with date -s (the host restarts chatgw when it reads b3_clock=stepped),
# then power off.
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

if [ -e "$STATE/boot2-done" ]; then
	boot=3
elif [ -e "$STATE/boot1-done" ]; then
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
# A field of a JSON object ("" when absent; false stays false).
field() { jq -r "$1 | select(. != null)" <<<"$2"; }

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
# The guest's clock, for the host to compare with its own.
report "clock_guest_now=$(date +%s)"
report "clock_ntp=$(systemctl is-active systemd-timesyncd.service 2>/dev/null)"

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
	# --- the chatgw package: installed, skipped until configured ---------------
	report "chatgw_version=$(chatgw --version 2>&1)"
	report "chatgw_active=$(systemctl is-active chatgw.service)"
	report "chatgw_condition=$(systemctl show -p ConditionResult,Result --value chatgw.service | paste -sd' ')"

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
	# The host stops chatgw (its embedded broker) when it reads outage=ready,
	# and starts it again 20 s later. chatd's events (chatctl watch) show the
	# disconnect however short it is; polling the status would miss one
	# shorter than a poll.
	events=$STATE/outage-events.jsonl
	chatctl watch --json >"$events" 2>&1 &
	watch_pid=$!
	for _ in $(seq 1 100); do
		grep -q '"type": *"status"' "$events" && break
		sleep 0.2
	done
	report "outage=ready"
	t0=$SECONDS
	seen=0
	while [ $((SECONDS - t0)) -lt 150 ]; do
		if grep -qE '"type": *"on(Connecting|ConnectFailed)"' "$events"; then
			seen=1
			break
		fi
		sleep 0.5
	done
	report "outage_disconnected=$seen"
	report "outage_disconnected_after=$((SECONDS - t0))"
	t1=$SECONDS
	recovered=0
	while [ "$seen" = 1 ] && [ $((SECONDS - t1)) -lt 150 ]; do
		if grep -q '"type": *"onConnectSuccess"' "$events"; then
			st=$(status_json)
			if [ "$(field .login_status "$st")" = 1 ] && [ "$(field .connected "$st")" = true ]; then
				recovered=1
				break
			fi
		fi
		sleep 0.5
	done
	kill "$watch_pid" 2>/dev/null
	wait "$watch_pid" 2>/dev/null
	st=$(status_json)
	report "outage_recovered=$recovered"
	report "outage_recovered_after=$((SECONDS - t1))"
	ev() { jq -r "select(.type != null and .type != \"status\") | $1" "$events" 2>/dev/null; }
	report "outage_first_event=$(ev '.time[11:19] + " " + .type + (if .code then "(" + (.code|tostring) + ")" else "" end)' | head -n 1)"
	report "outage_failed_attempts=$(ev '.type' | grep -c '^onConnectFailed$')"
	report "outage_success_at=$(ev 'select(.type == "onConnectSuccess") | .time[11:19]' | head -n 1)"
	report "outage_status=$st"
	report "outage_session=$(field .session "$st")"
	report "outage_nrestarts=$(systemctl show -p NRestarts --value chatd.service)"
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

# --- third boot (with the clock scenario only): clock step --------------------
# board-clock.service set the clock back before chatd started, as on a board
# without RTC or NTP. A fresh login on that clock, then the clock is stepped
# forward (as NTP or an operator would) and the host restarts chatgw: chatd
# reconnects and must resume the same session, without onUserSigExpired.
if [ "$boot" = 3 ]; then
	report "clock_set_back=$(cat "$STATE/clock-back" 2>/dev/null)"
	rc=0
	chatctl wait --status LOGINED --timeout 180s >/dev/null 2>&1 || rc=$?
	report "clock_resume_rc=$rc"
	chatctl logout >/dev/null 2>&1
	rc=0
	chatctl login --user dev-42 --usersig-file /etc/chatd/usersig >/dev/null 2>"$STATE/clock-login.err" || rc=$?
	report "clock_login_rc=$rc"
	[ "$rc" = 0 ] || report "clock_login_err=$(head -c 300 "$STATE/clock-login.err" | tr '\n' ' ')"
	rc=0
	chatctl wait --status LOGINED --timeout 180s >/dev/null 2>&1 || rc=$?
	report "clock_logined_rc=$rc"
	step=$(cat /usr/local/lib/board/clock-step)
	st=$(status_json)
	report "clock_session_before=$(field .session "$st")"
	report "clock_status_before=$st"
	events=$STATE/clock-events.jsonl
	chatctl watch --json >"$events" 2>&1 &
	watch_pid=$!
	for _ in $(seq 1 100); do
		grep -q '"type": *"status"' "$events" && break
		sleep 0.2
	done
	report "clock_guest_before=$(date -u +%FT%TZ)"
	date -s "@$(($(date +%s) + step))" >/dev/null
	report "clock_guest_after=$(date -u +%FT%TZ)"
	report "clock=stepped"
	t0=$SECONDS
	seen=0
	while [ $((SECONDS - t0)) -lt 150 ]; do
		if grep -qE '"type": *"on(Connecting|ConnectFailed)"' "$events"; then
			seen=1
			break
		fi
		sleep 0.5
	done
	recovered=0
	while [ "$seen" = 1 ] && [ $((SECONDS - t0)) -lt 200 ]; do
		if grep -q '"type": *"onConnectSuccess"' "$events"; then
			st=$(status_json)
			if [ "$(field .login_status "$st")" = 1 ] && [ "$(field .connected "$st")" = true ]; then
				recovered=1
				break
			fi
		fi
		sleep 0.5
	done
	report "clock_recovered_after=$((SECONDS - t0))"
	# Time for a late onUserSigExpired or logout to show.
	sleep 10
	kill "$watch_pid" 2>/dev/null
	wait "$watch_pid" 2>/dev/null
	st=$(status_json)
	report "clock_disconnect_seen=$seen"
	report "clock_recovered=$recovered"
	report "clock_status=$st"
	report "clock_session=$(field .session "$st")"
	report "clock_login_status=$(field .login_status "$st")"
	report "clock_expired_events=$(grep -c '"type": *"onUserSigExpired"' "$events")"
	report "clock_events=$(jq -r 'select(.type != null and .type != "status") | .type + (if .code then "(" + (.code|tostring) + ")" else "" end)' "$events" 2>/dev/null | paste -sd' ' | cut -c1-300)"
	[ "$recovered" = 1 ] || report_chatd_log
	report "phase=clock_done"
	report_unit
	report "phase=done"
	sync
	systemctl poweroff
	exit 0
fi

# --- second boot: resumed ------------------------------------------------------
report "session_before=$(cat "$STATE/boot1-session" 2>/dev/null)"

# The packaged chatgw.service, configured: its own embedded broker on the
# guest's loopback, a key of its own.
(umask 027; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > /etc/chatgw/key)
chown root:chatgw /etc/chatgw/key
sed -i -e 's/^#sdkappid = .*/sdkappid = 1400000001/' \
	-e 's/^#embedded_broker = .*/embedded_broker = "127.0.0.1:1884"/' /etc/chatgw/chatgw.toml
rc=0
timeout 120 systemctl restart chatgw.service || rc=$?
report "gw_restart_rc=$rc"

# Memory after 60 s idle (LOGINED, nothing asked of it).
sleep 60
pid=$(systemctl show -p MainPID --value chatd.service)
report "vmrss_kb=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)"
report "vmhwm_kb=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)"
report "idle_status=$(status_json)"
report_unit
report "gw_active=$(systemctl is-active chatgw.service)"
gpid=$(systemctl show -p MainPID --value chatgw.service)
report "gw_user=$(ps -o user= -p "$gpid" 2>/dev/null | tr -d ' ')"
report "gw_status_text=$(systemctl show -p StatusText --value chatgw.service)"
report "gw_socket=$(stat -c '%A %U:%G' /run/chatgw/admin.sock 2>&1)"
report "gw_nrestarts=$(systemctl show -p NRestarts --value chatgw.service)"
[ "$(systemctl is-active chatgw.service)" = active ] ||
	journalctl -u chatgw -b --no-pager -o cat -n 15 2>/dev/null | tr -d '\r' | while IFS= read -r l; do report "gw_log=$l"; done

# --- the journal holds no UserSig ----------------------------------------------
sig=$(tr -d ' \n\r\t' < /etc/chatd/usersig)
# --list-boots prints a header line first (systemd 252).
report "journal_boots=$(journalctl --list-boots --no-pager 2>/dev/null | grep -cE '^ *-?[0-9]+ +[0-9a-f]{32} ')"
report "journal_chatd_lines=$(journalctl -u chatd --no-pager -o cat 2>/dev/null | grep -c .)"
report "journal_usersig_hits=$(journalctl --no-pager -o cat 2>/dev/null | grep -cF -- "$sig")"
report "journal_eJ_hits=$(journalctl -u chatd --no-pager -o verbose 2>/dev/null | grep -cE 'eJ[A-Za-z0-9_*-]{20,}')"

# Where the boot time went (systemd's own view; slow under emulation).
report "analyze_time=$(timeout 60 systemd-analyze time 2>&1 | head -n 1)"
report "analyze_chain=$(timeout 60 systemd-analyze critical-chain chatd.service 2>&1 | grep -E '[@+][0-9]' | head -n 8 | sed 's/^[^a-z]*//' | tr '\n' ';')"

if [ -s /usr/local/lib/board/clock-step ]; then
	# The clock scenario gets a boot of its own.
	touch "$STATE/boot2-done"
	sync
	report "reboot=now"
	systemctl reboot
	exit 0
fi
report "phase=done"
sync
systemctl poweroff

#!/usr/bin/env bash
# make demo: the login gateway with its embedded broker, and a chatd with a
# demo identity logged in to it, all under .demo/ in the checkout. Runs until
# Ctrl-C and leaves no process behind. With --smoke it checks the demo comes
# up (LOGINED), shows the status, and stops (make check runs that).
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=false
[ "${1:-}" = "--smoke" ] && smoke=true

demo=.demo
bin=bin
appid=1400000001
user=demo-device
port=${DEMO_BROKER_PORT:-18830}

mkdir -p "$demo"
chmod 700 "$demo"
if [ ! -s "$demo/key" ]; then
  (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$demo/key")
fi
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  echo "demo: port $port is in use; run with DEMO_BROKER_PORT=another-port" >&2
  exit 1
fi

# The credential helper: what a device's provisioning would do, here with
# the demo key.
cat > "$demo/get-usersig" <<SH
#!/bin/sh
exec "$PWD/$bin/chatgw" usersig gen --sdkappid $appid --key-file "$PWD/$demo/key" --user "\$CHATD_USER_ID" --expire 86400
SH
chmod 755 "$demo/get-usersig"

cat > "$demo/chatd.toml" <<TOML
# Written by make demo.
sdkappid = $appid
user_id = "$user"
broker = "tcp://127.0.0.1:$port"
usersig_command = "$PWD/$demo/get-usersig"
state_db = "$PWD/$demo/state.db"
socket = "$PWD/$demo/chatd.sock"

[usersig]
renew_margin = "1h"
TOML

pids=()
cleanup() {
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  echo "demo: stopped"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$bin/chatgw" serve --sdkappid $appid --key-file "$demo/key" --embedded-broker "127.0.0.1:$port" \
  --admin "$PWD/$demo/chatgw.sock" --state "$demo/chatgw.db" 2> "$demo/chatgw.log" &
pids+=($!)
"$bin/chatd" --config "$demo/chatd.toml" 2> "$demo/chatd.log" &
pids+=($!)

export CHATD_SOCKET="$PWD/$demo/chatd.sock"
if ! "$bin/chatctl" wait --status LOGINED --timeout 30s; then
  echo "demo: chatd did not log in; its log:" >&2
  tail -n 20 "$demo/chatd.log" >&2
  echo "gateway log:" >&2
  tail -n 20 "$demo/chatgw.log" >&2
  exit 1
fi
"$bin/chatctl" status

cat <<TXT

chatd is logged in as $user through chatgw's embedded broker on 127.0.0.1:$port.
Try, in another terminal:
  export CHATD_SOCKET=$PWD/$demo/chatd.sock
  $bin/chatctl status            # or: curl --unix-socket \$CHATD_SOCKET http://chatd/v1/status
  $bin/chatctl watch             # live events
  $bin/chatctl logout; $bin/chatctl login --user $user --usersig "\$($demo/get-usersig)"
  curl --unix-socket $PWD/$demo/chatgw.sock http://chatgw/v1/sessions      # the gateway's view
  curl -X POST --unix-socket $PWD/$demo/chatgw.sock http://chatgw/v1/users/$user/kick
Logs: $demo/chatd.log, $demo/chatgw.log.  Ctrl-C stops everything.
TXT

if $smoke; then
  exit 0
fi
wait -n "${pids[@]}" || true
echo "demo: a process exited; see $demo/*.log" >&2
exit 1

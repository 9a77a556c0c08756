// Command chatctl controls chatd, the daemon that keeps this device's chat
// identity logged in: it shows the login status, logs in and out, follows
// events and waits for a status. It talks to chatd only through its Unix
// socket (--socket, else $CHATD_SOCKET, else /run/chatd/chatd.sock).
//
//	chatctl status [--json]
//	chatctl login --user U (--usersig-file F | --usersig - | --usersig SIG) [--json]
//	chatctl logout [--json]
//	chatctl watch [--json]
//	chatctl wait --status LOGINED|LOGINING|LOGOUT|1|2|3 [--timeout 30s]
//	chatctl usersig decode SIG|-
//	chatctl --version
//
// Exit codes: 0 ok, 1 failure (a login code other than 0, a timeout), 2
// usage error, 3 chatd not reachable.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// version is set at build time (-ldflags "-X main.version=...").
var version = "devel"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	e := &env{
		stdin:  os.Stdin,
		stdout: os.Stdout,
		stderr: os.Stderr,
		getenv: os.Getenv,
		now:    time.Now,
		loc:    time.Local,
	}
	err := run(ctx, os.Args[1:], e)
	stop()
	os.Exit(exitCode(err, os.Stderr))
}

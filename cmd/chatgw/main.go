// Command chatgw is the login gateway that chatd devices log in to over
// MQTT: it verifies UserSigs, enforces multi-client login policies and
// kicks, and serves an admin API. It also makes, checks and decodes
// UserSigs.
//
//	chatgw serve --sdkappid N --key-file F --embedded-broker 127.0.0.1:1883
//	chatgw usersig gen --sdkappid N --key-file F --user U [--expire SECONDS]
//	chatgw usersig verify --sdkappid N --key-file F --user U SIG
//	chatgw usersig decode SIG
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

// version is set at build time (-ldflags "-X main.version=...").
var version = "devel"

// Exit codes. exitConfig is permanent: the unit's RestartPreventExitStatus.
const (
	exitOK      = 0
	exitFailure = 1
	exitConfig  = 2
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(exitCode(err))
}

func exitCode(err error) int {
	var ce *cliError
	switch {
	case err == nil, errors.Is(err, context.Canceled):
		return exitOK
	case errors.As(err, &ce):
		if ce.msg != "" {
			fmt.Fprintln(os.Stderr, "chatgw:", ce.msg)
		}
		return ce.code
	default:
		fmt.Fprintln(os.Stderr, "chatgw:", err)
		return exitFailure
	}
}

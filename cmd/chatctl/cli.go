package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"chatd/client"
)

// Exit codes.
const (
	exitOK          = 0
	exitFailure     = 1 // a failure, a timeout, a login code other than 0
	exitUsage       = 2 // the command line is wrong
	exitUnreachable = 3 // chatd cannot be reached
)

// env is what a run of chatctl sees of the world.
type env struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	getenv         func(string) string
	now            func() time.Time
	loc            *time.Location // for times shown to people
}

// cliError carries an exit code, a message and a hint; msg "" means already
// reported.
type cliError struct {
	code      int
	msg, hint string
}

func (e *cliError) Error() string { return e.msg }

func usageErr(format string, a ...any) error {
	return &cliError{code: exitUsage, msg: fmt.Sprintf(format, a...), hint: "see chatctl --help"}
}

func failure(hint, format string, a ...any) error {
	return &cliError{code: exitFailure, msg: fmt.Sprintf(format, a...), hint: hint}
}

const usage = `chatctl: control chatd, the daemon that keeps this device's chat identity logged in

Usage:
  chatctl [--socket PATH] COMMAND [flags]

Commands:
  status [--json]                 where chatd stands (status, user, connection, UserSig expiry)
  login --user U --usersig-file F log in (or --usersig - to read the UserSig from standard
                                  input; --usersig SIG works too, but other users can see it in ps)
  logout                          log out
  watch [--json]                  print events as they happen (Ctrl-C stops)
  wait --status S [--timeout 30s] wait until the status is S (LOGINED, LOGINING, LOGOUT or 1, 2, 3)
  usersig decode SIG|-            show what a UserSig holds (offline; needs no key)
  --version                       print the version

The socket is --socket, else $CHATD_SOCKET, else ` + client.DefaultSocket + `.
Logging in and out needs root, the chatd user or the operator group; reading needs
access to the socket (its group).

Exit codes: 0 ok, 1 failure (login code other than 0, timeout), 2 usage error,
3 chatd not reachable.
`

func run(ctx context.Context, args []string, e *env) error {
	fs := flag.NewFlagSet("chatctl", flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	fs.Usage = func() {} // -h prints the usage below, on stdout
	socket := fs.String("socket", "", "chatd's socket (default $CHATD_SOCKET, else "+client.DefaultSocket+")")
	showVersion := fs.Bool("version", false, "print the version")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprint(e.stdout, usage)
			return nil
		}
		return &cliError{code: exitUsage, hint: "see chatctl --help"}
	}
	if *showVersion {
		fmt.Fprintln(e.stdout, "chatctl", version)
		return nil
	}
	rest := fs.Args()
	if len(rest) == 0 {
		fmt.Fprint(e.stderr, usage)
		return &cliError{code: exitUsage}
	}
	c := &cmd{env: e, socket: socket}
	cmdArgs := rest[1:]
	switch rest[0] {
	case "help":
		fmt.Fprint(e.stdout, usage)
		return nil
	case "version":
		fmt.Fprintln(e.stdout, "chatctl", version)
		return nil
	case "status":
		return c.status(ctx, cmdArgs)
	case "login":
		return c.login(ctx, cmdArgs)
	case "logout":
		return c.logout(ctx, cmdArgs)
	case "watch":
		return c.watch(ctx, cmdArgs)
	case "wait":
		return c.wait(ctx, cmdArgs)
	case "usersig":
		if len(cmdArgs) == 0 || cmdArgs[0] != "decode" {
			return usageErr("usersig needs the subcommand decode: chatctl usersig decode SIG")
		}
		return c.usersigDecode(cmdArgs[1:])
	}
	return usageErr("unknown command %q: use status, login, logout, watch, wait or usersig decode", rest[0])
}

// cmd is one command's run: the environment and the socket flag, which
// every command also accepts after its name.
type cmd struct {
	*env
	socket *string
}

// flags returns a FlagSet for a command, with --socket.
func (c *cmd) flags(name string) *flag.FlagSet {
	fs := flag.NewFlagSet("chatctl "+name, flag.ContinueOnError)
	fs.SetOutput(c.stderr)
	fs.StringVar(c.socket, "socket", *c.socket, "chatd's socket")
	return fs
}

// parse parses a command's flags and refuses positional arguments beyond
// maxArgs.
func (c *cmd) parse(fs *flag.FlagSet, args []string, maxArgs int) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return &cliError{code: exitOK}
		}
		return &cliError{code: exitUsage}
	}
	if fs.NArg() > maxArgs {
		return usageErr("%s: unexpected argument %q", fs.Name(), fs.Arg(maxArgs))
	}
	return nil
}

// client returns a client for the socket in use.
func (c *cmd) client() *client.Client {
	path := *c.socket
	if path == "" {
		path = c.getenv("CHATD_SOCKET")
	}
	if path == "" {
		path = client.DefaultSocket
	}
	return client.New(path)
}

// exitCode reports err on stderr, with its hint, and returns the exit code.
func exitCode(err error, stderr io.Writer) int {
	if err == nil {
		return exitOK
	}
	say := func(msg, hint string) {
		if msg != "" {
			fmt.Fprintln(stderr, "chatctl:", msg)
		}
		if hint != "" {
			fmt.Fprintln(stderr, "chatctl: hint:", hint)
		}
	}
	var (
		ce   *cliError
		conn *client.ConnError
		api  *client.APIError
	)
	switch {
	case errors.As(err, &ce):
		say(ce.msg, ce.hint)
		return ce.code
	case errors.As(err, &conn):
		say("cannot reach chatd: "+conn.Err.Error(), conn.Hint)
		return exitUnreachable
	case errors.As(err, &api):
		say(api.Message, api.Hint)
		return exitFailure
	case errors.Is(err, context.Canceled):
		say("interrupted", "")
		return exitFailure
	}
	say(err.Error(), "")
	return exitFailure
}

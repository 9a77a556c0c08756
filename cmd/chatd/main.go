// Command chatd keeps a device's chat identity logged in to the chatgw
// login gateway over MQTT and tells local programs where it stands over a
// Unix socket (see chatctl).
//
//	chatd [--config /etc/chatd/chatd.toml] [--check-config]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"chatd/daemon"
	"chatd/systemd"
)

// version is set at build time (-ldflags "-X main.version=...").
var version = "devel"

// Exit codes; exitConfig is permanent (RestartPreventExitStatus=2).
const (
	exitOK      = 0
	exitFailure = 1
	exitConfig  = 2
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("chatd", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", daemon.DefaultConfigPath, "config file (TOML)")
	check := fs.Bool("check-config", false, "validate the config, explain the problems, and exit")
	configured := fs.Bool("configured", false, "exit 0 if the config names an identity (sdkappid, user_id), 1 if not (the unit's ExecCondition)")
	showVersion := fs.Bool("version", false, "print the version and exit")
	socket := fs.String("socket", "", "override the config's socket path")
	stateDB := fs.String("state-db", "", "override the config's state_db path")
	broker := fs.String("broker", "", "override the config's broker URL")
	logLevel := fs.String("log-level", "", "override [log] level: debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitConfig
	}
	if *showVersion {
		fmt.Fprintln(stdout, "chatd", version)
		return exitOK
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "chatd: unexpected arguments %q\n", fs.Args())
		return exitConfig
	}
	cfg, err := daemon.LoadConfig(*configPath)
	if err != nil {
		fmt.Fprintln(stderr, "chatd:", err)
		if *configured {
			// Let the unit start so that it fails visibly (exit 2) instead
			// of being skipped as "not configured".
			return exitOK
		}
		return exitConfig
	}
	if *socket != "" {
		cfg.Socket = *socket
	}
	if *stateDB != "" {
		cfg.StateDB = *stateDB
	}
	if *broker != "" {
		cfg.Broker = daemon.Brokers{*broker}
	}
	if *logLevel != "" {
		cfg.Log.Level = *logLevel
	}
	if *check {
		return checkConfig(cfg, *configPath, stdout)
	}
	if *configured {
		if cfg.SDKAppID == 0 || cfg.UserID == "" {
			fmt.Fprintf(stderr, "chatd: %s does not name an identity yet (set sdkappid and user_id); not starting\n", *configPath)
			return exitFailure
		}
		return exitOK
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.Log.Level)); err != nil {
		level = slog.LevelInfo
	}
	log := systemd.NewLogger(stderr, level, systemd.UnderJournal())
	notify := systemd.NewNotifier(log)
	ln, err := systemd.Listener()
	if err != nil {
		log.Error("stopping: fix the socket unit", "err", err)
		return exitConfig
	}
	err = daemon.Main(ctx, cfg, daemon.RunOptions{
		Logger:   log,
		Listener: ln,
		Ready:    notify.Ready,
		OnStatus: notify.Status,
		Started: func(d *daemon.Daemon) {
			// Before each ping the watchdog makes the loop turn; a loop
			// that has not turned for 20 s is wedged.
			go systemd.Watchdog(ctx, func() time.Time { return d.Probe(ctx, 5*time.Second) }, 20*time.Second, log)
		},
	})
	notify.Stopping()
	switch {
	case err == nil, errors.Is(err, context.Canceled):
		return exitOK
	case errors.Is(err, daemon.ErrConfig):
		log.Error("stopping: fix the configuration", "err", err)
		return exitConfig
	default:
		log.Error("stopping", "err", err)
		return exitFailure
	}
}

func checkConfig(cfg daemon.Config, path string, stdout io.Writer) int {
	ps := cfg.Check()
	fmt.Fprintf(stdout, "%s:\n", path)
	fmt.Fprintf(stdout, "  sdkappid      %d\n  user_id       %q (platform %s)\n  broker        %s\n  state_db      %s\n  socket        %s\n",
		cfg.SDKAppID, cfg.UserID, cfg.Platform, strings.Join(cfg.Broker, ", "), cfg.StateDB, cfg.Socket)
	switch {
	case cfg.UserSigCommand != "":
		fmt.Fprintf(stdout, "  credential    usersig_command %q (renewed %s before expiry)\n", cfg.UserSigCommand, cfg.UserSig.RenewMargin)
	case cfg.UserSigFile != "":
		fmt.Fprintf(stdout, "  credential    usersig_file %s (no renewal: set usersig_command for that)\n", cfg.UserSigFile)
	}
	fmt.Fprintf(stdout, "  after a kick  %s\n", cfg.Kick.After)
	if len(ps) == 0 {
		fmt.Fprintln(stdout, "OK")
		return exitOK
	}
	for _, p := range ps {
		fmt.Fprintln(stdout, " ", p)
	}
	if daemon.Fatal(ps) {
		return exitConfig
	}
	fmt.Fprintln(stdout, "OK, with warnings")
	return exitOK
}

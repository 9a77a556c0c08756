package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"chatd/storage"
)

// ErrConfig marks a configuration error: permanent, so the service manager
// must not restart chatd for it (exit code 2).
var ErrConfig = errors.New("configuration error")

// RunOptions are the hooks the command passes to Main.
type RunOptions struct {
	Logger *slog.Logger
	// Listener, when set, is the API socket (from systemd's socket
	// activation); otherwise Main creates cfg.Socket.
	Listener net.Listener
	// Ready is called once the state is open and the API listens.
	Ready func()
	// OnStatus receives a one-line status on every change.
	OnStatus func(string)
	// Started is called with the daemon once it exists (the watchdog
	// watches its Alive).
	Started func(*Daemon)
	// Dialer and Clock override the real ones (tests).
	Dialer Dialer
	Clock  Clock
}

// Main runs chatd with cfg until ctx ends: it opens the state database,
// creates the API socket and keeps the identity logged in.
func Main(ctx context.Context, cfg Config, o RunOptions) error {
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	if ps := cfg.Check(); Fatal(ps) {
		for _, p := range ps {
			log.Error("config", "problem", p.String())
		}
		return fmt.Errorf("%w: run chatd --check-config for details", ErrConfig)
	}
	store, err := storage.OpenBolt(cfg.StateDB, storage.BoltOptions{LockTimeout: 2 * time.Second, Logger: log})
	if errors.Is(err, storage.ErrNewerSchema) {
		return fmt.Errorf("%w: %v", ErrConfig, err)
	}
	if err != nil {
		return fmt.Errorf("opening the state database: %w", err)
	}
	defer store.Close()
	if p := store.MovedAside(); p != "" {
		log.Error("THE STATE DATABASE WAS UNREADABLE AND HAS BEEN MOVED ASIDE; starting clean: a credential is needed (usersig_file, usersig_command or chatctl login)", "moved_to", p, "path", cfg.StateDB)
	}

	d, err := New(Options{Config: cfg, Store: store, Logger: log, OnStatus: o.OnStatus, Dialer: o.Dialer, Clock: o.Clock})
	if err != nil {
		return fmt.Errorf("%w: %v", ErrConfig, err)
	}
	if o.Started != nil {
		o.Started(d)
	}

	ln := o.Listener
	if ln == nil {
		gid := -1
		if cfg.API.SocketGroup != "" {
			if gid, err = lookupGroup(cfg.API.SocketGroup); err != nil {
				return fmt.Errorf("%w: api.socket_group: %v", ErrConfig, err)
			}
		}
		if ln, err = ListenSocket(cfg.Socket, gid); err != nil {
			return err
		}
	}
	opGID := -1
	if cfg.API.OperatorGroup != "" {
		if opGID, err = lookupGroup(cfg.API.OperatorGroup); err != nil {
			return fmt.Errorf("%w: api.operator_group: %v", ErrConfig, err)
		}
	}
	api := NewAPI(APIOptions{Backend: d, Logger: log, OperatorGID: opGID, DaemonUID: os.Getuid()})

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	apiDone := make(chan error, 1)
	go func() { apiDone <- ServeAPI(ctx, ln, api) }()
	runDone := make(chan error, 1)
	go func() { runDone <- d.Run(ctx) }()
	log.Info("chatd running", "socket", ln.Addr().String(), "state", cfg.StateDB, "broker", []string(cfg.Broker))
	if o.Ready != nil {
		o.Ready()
	}
	select {
	case err := <-runDone:
		cancel()
		<-apiDone
		return err
	case err := <-apiDone:
		cancel()
		<-runDone
		if err != nil {
			return fmt.Errorf("local API: %w", err)
		}
		return nil
	}
}

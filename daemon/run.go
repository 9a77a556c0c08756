package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"chatd/localapi"
	"chatd/storage"
)

// ErrConfig marks a configuration error: permanent, so the service manager
// must not restart chatd for it (exit code 2).
var ErrConfig = errors.New("configuration error")

// The daemon is what the local API serves.
var _ localapi.Backend = (*Daemon)(nil)

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
	var (
		store      storage.Store
		notPersist string
	)
	bolt, err := storage.OpenBolt(cfg.StateDB, storage.BoltOptions{LockTimeout: 2 * time.Second, Logger: log})
	switch {
	case errors.Is(err, storage.ErrNewerSchema):
		return fmt.Errorf("%w: %v", ErrConfig, err)
	case err != nil && storage.Unavailable(err):
		// A read-only or failing SD card must not make a crash loop: run
		// on in memory, starting from what the file still holds.
		notPersist = err.Error()
		mem := storage.NewMemory()
		if st, rerr := storage.ReadState(cfg.StateDB); rerr == nil {
			mem.Save(st)
		}
		mem.FailWrites(err)
		store = mem
		log.Error("THE STATE DIRECTORY CANNOT BE WRITTEN; running on in-memory state: logins and logouts will not survive a restart", "path", cfg.StateDB, "err", err)
	case err != nil:
		return fmt.Errorf("opening the state database: %w", err)
	default:
		store = bolt
		defer bolt.Close()
		switch p := bolt.MovedAside(); {
		case p != "" && bolt.Salvaged():
			log.Error("the state database was damaged: its state was saved into a new file and the damaged one moved aside", "moved_to", p, "path", cfg.StateDB)
		case p != "":
			log.Error("THE STATE DATABASE WAS UNREADABLE AND HAS BEEN MOVED ASIDE; starting clean: a credential is needed (usersig_file, usersig_command or chatctl login)", "moved_to", p, "path", cfg.StateDB)
		}
	}

	d, err := New(Options{Config: cfg, Store: store, Logger: log, OnStatus: o.OnStatus, Dialer: o.Dialer, Clock: o.Clock, StateNotPersisted: notPersist})
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
		if ln, err = localapi.ListenSocket(cfg.Socket, gid); err != nil {
			return err
		}
	}
	opGID := -1
	if cfg.API.OperatorGroup != "" {
		if opGID, err = lookupGroup(cfg.API.OperatorGroup); err != nil {
			return fmt.Errorf("%w: api.operator_group: %v", ErrConfig, err)
		}
	}
	api := localapi.New(localapi.Options{Backend: d, Logger: log, OperatorGID: opGID, DaemonUID: os.Getuid()})

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	apiDone := make(chan error, 1)
	go func() { apiDone <- api.Serve(ctx, ln) }()
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

package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"
)

// ServeConfig is everything `chatgw serve` runs.
type ServeConfig struct {
	Options
	// EmbeddedBroker, when set, starts the in-process broker on this
	// host:port; otherwise Broker is used.
	EmbeddedBroker string
	Broker         BrokerOptions
	// Admin is a Unix socket path or a loopback host:port; empty: none.
	Admin string
	// RateLimit is the per-device message rate, at the embedded broker and
	// at the gateway (default DefaultRateLimit).
	RateLimit RateLimit
	// MaxExpiredAge is the embedded broker's bound on expired UserSigs
	// (default DefaultMaxExpiredAge).
	MaxExpiredAge time.Duration
	// AdminGID, for a socket path, is the group given the socket (mode
	// 0660); 0 leaves it the process's own group (root needs no group).
	AdminGID int
	// Started, when set, is called with the gateway before it serves (for
	// the service manager's watchdog and status line).
	Started func(*Gateway)
	// Ready, when set, is called once the broker listens, the state is
	// loaded, the admin API is up and the gateway is subscribed, with the
	// broker's and the admin API's addresses.
	Ready func(broker, admin net.Addr)
}

// Run serves until ctx ends. A nil return is a clean shutdown.
func Run(ctx context.Context, cfg ServeConfig) error {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
		cfg.Logger = log
	}
	// With the embedded broker, every device connection ended with the
	// previous run.
	cfg.NoSurvivors = cfg.EmbeddedBroker != ""
	g, err := New(cfg.Options)
	if err != nil {
		return err
	}
	defer g.Close()

	bo := cfg.Broker
	if bo.RateLimit == (RateLimit{}) {
		bo.RateLimit = cfg.RateLimit
	}
	var brokerAddr net.Addr
	if cfg.EmbeddedBroker != "" {
		emb, err := StartEmbedded(EmbeddedOptions{
			Addr: cfg.EmbeddedBroker, Topics: g.topics, SDKAppID: cfg.SDKAppID, Key: cfg.Key, Now: g.now, Logger: log,
			RateLimit: cfg.RateLimit, MaxExpiredAge: cfg.MaxExpiredAge, stats: g.stats,
		})
		if err != nil {
			return err
		}
		defer emb.Close()
		eo := emb.BrokerOptions()
		bo.ClientID, bo.Dial = eo.ClientID, eo.Dial
		brokerAddr = emb.Addr()
		log.Info("embedded broker listening", "addr", brokerAddr.String(), "topics", g.topics.UpFilter())
	} else if bo.URL == "" {
		return errors.New("no broker: pass --embedded-broker HOST:PORT or --broker URL")
	}

	var adminAddr net.Addr
	srvErr := make(chan error, 1)
	if cfg.Admin != "" {
		gid := -1
		if cfg.AdminGID > 0 {
			gid = cfg.AdminGID
		}
		ln, err := ListenAdmin(cfg.Admin, gid)
		if err != nil {
			return err
		}
		adminAddr = ln.Addr()
		hs := &http.Server{Handler: g.AdminHandler(), ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second, WriteTimeout: 30 * time.Second}
		go func() { srvErr <- hs.Serve(ln) }()
		defer func() {
			sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			hs.Shutdown(sctx)
		}()
		log.Info("admin API listening", "addr", adminAddr.String())
	}
	if cfg.Started != nil {
		cfg.Started(g)
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- g.Serve(ctx, bo) }()
	if cfg.Ready != nil {
		// Ready means devices get answers: wait for the subscription.
		select {
		case <-g.subscribed:
			cfg.Ready(brokerAddr, adminAddr)
		case err := <-serveErr:
			return err
		}
	}
	select {
	case err := <-serveErr:
		return err
	case err := <-srvErr:
		return fmt.Errorf("admin API: %w", err)
	}
}

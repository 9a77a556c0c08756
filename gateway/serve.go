package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// ServeConfig is everything `chatgw serve` runs.
type ServeConfig struct {
	Options
	// EmbeddedBroker, when set, starts the in-process broker on this
	// host:port; otherwise Broker is used.
	EmbeddedBroker string
	Broker         BrokerOptions
	// NATS, when its URLs are set, serves the devices of a NATS cluster
	// (ServeNATS) instead of an MQTT broker; EmbeddedBroker and Broker.URL
	// must then be empty.
	NATS NATSOptions
	// KVBucket and KVReplicas name the JetStream key-value bucket of the
	// gateways' shared state on NATS, and its replicas (default
	// DefaultKVBucket, and DefaultKVReplicas on a cluster, 1 on a
	// standalone server); see Run.
	KVBucket   string
	KVReplicas int
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

	// For tests: the embedded broker's queue of pending writes per client
	// (0: maxPendingToGateway), the socket send buffer of the gateway's
	// own connection to it (0: the system's), and a wrapper of that
	// connection.
	embeddedPending    int
	embeddedPipeBuffer int
	wrapGatewayConn    func(net.Conn) net.Conn
}

// DefaultKVBucket and DefaultKVReplicas are the shared state's bucket on
// NATS when ServeConfig names none.
const (
	DefaultKVBucket   = "chatgw"
	DefaultKVReplicas = 3
)

// Run serves until ctx ends. A nil return is a clean shutdown.
func Run(ctx context.Context, cfg ServeConfig) error {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
		cfg.Logger = log
	}
	onNATS := len(cfg.NATS.URLs) > 0 || cfg.NATS.Conn != nil
	if onNATS && (cfg.EmbeddedBroker != "" || cfg.Broker.URL != "") {
		return errors.New("choose one of --nats, --broker and --embedded-broker")
	}
	// With the embedded broker, every device connection ended with the
	// previous run.
	cfg.NoSurvivors = cfg.EmbeddedBroker != ""
	no := cfg.NATS
	if onNATS {
		if no.RateLimit == (RateLimit{}) {
			no.RateLimit = cfg.RateLimit
		}
		if no.Queue == "" {
			no.Queue = DefaultNATSQueue
		}
		if no.Conn == nil {
			nc, err := DialNATS(no)
			if err != nil {
				return err
			}
			defer nc.Close()
			no.Conn = nc
		}
		// On NATS the state is the cluster's: every gateway of the fleet
		// shares the key-value bucket, one record per user.
		if cfg.Store == nil {
			js, err := jetstream.New(no.Conn)
			if err != nil {
				return fmt.Errorf("JetStream on NATS: %w", err)
			}
			bucket, replicas := cfg.KVBucket, cfg.KVReplicas
			if bucket == "" {
				bucket = DefaultKVBucket
			}
			if replicas == 0 {
				replicas = DefaultKVReplicas
				if no.Conn.ConnectedClusterName() == "" {
					replicas = 1 // a standalone server keeps one copy
				}
			}
			st, err := openSharedState(ctx, js, KVOptions{Bucket: bucket, Replicas: replicas, Logger: log}, log)
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return err
			}
			defer st.Close()
			cfg.Store = st
			log.Info("gateway state on NATS", "bucket", bucket, "replicas", replicas)
		}
	}
	g, err := NewContext(ctx, cfg.Options)
	if err != nil {
		if ctx.Err() != nil {
			return nil // told to stop while starting
		}
		return err
	}
	defer g.Close()

	bo := cfg.Broker
	if bo.RateLimit == (RateLimit{}) {
		bo.RateLimit = cfg.RateLimit
	}
	var brokerAddr net.Addr
	if onNATS {
		log.Info("serving devices on NATS", "servers", no.Conn.Servers(), "queue", no.Queue)
	} else if cfg.EmbeddedBroker != "" {
		emb, err := StartEmbedded(EmbeddedOptions{
			Addr: cfg.EmbeddedBroker, Topics: g.topics, SDKAppID: cfg.SDKAppID, Key: cfg.Key, Now: g.now, Logger: log,
			RateLimit: cfg.RateLimit, MaxExpiredAge: cfg.MaxExpiredAge, stats: g.stats, Busy: g.brokerDropped, pending: cfg.embeddedPending, pipeBuffer: cfg.embeddedPipeBuffer,
		})
		if err != nil {
			return err
		}
		defer emb.Close()
		eo := emb.BrokerOptions()
		bo.ClientID, bo.Dial = eo.ClientID, eo.Dial
		if wrap := cfg.wrapGatewayConn; wrap != nil {
			bo.Dial = func(ctx context.Context) (net.Conn, error) {
				c, err := eo.Dial(ctx)
				if err != nil {
					return nil, err
				}
				return wrap(c), nil
			}
		}
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
	if onNATS {
		go func() { serveErr <- g.ServeNATS(ctx, no) }()
	} else {
		go func() { serveErr <- g.Serve(ctx, bo) }()
	}
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

// openSharedState opens the state bucket, waiting while JetStream is not
// ready yet (a cluster still electing its leaders, a node starting): a
// gateway started with its cluster comes up with it instead of failing.
// A refusal that waiting cannot cure (permissions, a bad bucket name) ends
// it at once.
func openSharedState(ctx context.Context, js jetstream.JetStream, o KVOptions, log *slog.Logger) (StateStore, error) {
	wait := 250 * time.Millisecond
	for {
		octx, cancel := context.WithTimeout(ctx, 10*time.Second)
		st, err := OpenKV(octx, js, o)
		cancel()
		if err == nil {
			return st, nil
		}
		if !kvRetryable(err) || ctx.Err() != nil {
			return nil, fmt.Errorf("opening the state bucket %q on NATS: %w", o.Bucket, err)
		}
		log.Warn("the state bucket is not available yet; retrying", "bucket", o.Bucket, "err", err, "in", wait)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(wait):
		}
		wait = min(2*wait, 5*time.Second)
	}
}

func kvRetryable(err error) bool {
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, jetstream.ErrJetStreamNotEnabled) || errors.Is(err, nats.ErrNoResponders) ||
		errors.Is(err, jetstream.ErrNoHeartbeat) || errors.Is(err, nats.ErrConnectionReconnecting) ||
		errors.Is(err, nats.ErrDisconnected)
}

package main

import (
	"chatd/codes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"chatd/gateway"
	"chatd/mqtt"
	"chatd/usersig"
)

// cliError carries an exit code; msg "" means already reported.
type cliError struct {
	code int
	msg  string
}

func (e *cliError) Error() string { return e.msg }

func usageErr(format string, a ...any) error {
	return &cliError{code: exitConfig, msg: fmt.Sprintf(format, a...)}
}

const usage = `chatgw: the login gateway for chatd devices

Usage:
  chatgw serve [flags]                 run the gateway (see chatgw serve --help)
  chatgw usersig gen --sdkappid N --key-file F --user U [--expire SECONDS] [--userbuf TEXT]
  chatgw usersig verify --sdkappid N --key-file F --user U SIG
  chatgw usersig decode SIG
  chatgw --version
`

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return &cliError{code: exitConfig}
	}
	switch args[0] {
	case "--version", "-version", "version":
		fmt.Fprintln(stdout, "chatgw", version)
		return nil
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return nil
	case "serve":
		return serve(ctx, args[1:], stderr)
	case "usersig":
		if len(args) < 2 {
			return usageErr("usersig needs a subcommand: gen, verify or decode")
		}
		switch args[1] {
		case "gen":
			return usersigGen(args[2:], stdout, stderr)
		case "verify":
			return usersigVerify(args[2:], stdout, stderr)
		case "decode":
			return usersigDecode(args[2:], stdout, stderr)
		}
		return usageErr("unknown usersig subcommand %q: use gen, verify or decode", args[1])
	}
	return usageErr("unknown command %q\n%s", args[0], usage)
}

// fileConfig is the TOML config of `chatgw serve --config`.
type fileConfig struct {
	SDKAppID           uint64 `toml:"sdkappid"`
	KeyFile            string `toml:"key_file"`
	EmbeddedBroker     string `toml:"embedded_broker"`
	Broker             string `toml:"broker"`
	BrokerUsername     string `toml:"broker_username"`
	BrokerPasswordFile string `toml:"broker_password_file"`
	BrokerClientID     string `toml:"broker_client_id"`
	TLSCA              string `toml:"tls_ca"`
	TLSCert            string `toml:"tls_cert"`
	TLSKey             string `toml:"tls_key"`
	State              string `toml:"state"`
	Admin              string `toml:"admin"`
	Policy             string `toml:"policy"`
	MaxInstances       string `toml:"max_instances"`
	KickedOffline      string `toml:"kicked_offline"` // "succeed" (default) or "fail"
	TopicPrefix        string `toml:"topic_prefix"`
	LogLevel           string `toml:"log_level"`
	// Per-device message rate (messages per second) and burst, at the
	// embedded broker and at the gateway.
	DeviceRate  float64 `toml:"device_rate"`
	DeviceBurst int     `toml:"device_burst"`
	// How long after its expiry a UserSig still gets a device onto the
	// embedded broker (a Go duration, default 24h).
	ExpiredUserSigGrace string `toml:"expired_usersig_grace"`
}

func serve(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("chatgw serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var fc fileConfig
	configPath := fs.String("config", "", "TOML config file; flags override it")
	fs.Func("sdkappid", "the app's SDKAppID", func(s string) error {
		n, err := strconv.ParseUint(s, 10, 64)
		fc.SDKAppID = n
		return err
	})
	str := func(p *string, name, help string) { fs.Func(name, help, func(s string) error { *p = s; return nil }) }
	var o fileConfig
	str(&o.KeyFile, "key-file", "file holding the app's secret key (never pass the key itself)")
	str(&o.EmbeddedBroker, "embedded-broker", "run an MQTT broker in-process on HOST:PORT for devices")
	str(&o.Broker, "broker", "external broker URL (tcp://host:1883, ssl://host:8883)")
	str(&o.BrokerUsername, "broker-username", "username on the external broker")
	str(&o.BrokerPasswordFile, "broker-password-file", "file holding the broker password")
	str(&o.BrokerClientID, "client-id", "the gateway's MQTT client id on an external broker; keep it secret (default: a random one kept in the state file)")
	fs.Func("device-rate", "messages per second one device may send on average (default 10)", func(s string) error {
		v, err := strconv.ParseFloat(s, 64)
		if err != nil || v <= 0 {
			return errors.New("a positive number of messages per second")
		}
		o.DeviceRate = v
		return nil
	})
	fs.Func("device-burst", "messages one device may send at once above its rate (default 20)", func(s string) error {
		v, err := strconv.Atoi(s)
		if err != nil || v < 1 {
			return errors.New("a positive whole number")
		}
		o.DeviceBurst = v
		return nil
	})
	str(&o.ExpiredUserSigGrace, "expired-usersig-grace", "embedded broker: how long after expiry a UserSig still connects, to hear 70001 (default 24h)")
	str(&o.TLSCA, "tls-ca", "CA certificate file for ssl:// brokers")
	str(&o.TLSCert, "tls-cert", "client certificate file")
	str(&o.TLSKey, "tls-key", "client key file")
	str(&o.State, "state", "state file (bbolt); empty keeps sessions in memory only")
	str(&o.Admin, "admin", "admin API: a Unix socket path or a loopback HOST:PORT")
	str(&o.Policy, "policy", "multi-client policy: single, dual, triple or multi (default single)")
	str(&o.MaxInstances, "max-instances", "instances per platform: N, or Platform=N,... (default 1; Web up to 10, others up to 3)")
	str(&o.KickedOffline, "kicked-offline", "first login after a kick while offline: succeed (default) or fail (6208)")
	str(&o.TopicPrefix, "topic-prefix", "MQTT topic prefix (default chat)")
	str(&o.LogLevel, "log-level", "debug, info, warn or error (default info)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return &cliError{code: exitConfig}
	}
	if fs.NArg() > 0 {
		return usageErr("serve takes no arguments, got %q", fs.Args())
	}
	// Flags were collected into o; the file goes under them.
	flagSDKAppID := fc.SDKAppID
	if *configPath != "" {
		md, err := toml.DecodeFile(*configPath, &fc)
		if err != nil {
			return usageErr("config %s: %v", *configPath, err)
		}
		if und := md.Undecoded(); len(und) > 0 {
			return usageErr("config %s: unknown keys %v", *configPath, und)
		}
	}
	if flagSDKAppID != 0 {
		fc.SDKAppID = flagSDKAppID
	}
	overlay(&fc, o)
	cfg, err := buildServeConfig(fc)
	if err != nil {
		return usageErr("%v", err)
	}
	cfg.Logger = newLogger(stderr, fc.LogLevel)
	return gateway.Run(ctx, cfg)
}

// overlay copies the non-empty string fields of o over fc.
func overlay(fc *fileConfig, o fileConfig) {
	set := func(dst *string, v string) {
		if v != "" {
			*dst = v
		}
	}
	set(&fc.KeyFile, o.KeyFile)
	set(&fc.EmbeddedBroker, o.EmbeddedBroker)
	set(&fc.Broker, o.Broker)
	set(&fc.BrokerUsername, o.BrokerUsername)
	set(&fc.BrokerPasswordFile, o.BrokerPasswordFile)
	set(&fc.TLSCA, o.TLSCA)
	set(&fc.TLSCert, o.TLSCert)
	set(&fc.TLSKey, o.TLSKey)
	set(&fc.State, o.State)
	set(&fc.Admin, o.Admin)
	set(&fc.Policy, o.Policy)
	set(&fc.MaxInstances, o.MaxInstances)
	set(&fc.KickedOffline, o.KickedOffline)
	set(&fc.TopicPrefix, o.TopicPrefix)
	set(&fc.LogLevel, o.LogLevel)
	set(&fc.BrokerClientID, o.BrokerClientID)
	set(&fc.ExpiredUserSigGrace, o.ExpiredUserSigGrace)
	if o.DeviceRate != 0 {
		fc.DeviceRate = o.DeviceRate
	}
	if o.DeviceBurst != 0 {
		fc.DeviceBurst = o.DeviceBurst
	}
}

func buildServeConfig(fc fileConfig) (gateway.ServeConfig, error) {
	var cfg gateway.ServeConfig
	if fc.SDKAppID == 0 {
		return cfg, errors.New("--sdkappid is required (the app's SDKAppID)")
	}
	if fc.KeyFile == "" {
		return cfg, errors.New("--key-file is required (a file holding the app's secret key)")
	}
	key, err := usersig.LoadKeyFile(fc.KeyFile)
	if err != nil {
		return cfg, err
	}
	cfg.SDKAppID = fc.SDKAppID
	cfg.Key = key
	if fc.Policy != "" {
		if cfg.Policy, err = gateway.ParsePolicy(fc.Policy); err != nil {
			return cfg, err
		}
	}
	if cfg.Instances, err = gateway.ParseInstances(fc.MaxInstances); err != nil {
		return cfg, err
	}
	switch fc.KickedOffline {
	case "", "succeed":
	case "fail":
		cfg.KickedOfflineFails = true
	default:
		return cfg, fmt.Errorf("kicked-offline %q: use succeed or fail", fc.KickedOffline)
	}
	if cfg.Topics, err = mqtt.NewTopics(fc.TopicPrefix); err != nil {
		return cfg, err
	}
	cfg.StatePath = fc.State
	cfg.Admin = fc.Admin
	if fc.DeviceRate < 0 || fc.DeviceBurst < 0 {
		return cfg, errors.New("device_rate and device_burst must be positive")
	}
	cfg.RateLimit = gateway.DefaultRateLimit
	if fc.DeviceRate > 0 {
		cfg.RateLimit.Rate = fc.DeviceRate
	}
	if fc.DeviceBurst > 0 {
		cfg.RateLimit.Burst = fc.DeviceBurst
	}
	if fc.ExpiredUserSigGrace != "" {
		d, err := time.ParseDuration(fc.ExpiredUserSigGrace)
		if err != nil || d <= 0 {
			return cfg, fmt.Errorf("expired-usersig-grace %q: use a positive duration such as 24h", fc.ExpiredUserSigGrace)
		}
		if fc.EmbeddedBroker == "" {
			return cfg, errors.New("expired-usersig-grace applies to the embedded broker only: on an external broker the broker's own accounts decide who connects")
		}
		cfg.MaxExpiredAge = d
	}
	if fc.BrokerClientID != "" {
		if fc.EmbeddedBroker != "" {
			return cfg, errors.New("client-id applies to an external broker only: on the embedded broker the gateway's connection is in-process and cannot be claimed")
		}
		if err := mqtt.ValidateInstanceID(fc.BrokerClientID); err != nil {
			return cfg, fmt.Errorf("client-id: %v", err)
		}
		if fc.BrokerClientID == "chatgw" || len(fc.BrokerClientID) < 16 {
			return cfg, fmt.Errorf("client-id %q is guessable: any device account that uses it pushes the gateway off the broker; use 16 or more random characters, or leave it unset for a random one kept in the state file", fc.BrokerClientID)
		}
	}
	switch {
	case fc.EmbeddedBroker != "" && fc.Broker != "":
		return cfg, errors.New("choose one of --embedded-broker and --broker")
	case fc.EmbeddedBroker != "":
		cfg.EmbeddedBroker = fc.EmbeddedBroker
	case fc.Broker != "":
		cfg.Broker.URL = fc.Broker
		cfg.Broker.ClientID = fc.BrokerClientID
		cfg.Broker.Username = fc.BrokerUsername
		if fc.BrokerPasswordFile != "" {
			b, err := os.ReadFile(fc.BrokerPasswordFile)
			if err != nil {
				return cfg, fmt.Errorf("broker password file: %w", err)
			}
			cfg.Broker.Password = strings.TrimSpace(string(b))
		}
		if fc.TLSCA != "" || fc.TLSCert != "" {
			tc, err := mqtt.LoadTLS(fc.TLSCA, fc.TLSCert, fc.TLSKey)
			if err != nil {
				return cfg, err
			}
			cfg.Broker.TLS = tc
		}
	default:
		return cfg, errors.New("no broker: pass --embedded-broker HOST:PORT (for example 127.0.0.1:1883) or --broker URL")
	}
	return cfg, nil
}

func newLogger(w io.Writer, level string) *slog.Logger {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil || level == "" {
		l = slog.LevelInfo
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: l}))
}

// usersigFlags are the flags shared by gen and verify.
type usersigFlags struct {
	sdkappid uint64
	keyFile  string
	user     string
}

func (u *usersigFlags) register(fs *flag.FlagSet) {
	fs.Uint64Var(&u.sdkappid, "sdkappid", 0, "the app's SDKAppID")
	fs.StringVar(&u.keyFile, "key-file", "", "file holding the app's secret key")
	fs.StringVar(&u.user, "user", "", "the UserID")
}

func (u *usersigFlags) key() (usersig.Secret, error) {
	if u.sdkappid == 0 || u.keyFile == "" || u.user == "" {
		return usersig.Secret{}, usageErr("--sdkappid, --key-file and --user are required")
	}
	k, err := usersig.LoadKeyFile(u.keyFile)
	if err != nil {
		return k, usageErr("%v", err)
	}
	return k, nil
}

func usersigGen(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("chatgw usersig gen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var u usersigFlags
	u.register(fs)
	expire := fs.Int64("expire", 86400*180, "lifetime in seconds (Tencent recommends at least 86400)")
	userbuf := fs.String("userbuf", "", "optional userbuf (privilege map), as text")
	if err := fs.Parse(args); err != nil {
		return &cliError{code: exitConfig}
	}
	key, err := u.key()
	if err != nil {
		return err
	}
	if *expire <= 0 {
		return usageErr("--expire must be a positive number of seconds")
	}
	if err := mqtt.ValidateUserID(u.user); err != nil {
		return usageErr("--user: %v", err)
	}
	d := time.Duration(*expire) * time.Second
	var sig string
	if *userbuf != "" {
		sig, err = usersig.GenerateWithUserBuf(u.sdkappid, key, u.user, d, []byte(*userbuf), time.Now())
	} else {
		sig, err = usersig.Generate(u.sdkappid, key, u.user, d, time.Now())
	}
	if err != nil {
		return usageErr("%v", err)
	}
	fmt.Fprintln(stdout, sig)
	return nil
}

func sigArg(fs *flag.FlagSet) (string, error) {
	if fs.NArg() != 1 {
		return "", usageErr("give the UserSig as the one argument (or - to read it from standard input)")
	}
	s := fs.Arg(0)
	if s == "-" {
		b, err := io.ReadAll(io.LimitReader(os.Stdin, 64<<10))
		if err != nil {
			return "", err
		}
		s = string(b)
	}
	return strings.TrimSpace(s), nil
}

func usersigVerify(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("chatgw usersig verify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var u usersigFlags
	u.register(fs)
	if err := fs.Parse(args); err != nil {
		return &cliError{code: exitConfig}
	}
	key, err := u.key()
	if err != nil {
		return err
	}
	sig, err := sigArg(fs)
	if err != nil {
		return err
	}
	t, err := usersig.Verify(sig, u.sdkappid, key, u.user, time.Now())
	code := usersig.CodeOf(err)
	if err == nil {
		fmt.Fprintf(stdout, "0 OK: valid for %q until %s\n", t.Identifier, t.ExpiresAt().UTC().Format(time.RFC3339))
		return nil
	}
	fmt.Fprintf(stdout, "%d %s\n", code, codes.Text(code))
	return &cliError{code: exitFailure, msg: err.Error()}
}

func usersigDecode(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("chatgw usersig decode", flag.ContinueOnError)
	fs.SetOutput(stderr)
	if err := fs.Parse(args); err != nil {
		return &cliError{code: exitConfig}
	}
	sig, err := sigArg(fs)
	if err != nil {
		return err
	}
	t, err := usersig.Decode(sig)
	if err != nil {
		return &cliError{code: exitFailure, msg: err.Error()}
	}
	out := struct {
		*usersig.Ticket
		ExpiresAt string `json:"expires_at"`
	}{t, t.ExpiresAt().UTC().Format(time.RFC3339)}
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(out)
}

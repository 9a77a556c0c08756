package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/user"
	"strconv"
	"strings"
	"time"

	"chatd/codes"
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
  chatgw nats-accounts --devices FILE --gateway-password-file FILE [flags]
                                       write the accounts of a fleet on NATS
  chatgw mosquitto-dynsec --fleet F --gateway-client-id ID --gateway-password-file F [--out FILE]
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
	case "nats-accounts":
		return natsAccounts(args[1:], stdout, stderr)
	case "mosquitto-dynsec":
		return mosquittoDynsec(args[1:], stdout, stderr)
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

func serve(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("chatgw serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	sf := newServeFlags(fs)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return &cliError{code: exitConfig}
	}
	if fs.NArg() > 0 {
		return usageErr("serve takes no arguments, got %q", fs.Args())
	}
	fc, err := sf.load()
	if err != nil {
		if sf.configured {
			// Let the unit start so that it fails visibly (exit 2)
			// instead of being skipped as "not configured".
			fmt.Fprintln(stderr, "chatgw:", err)
			return nil
		}
		return usageErr("%v", err)
	}
	if sf.configured {
		if m := fc.missing(); m != "" {
			where := "the command line"
			if sf.config != "" {
				where = sf.config
			}
			fmt.Fprintf(stderr, "chatgw: %s does not set %s yet; not starting\n", where, m)
			return &cliError{code: exitFailure}
		}
		return nil
	}
	cfg, err := buildServeConfig(fc)
	if err != nil {
		return usageErr("%v", err)
	}
	return runServe(ctx, cfg, fc.LogLevel, stderr)
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
			return cfg, fmt.Errorf("expired_usersig_grace %q: use a positive duration such as 24h", fc.ExpiredUserSigGrace)
		}
		if fc.EmbeddedBroker == "" {
			return cfg, errors.New("expired_usersig_grace applies to the embedded broker only: on an external broker the broker's own accounts decide who connects")
		}
		cfg.MaxExpiredAge = d
	}
	if fc.DynsecFloodBan != "" {
		d, err := time.ParseDuration(fc.DynsecFloodBan)
		if err != nil || d <= 0 {
			return cfg, fmt.Errorf("dynsec_flood_ban %q: use a positive duration such as 1m", fc.DynsecFloodBan)
		}
		if fc.EmbeddedBroker != "" {
			return cfg, errors.New("dynsec_flood_ban applies to Mosquitto with the dynamic-security plugin: the embedded broker cuts off flooding devices itself")
		}
		cfg.Broker.FloodBan = &gateway.FloodBan{Duration: d}
	}
	if fc.BrokerClientID != "" {
		if fc.EmbeddedBroker != "" {
			return cfg, errors.New("broker_client_id applies to an external broker only: on the embedded broker the gateway's connection is in-process and cannot be claimed")
		}
		if err := mqtt.ValidateInstanceID(fc.BrokerClientID); err != nil {
			return cfg, fmt.Errorf("broker_client_id: %v", err)
		}
		if fc.BrokerClientID == "chatgw" || len(fc.BrokerClientID) < 16 {
			return cfg, fmt.Errorf("broker_client_id %q is guessable: any device account that uses it pushes the gateway off the broker; use 16 or more random characters, or leave it unset for a random one kept in the state file", fc.BrokerClientID)
		}
	}
	if fc.AdminGroup != "" {
		if !strings.Contains(fc.Admin, "/") {
			return cfg, fmt.Errorf("admin_group %q: only an admin socket path has a group (admin is %q)", fc.AdminGroup, fc.Admin)
		}
		g, err := user.LookupGroup(fc.AdminGroup)
		if err != nil {
			return cfg, fmt.Errorf("admin_group %q: %v (create the group or name another)", fc.AdminGroup, err)
		}
		if cfg.AdminGID, err = strconv.Atoi(g.Gid); err != nil {
			return cfg, fmt.Errorf("admin_group %q: gid %q: %v", fc.AdminGroup, g.Gid, err)
		}
	}
	if err := natsServeConfig(fc, &cfg); err != nil {
		return cfg, err
	}
	switch {
	case fc.NATS != "":
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
		return cfg, errors.New("no broker: pass --embedded-broker HOST:PORT (for example 127.0.0.1:1883), --broker URL or --nats URL,...")
	}
	return cfg, nil
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

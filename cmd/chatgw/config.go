package main

import (
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
)

// DefaultConfigPath is where the chatgw package installs its config file.
// `chatgw serve` reads it only when --config names it (the unit does).
const DefaultConfigPath = "/etc/chatgw/chatgw.toml"

// fileConfig is the TOML config of `chatgw serve --config`. Every field is
// also a flag: options lists them, and a test checks the two agree.
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
	// A NATS cluster instead of an MQTT broker: the servers (comma
	// separated), the gateway's credentials and TLS, its queue group, and
	// the shared state's key-value bucket.
	NATS             string `toml:"nats"`
	NATSUser         string `toml:"nats_user"`
	NATSPasswordFile string `toml:"nats_password_file"`
	NATSCreds        string `toml:"nats_creds"`
	NATSNkey         string `toml:"nats_nkey"`
	NATSTLSCA        string `toml:"nats_tls_ca"`
	NATSTLSCert      string `toml:"nats_tls_cert"`
	NATSTLSKey       string `toml:"nats_tls_key"`
	NATSQueue        string `toml:"nats_queue"`
	NATSKVBucket     string `toml:"nats_kv_bucket"`
	NATSKVReplicas   int    `toml:"nats_kv_replicas"`
	NATSShards       int    `toml:"nats_shards"`
	State            string `toml:"state"`
	Admin            string `toml:"admin"`
	AdminGroup       string `toml:"admin_group"`
	Policy           string `toml:"policy"`
	MaxInstances     string `toml:"max_instances"`
	KickedOffline    string `toml:"kicked_offline"` // "succeed" (default) or "fail"
	TopicPrefix      string `toml:"topic_prefix"`
	LogLevel         string `toml:"log_level"`
	// Per-device message rate (messages per second) and burst, at the
	// embedded broker and at the gateway.
	DeviceRate  float64 `toml:"device_rate"`
	DeviceBurst int     `toml:"device_burst"`
	// How long after its expiry a UserSig still gets a device onto the
	// embedded broker (a Go duration, default 24h).
	ExpiredUserSigGrace string `toml:"expired_usersig_grace"`
	// How long a flooding device's account stays disabled through
	// Mosquitto's dynamic-security plugin (a Go duration; empty: never).
	DynsecFloodBan string `toml:"dynsec_flood_ban"`
}

// option is one setting of `chatgw serve`: the TOML key KEY is the flag
// --KEY with '_' written '-'.
type option struct {
	key  string
	arg  string // what the value is, in the help: N, FILE, URL, ...
	help string
	set  func(fc *fileConfig, v string) error
}

func str(p func(*fileConfig) *string) func(*fileConfig, string) error {
	return func(fc *fileConfig, v string) error { *p(fc) = v; return nil }
}

// options is the one list of serve's settings: flags, config keys, the
// --help text, and (through tests) the manual pages and the packaged
// config file.
var options = []option{
	{"sdkappid", "N", "the app's SDKAppID (required)", func(fc *fileConfig, v string) error {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil || n == 0 {
			return fmt.Errorf("%q is not an SDKAppID (a positive number)", v)
		}
		fc.SDKAppID = n
		return nil
	}},
	{"key_file", "FILE", "file holding the app's secret key (required; never pass the key itself)", str(func(fc *fileConfig) *string { return &fc.KeyFile })},
	{"embedded_broker", "HOST:PORT", "run an MQTT broker in-process on HOST:PORT for devices", str(func(fc *fileConfig) *string { return &fc.EmbeddedBroker })},
	{"broker", "URL", "external broker URL (tcp://host:1883, ssl://host:8883) instead of the embedded one", str(func(fc *fileConfig) *string { return &fc.Broker })},
	{"broker_username", "NAME", "username on the external broker", str(func(fc *fileConfig) *string { return &fc.BrokerUsername })},
	{"broker_password_file", "FILE", "file holding the external broker's password", str(func(fc *fileConfig) *string { return &fc.BrokerPasswordFile })},
	{"broker_client_id", "ID", "the gateway's MQTT client id on an external broker; keep it secret, 16 or more characters (default: a random one kept in the state file)", str(func(fc *fileConfig) *string { return &fc.BrokerClientID })},
	{"tls_ca", "FILE", "CA certificate file for ssl:// brokers (default: the system's CAs)", str(func(fc *fileConfig) *string { return &fc.TLSCA })},
	{"tls_cert", "FILE", "client certificate file for ssl:// brokers", str(func(fc *fileConfig) *string { return &fc.TLSCert })},
	{"tls_key", "FILE", "client key file for ssl:// brokers", str(func(fc *fileConfig) *string { return &fc.TLSKey })},
	{"nats", "URL,...", "a NATS cluster instead of an MQTT broker: its servers (nats://a:4222,nats://b:4222,...), tried in turn; devices connect to its MQTT listeners", str(func(fc *fileConfig) *string { return &fc.NATS })},
	{"nats_user", "NAME", "the gateway's NATS user", str(func(fc *fileConfig) *string { return &fc.NATSUser })},
	{"nats_password_file", "FILE", "file holding the NATS user's password", str(func(fc *fileConfig) *string { return &fc.NATSPasswordFile })},
	{"nats_creds", "FILE", "NATS credentials file (user JWT and nkey seed) instead of a user and password", str(func(fc *fileConfig) *string { return &fc.NATSCreds })},
	{"nats_nkey", "FILE", "NATS nkey seed file instead of a user and password", str(func(fc *fileConfig) *string { return &fc.NATSNkey })},
	{"nats_tls_ca", "FILE", "CA certificate file for the NATS servers (default: the system's CAs when TLS is on)", str(func(fc *fileConfig) *string { return &fc.NATSTLSCA })},
	{"nats_tls_cert", "FILE", "client certificate file for the NATS servers", str(func(fc *fileConfig) *string { return &fc.NATSTLSCert })},
	{"nats_tls_key", "FILE", "client key file for the NATS servers", str(func(fc *fileConfig) *string { return &fc.NATSTLSKey })},
	{"nats_queue", "NAME", "the queue group the fleet's gateways share on NATS (default chatgw)", str(func(fc *fileConfig) *string { return &fc.NATSQueue })},
	{"nats_kv_bucket", "NAME", "the JetStream key-value bucket of the gateways' shared state (default chatgw)", str(func(fc *fileConfig) *string { return &fc.NATSKVBucket })},
	{"nats_kv_replicas", "N", "replicas of that bucket, 1 to 5 (default 3 on a cluster, 1 on a standalone server)", func(fc *fileConfig, v string) error {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return fmt.Errorf("%q is not a positive whole number of replicas", v)
		}
		fc.NATSKVReplicas = n
		return nil
	}},
	{"nats_shards", "N", "the device accounts the fleet is spread over, as chatgw nats-accounts --shards wrote them (default 1; needs nats_user)", func(fc *fileConfig, v string) error {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return fmt.Errorf("%q is not a positive whole number of accounts", v)
		}
		fc.NATSShards = n
		return nil
	}},
	{"state", "FILE", "state file (bbolt); empty keeps sessions in memory only", str(func(fc *fileConfig) *string { return &fc.State })},
	{"admin", "ADDR", "admin API: a Unix socket path or a loopback HOST:PORT; empty: none", str(func(fc *fileConfig) *string { return &fc.Admin })},
	{"admin_group", "GROUP", "group given the admin socket (mode 0660); default: chatgw's own group", str(func(fc *fileConfig) *string { return &fc.AdminGroup })},
	{"policy", "NAME", "multi-client policy: single, dual, triple or multi (default single)", str(func(fc *fileConfig) *string { return &fc.Policy })},
	{"max_instances", "N|Platform=N,...", "instances per platform (default 1; Web up to 10, others up to 3)", str(func(fc *fileConfig) *string { return &fc.MaxInstances })},
	{"kicked_offline", "succeed|fail", "first login after a kick while offline: succeed (default) or fail (6208)", str(func(fc *fileConfig) *string { return &fc.KickedOffline })},
	{"topic_prefix", "PREFIX", "MQTT topic prefix (default chat)", str(func(fc *fileConfig) *string { return &fc.TopicPrefix })},
	{"log_level", "LEVEL", "debug, info, warn or error (default info)", str(func(fc *fileConfig) *string { return &fc.LogLevel })},
	{"device_rate", "N", "messages per second one device may send on average, at the embedded broker and the gateway (default 10)", func(fc *fileConfig, v string) error {
		r, err := strconv.ParseFloat(v, 64)
		if err != nil || r <= 0 {
			return fmt.Errorf("%q is not a positive number of messages per second", v)
		}
		fc.DeviceRate = r
		return nil
	}},
	{"device_burst", "N", "messages one device may send at once above its rate (default 20)", func(fc *fileConfig, v string) error {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return fmt.Errorf("%q is not a positive whole number", v)
		}
		fc.DeviceBurst = n
		return nil
	}},
	{"expired_usersig_grace", "DURATION", "embedded broker only: how long after its expiry a UserSig still connects, so the device hears 70001 (default 24h)", str(func(fc *fileConfig) *string { return &fc.ExpiredUserSigGrace })},
	{"dynsec_flood_ban", "DURATION", "Mosquitto with the dynamic-security plugin: disable a flooding device's account for this long (default: off)", str(func(fc *fileConfig) *string { return &fc.DynsecFloodBan })},
}

func (o option) flag() string { return strings.ReplaceAll(o.key, "_", "-") }

// serveFlags are the command line of `chatgw serve`.
type serveFlags struct {
	config     string
	configured bool
	// set holds the options given, in order, applied over the file.
	set []func(*fileConfig) error
}

func newServeFlags(fs *flag.FlagSet) *serveFlags {
	sf := &serveFlags{}
	fs.StringVar(&sf.config, "config", "", "TOML config file")
	fs.BoolVar(&sf.configured, "configured", false, "exit 0 if configured, 1 if not")
	for _, o := range options {
		o := o
		fs.Func(o.flag(), o.help, func(v string) error {
			// Checked at once, so a bad value is reported as the flag's.
			var probe fileConfig
			if err := o.set(&probe, v); err != nil {
				return err
			}
			sf.set = append(sf.set, func(fc *fileConfig) error { return o.set(fc, v) })
			return nil
		})
	}
	fs.Usage = func() { serveUsage(fs.Output()) }
	return sf
}

// serveUsage prints serve's --help: every option as a flag with its
// config key.
func serveUsage(w io.Writer) {
	fmt.Fprintf(w, `Usage: chatgw serve [--config FILE] [flags]

Runs the login gateway. Every setting is a flag and a key of the TOML
config file (chatgw.toml(5)); a flag overrides the file.

  --config FILE
        TOML config file (the package's: %s)
  --configured
        exit 0 if the config sets sdkappid, key_file and a broker, 1 if not
        (the unit's ExecCondition)
`, DefaultConfigPath)
	for _, o := range options {
		fmt.Fprintf(w, "  --%s %s  (key %s)\n        %s\n", o.flag(), o.arg, o.key, o.help)
	}
}

// load reads the config file, if any, and applies the flags over it.
func (sf *serveFlags) load() (fileConfig, error) {
	var fc fileConfig
	if sf.config != "" {
		md, err := toml.DecodeFile(sf.config, &fc)
		if err != nil {
			return fc, fmt.Errorf("config %s: %v", sf.config, err)
		}
		if und := md.Undecoded(); len(und) > 0 {
			return fc, fmt.Errorf("config %s: unknown keys %v (see chatgw.toml(5))", sf.config, und)
		}
	}
	for _, f := range sf.set {
		if err := f(&fc); err != nil {
			return fc, err
		}
	}
	return fc, nil
}

// missing says what a config lacks before the gateway can serve; "" when
// nothing (whether the files it names are usable is checked on start).
func (fc fileConfig) missing() string {
	var m []string
	if fc.SDKAppID == 0 {
		m = append(m, "sdkappid")
	}
	if fc.KeyFile == "" {
		m = append(m, "key_file")
	}
	if fc.EmbeddedBroker == "" && fc.Broker == "" && fc.NATS == "" {
		m = append(m, "embedded_broker, broker or nats")
	}
	return strings.Join(m, ", ")
}

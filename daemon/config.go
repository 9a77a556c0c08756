package daemon

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"chatd/mqtt"
)

// DefaultConfigPath is where chatd looks for its config.
const DefaultConfigPath = "/etc/chatd/chatd.toml"

// Config is chatd's configuration (chatd.toml). The top-level keys are the
// ones users and scripts rely on; the rest is grouped in sections.
type Config struct {
	SDKAppID       uint64          `toml:"sdkappid"`
	UserID         string          `toml:"user_id"`
	Platform       string          `toml:"platform"`
	Broker         Brokers         `toml:"broker"`
	UserSigFile    string          `toml:"usersig_file"`
	UserSigCommand string          `toml:"usersig_command"`
	StateDB        string          `toml:"state_db"`
	Socket         string          `toml:"socket"`
	MQTT           MQTTConfig      `toml:"mqtt"`
	Reconnect      ReconnectConfig `toml:"reconnect"`
	UserSig        UserSigConfig   `toml:"usersig"`
	Kick           KickConfig      `toml:"kick"`
	API            APIConfig       `toml:"api"`
	Log            LogConfig       `toml:"log"`
}

// Brokers is one broker URL or a list, tried in order.
type Brokers []string

// UnmarshalTOML accepts a string or an array of strings.
func (b *Brokers) UnmarshalTOML(v any) error {
	switch v := v.(type) {
	case string:
		*b = Brokers{v}
	case []any:
		out := make(Brokers, 0, len(v))
		for _, e := range v {
			s, ok := e.(string)
			if !ok {
				return fmt.Errorf("broker list holds %v (%T); write strings like \"tcp://host:1883\"", e, e)
			}
			out = append(out, s)
		}
		*b = out
	default:
		return fmt.Errorf("broker must be a URL string or a list of them, not %T", v)
	}
	return nil
}

// MQTTConfig is the [mqtt] section: how to reach the broker.
type MQTTConfig struct {
	// KeepAlive bounds how long a dead connection goes unnoticed (both
	// ends); the broker's Will tells the gateway after 1.5 keepalives.
	KeepAlive Duration `toml:"keepalive"`
	// ConnectTimeout bounds one connection attempt.
	ConnectTimeout Duration `toml:"connect_timeout"`
	// RequestTimeout bounds the wait for the gateway's answer.
	RequestTimeout Duration `toml:"request_timeout"`
	// Username and PasswordFile are a broker account (Mosquitto). Empty:
	// the UserID is the username and the UserSig the password (the
	// gateway's embedded broker).
	Username     string `toml:"username"`
	PasswordFile string `toml:"password_file"`
	// ClientID, when set, is the instance id (the MQTT client id) instead
	// of the random one chatd makes and keeps in its state: a broker that
	// binds client ids to accounts (Mosquitto's dynamic-security plugin)
	// needs the id it was provisioned with. Changing it starts a new
	// session under the new id.
	ClientID string `toml:"client_id"`
	// TLS for ssl:// brokers.
	TLSCA   string `toml:"tls_ca"`
	TLSCert string `toml:"tls_cert"`
	TLSKey  string `toml:"tls_key"`
	// TopicPrefix must match the gateway's.
	TopicPrefix string `toml:"topic_prefix"`
}

// ReconnectConfig is the [reconnect] section: jittered exponential backoff.
type ReconnectConfig struct {
	MinDelay Duration `toml:"min_delay"`
	MaxDelay Duration `toml:"max_delay"`
	// StableAfter is how long a connection must stay up before the backoff
	// starts again from MinDelay.
	StableAfter Duration `toml:"stable_after"`
}

// UserSigConfig is the [usersig] section.
type UserSigConfig struct {
	// RenewMargin: a new UserSig is fetched with usersig_command this long
	// before the current one expires (by the gateway's clock).
	RenewMargin Duration `toml:"renew_margin"`
	// CommandTimeout bounds one run of usersig_command.
	CommandTimeout Duration `toml:"command_timeout"`
}

// KickConfig is the [kick] section: what to do after being kicked offline.
type KickConfig struct {
	// After is "stay" (default, like the SDK: stay logged out until told)
	// or "relogin" (log in again after Delay, doubled with each kick up to
	// MaxDelay).
	After    string   `toml:"after"`
	Delay    Duration `toml:"relogin_delay"`
	MaxDelay Duration `toml:"relogin_max_delay"`
}

// APIConfig is the [api] section: the local socket's permissions.
type APIConfig struct {
	// SocketGroup owns the socket (mode 0660): its members may read status.
	SocketGroup string `toml:"socket_group"`
	// OperatorGroup's members may also log in and out (root and the
	// daemon's own user always may).
	OperatorGroup string `toml:"operator_group"`
}

// LogConfig is the [log] section.
type LogConfig struct {
	Level string `toml:"level"` // debug, info, warn, error
}

// Duration is a time.Duration written as "30s", "5m", "1h30m".
type Duration struct{ time.Duration }

// UnmarshalText parses a Go duration string.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("%q is not a duration; write it like \"30s\", \"5m\" or \"1h\"", b)
	}
	d.Duration = v
	return nil
}

// MarshalText writes the duration back.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// DefaultConfig is what an empty file means.
func DefaultConfig() Config {
	return Config{
		Platform: "Linux",
		Broker:   Brokers{"tcp://127.0.0.1:1883"},
		StateDB:  "/var/lib/chatd/state.db",
		Socket:   "/run/chatd/chatd.sock",
		MQTT: MQTTConfig{
			KeepAlive:      Duration{30 * time.Second},
			ConnectTimeout: Duration{10 * time.Second},
			RequestTimeout: Duration{15 * time.Second},
			TopicPrefix:    mqtt.DefaultPrefix,
		},
		Reconnect: ReconnectConfig{
			MinDelay:    Duration{time.Second},
			MaxDelay:    Duration{2 * time.Minute},
			StableAfter: Duration{time.Minute},
		},
		UserSig: UserSigConfig{
			RenewMargin:    Duration{time.Hour},
			CommandTimeout: Duration{30 * time.Second},
		},
		Kick: KickConfig{
			After:    "stay",
			Delay:    Duration{time.Minute},
			MaxDelay: Duration{time.Hour},
		},
		Log: LogConfig{Level: "info"},
	}
}

// LoadConfig reads a TOML file over the defaults. Unknown keys are errors,
// so a typo does not silently fall back to a default.
func LoadConfig(path string) (Config, error) {
	cfg := DefaultConfig()
	md, err := toml.DecodeFile(path, &cfg)
	if err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return cfg, fmt.Errorf("config %s: %s", path, pe.ErrorWithPosition())
		}
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		return cfg, fmt.Errorf("config %s: unknown key %s; see the commented default config for the known keys", path, strings.Join(keys, ", "))
	}
	return cfg, nil
}

// Problem is one finding of Check.
type Problem struct {
	Key   string
	Msg   string
	Fatal bool
}

func (p Problem) String() string {
	kind := "warning"
	if p.Fatal {
		kind = "error"
	}
	return fmt.Sprintf("%s: %s: %s", kind, p.Key, p.Msg)
}

// Check validates the configuration and says what to fix. It reads the
// files the config names but changes nothing.
func (c *Config) Check() []Problem {
	var ps []Problem
	bad := func(key, format string, a ...any) {
		ps = append(ps, Problem{Key: key, Msg: fmt.Sprintf(format, a...), Fatal: true})
	}
	warn := func(key, format string, a ...any) {
		ps = append(ps, Problem{Key: key, Msg: fmt.Sprintf(format, a...)})
	}
	if c.SDKAppID == 0 {
		bad("sdkappid", "not set; it is the app's SDKAppID, e.g. sdkappid = 1400000001")
	}
	if c.UserID != "" {
		if err := mqtt.ValidateUserID(c.UserID); err != nil {
			bad("user_id", "%v", err)
		}
	} else {
		warn("user_id", "not set: chatd starts logged out and waits for `chatctl login`")
	}
	if !mqtt.ValidPlatform(c.Platform) {
		bad("platform", "%q is not one of %s", c.Platform, strings.Join(mqtt.Platforms, ", "))
	}
	if len(c.Broker) == 0 {
		bad("broker", "no broker; e.g. broker = \"tcp://127.0.0.1:1883\"")
	}
	for _, b := range c.Broker {
		u, err := url.Parse(b)
		if err != nil || u.Scheme == "" {
			bad("broker", "%q is not a URL; write tcp://host:1883, ssl://host:8883 or unix:///path", b)
			continue
		}
		switch u.Scheme {
		case "tcp", "mqtt", "ssl", "tls", "mqtts", "ws", "wss":
			if u.Host == "" {
				bad("broker", "%q has no host:port", b)
			}
		case "unix":
			if u.Path == "" {
				bad("broker", "%q has no socket path; write unix:///run/mosquitto/mqtt.sock", b)
			}
		default:
			bad("broker", "%q: unknown scheme %q; use tcp, ssl or unix", b, u.Scheme)
		}
	}
	if c.UserSigFile != "" {
		// A careful operator removes the file once chatd holds the UserSig
		// in its state: a warning, not an error.
		if _, err := os.Stat(c.UserSigFile); err != nil {
			warn("usersig_file", "%v: chatd logs in with the UserSig kept in its state database, if it has one", err)
		}
	}
	if c.UserSigCommand != "" {
		if _, err := exec.LookPath(firstWord(c.UserSigCommand)); err != nil {
			bad("usersig_command", "%q cannot be run: %v", firstWord(c.UserSigCommand), err)
		}
	}
	if c.UserID != "" && c.UserSigFile == "" && c.UserSigCommand == "" {
		warn("usersig_file", "neither usersig_file nor usersig_command is set: chatd cannot log in by itself or renew the UserSig")
	}
	if c.StateDB == "" {
		bad("state_db", "not set")
	} else if !filepath.IsAbs(c.StateDB) {
		warn("state_db", "%q is relative to the working directory", c.StateDB)
	}
	if c.Socket == "" {
		bad("socket", "not set")
	}
	if c.MQTT.KeepAlive.Duration < 5*time.Second || c.MQTT.KeepAlive.Duration > 20*time.Minute {
		bad("mqtt.keepalive", "%s is outside 5s..20m (0 is refused by recent Mosquitto)", c.MQTT.KeepAlive)
	}
	if c.MQTT.ConnectTimeout.Duration <= 0 || c.MQTT.RequestTimeout.Duration <= 0 {
		bad("mqtt", "connect_timeout and request_timeout must be positive")
	}
	if (c.MQTT.TLSCert == "") != (c.MQTT.TLSKey == "") {
		bad("mqtt.tls_cert", "tls_cert and tls_key go together")
	}
	if c.MQTT.PasswordFile != "" && c.MQTT.Username == "" {
		bad("mqtt.username", "password_file is set but username is not")
	}
	if c.MQTT.ClientID != "" {
		if err := mqtt.ValidateInstanceID(c.MQTT.ClientID); err != nil {
			bad("mqtt.client_id", "%v", err)
		}
	}
	if c.MQTT.Username != "" && c.UserID != "" && c.MQTT.Username != c.UserID {
		warn("mqtt.username", "%q differs from user_id %q: the broker ACL template (%%u) expects the UserID as username", c.MQTT.Username, c.UserID)
	}
	if _, err := mqtt.NewTopics(c.MQTT.TopicPrefix); err != nil {
		bad("mqtt.topic_prefix", "%v", err)
	}
	if c.Reconnect.MinDelay.Duration <= 0 || c.Reconnect.MaxDelay.Duration < c.Reconnect.MinDelay.Duration {
		bad("reconnect", "need 0 < min_delay <= max_delay (got %s, %s)", c.Reconnect.MinDelay, c.Reconnect.MaxDelay)
	}
	if c.UserSig.RenewMargin.Duration < 0 || c.UserSig.CommandTimeout.Duration <= 0 {
		bad("usersig", "renew_margin must be >= 0 and command_timeout > 0")
	}
	switch c.Kick.After {
	case "stay", "relogin":
	default:
		bad("kick.after", "%q: use \"stay\" (stay logged out, like the SDK) or \"relogin\"", c.Kick.After)
	}
	if c.Kick.Delay.Duration <= 0 || c.Kick.MaxDelay.Duration < c.Kick.Delay.Duration {
		bad("kick", "need 0 < relogin_delay <= relogin_max_delay")
	}
	for key, g := range map[string]string{"api.socket_group": c.API.SocketGroup, "api.operator_group": c.API.OperatorGroup} {
		if g != "" {
			if _, err := lookupGroup(g); err != nil {
				bad(key, "%v", err)
			}
		}
	}
	switch strings.ToLower(c.Log.Level) {
	case "", "debug", "info", "warn", "error":
	default:
		bad("log.level", "%q: use debug, info, warn or error", c.Log.Level)
	}
	return ps
}

func firstWord(s string) string {
	f := strings.Fields(s)
	if len(f) == 0 {
		return ""
	}
	return f[0]
}

// lookupGroup returns a group's gid by name or number.
func lookupGroup(name string) (int, error) {
	if n, err := strconv.Atoi(name); err == nil {
		return n, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return -1, fmt.Errorf("group %q does not exist (create it with `groupadd %s`)", name, name)
	}
	return strconv.Atoi(g.Gid)
}

// Fatal reports whether any problem is fatal.
func Fatal(ps []Problem) bool {
	for _, p := range ps {
		if p.Fatal {
			return true
		}
	}
	return false
}

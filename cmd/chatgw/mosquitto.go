package main

// chatgw mosquitto-dynsec: the configuration file of Mosquitto's
// dynamic-security plugin for a fleet, with every account bound to its
// client id (build/mosquitto/README.md, "Client ids").

import (
	"bufio"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha512"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"chatd/mqtt"
)

const dynsecUsage = `Usage: chatgw mosquitto-dynsec --fleet FILE --gateway-client-id ID --gateway-password-file FILE [flags]

Writes the configuration file of Mosquitto's dynamic-security plugin: one
account per device (username = UserID, bound to its client id = instance id,
allowed only its own two topics), the gateway's account bound to its client
id, and optionally an administrator for mosquitto_ctrl. The fleet file has
one device a line: USER_ID CLIENT_ID PASSWORD ('#' starts a comment); keep it
secret. Passwords are stored hashed (PBKDF2-SHA512), never printed.

Flags:
`

// dynsecIterations is the PBKDF2 round count of the hashes written. Mosquitto's
// own tools use 101; more makes a leaked file dearer to crack, for about a
// millisecond of broker CPU per CONNECT.
const dynsecIterations = 1000

// dynsecFile is the plugin's configuration file (Mosquitto 2.0).
type dynsecFile struct {
	DefaultACLAccess dynsecDefaults `json:"defaultACLAccess"`
	Clients          []dynsecClient `json:"clients"`
	Groups           []struct{}     `json:"groups"`
	Roles            []dynsecRole   `json:"roles"`
}

type dynsecDefaults struct {
	PublishClientSend    bool `json:"publishClientSend"`
	PublishClientReceive bool `json:"publishClientReceive"`
	Subscribe            bool `json:"subscribe"`
	Unsubscribe          bool `json:"unsubscribe"`
}

type dynsecClient struct {
	Username   string          `json:"username"`
	ClientID   string          `json:"clientid"`
	TextName   string          `json:"textName,omitempty"`
	Password   string          `json:"password"`
	Salt       string          `json:"salt"`
	Iterations int             `json:"iterations"`
	Roles      []dynsecRoleRef `json:"roles"`
}

type dynsecRoleRef struct {
	Rolename string `json:"rolename"`
}

type dynsecRole struct {
	Rolename string      `json:"rolename"`
	ACLs     []dynsecACL `json:"acls"`
}

type dynsecACL struct {
	ACLType string `json:"acltype"`
	Topic   string `json:"topic"`
	Allow   bool   `json:"allow"`
}

// dynsecAccount is one account to write.
type dynsecAccount struct {
	username, clientID, password string
}

// dynsecConfig says what to write.
type dynsecConfig struct {
	prefix  string
	devices []dynsecAccount
	gateway dynsecAccount
	admin   *dynsecAccount
	// gatewayBans lets the gateway use the plugin's control API (FloodBan).
	gatewayBans bool
}

func mosquittoDynsec(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("chatgw mosquitto-dynsec", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, dynsecUsage); fs.PrintDefaults() }
	fleet := fs.String("fleet", "", "the fleet `file`: USER_ID CLIENT_ID PASSWORD per line")
	prefix := fs.String("topic-prefix", mqtt.DefaultPrefix, "the topics' first level, as chatd and chatgw are configured")
	gwUser := fs.String("gateway-username", "chatgw", "the gateway's broker `username` (chatgw's broker_username)")
	gwID := fs.String("gateway-client-id", "", "the gateway's MQTT client `id` (chatgw's broker_client_id; 16 or more random characters)")
	gwPass := fs.String("gateway-password-file", "", "`file` holding the gateway's password (chatgw's broker_password_file)")
	adUser := fs.String("admin-username", "", "an administrator for mosquitto_ctrl (optional)")
	adID := fs.String("admin-client-id", "", "the client `id` the administrator is bound to (mosquitto_ctrl -i)")
	adPass := fs.String("admin-password-file", "", "`file` holding the administrator's password")
	ban := fs.Bool("gateway-ban-floods", false, "let the gateway disable and enable accounts through the plugin (chatgw's dynsec_flood_ban); this gives its account the plugin's whole control API")
	out := fs.String("out", "", "write to this `file` (mode 0600, replaced atomically) instead of standard output")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return &cliError{code: exitConfig}
	}
	if fs.NArg() > 0 {
		return usageErr("mosquitto-dynsec takes no arguments, got %q", fs.Args())
	}
	cfg := dynsecConfig{prefix: *prefix, gatewayBans: *ban}
	if *fleet == "" || *gwID == "" || *gwPass == "" {
		return usageErr("mosquitto-dynsec needs --fleet, --gateway-client-id and --gateway-password-file")
	}
	f, err := os.Open(*fleet)
	if err != nil {
		return usageErr("fleet file: %v", err)
	}
	cfg.devices, err = parseFleet(f)
	f.Close()
	if err != nil {
		return usageErr("fleet file %s: %v", *fleet, err)
	}
	if fi, err := os.Stat(*fleet); err == nil && fi.Mode().Perm()&0o077 != 0 {
		fmt.Fprintf(stderr, "chatgw: warning: the fleet file %s holds passwords but others may read it (mode %04o); chmod 0600 it\n", *fleet, fi.Mode().Perm())
	}
	pw, err := readPassword(*gwPass)
	if err != nil {
		return usageErr("gateway password: %v", err)
	}
	cfg.gateway = dynsecAccount{username: *gwUser, clientID: *gwID, password: pw}
	if *adUser != "" || *adID != "" || *adPass != "" {
		if *adUser == "" || *adID == "" || *adPass == "" {
			return usageErr("--admin-username, --admin-client-id and --admin-password-file go together")
		}
		pw, err := readPassword(*adPass)
		if err != nil {
			return usageErr("admin password: %v", err)
		}
		cfg.admin = &dynsecAccount{username: *adUser, clientID: *adID, password: pw}
	}
	file, err := buildDynsec(cfg)
	if err != nil {
		return usageErr("%v", err)
	}
	b, err := json.MarshalIndent(file, "", "\t")
	if err != nil {
		return err
	}
	b = append(b, '\n')
	if *out == "" {
		_, err := stdout.Write(b)
		return err
	}
	return writeFileAtomic(*out, b)
}

// parseFleet reads USER_ID CLIENT_ID PASSWORD lines.
func parseFleet(r io.Reader) ([]dynsecAccount, error) {
	var out []dynsecAccount
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line, _, _ := strings.Cut(sc.Text(), "#")
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if len(f) != 3 {
			// Say nothing of the line's content: it may hold a password.
			return nil, fmt.Errorf("line %d has %d fields; want USER_ID CLIENT_ID PASSWORD", n, len(f))
		}
		out = append(out, dynsecAccount{username: f[0], clientID: f[1], password: f[2]})
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(out) == 0 {
		return nil, errors.New("no devices")
	}
	return out, nil
}

func readPassword(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	pw := strings.TrimSpace(string(b))
	if pw == "" {
		return "", fmt.Errorf("%s is empty", path)
	}
	return pw, nil
}

// buildDynsec makes the plugin's file. Every account is bound to a client id:
// an account without one may connect with any id and so take over any
// client's connection, the gateway's included.
func buildDynsec(cfg dynsecConfig) (dynsecFile, error) {
	topics, err := mqtt.NewTopics(cfg.prefix)
	if err != nil {
		return dynsecFile{}, fmt.Errorf("--topic-prefix: %v", err)
	}
	file := dynsecFile{
		// Nothing that no role grants: no publishing, no subscribing, no
		// receiving (Mosquitto's default lets every client receive what
		// it could subscribe to).
		DefaultACLAccess: dynsecDefaults{Unsubscribe: true},
		Groups:           []struct{}{},
	}
	users := map[string]string{}     // username -> what it is
	clientIDs := map[string]string{} // client id -> username
	claim := func(what string, a dynsecAccount) error {
		if a.password == "" {
			return fmt.Errorf("%s has no password", what)
		}
		if other, ok := users[a.username]; ok {
			return fmt.Errorf("%s: username %q is already %s (an account has one client id: one device per UserID)", what, a.username, other)
		}
		if other, ok := clientIDs[a.clientID]; ok {
			return fmt.Errorf("%s: client id %q is already bound to %q", what, a.clientID, other)
		}
		users[a.username], clientIDs[a.clientID] = what, a.username
		return nil
	}
	add := func(a dynsecAccount, text string, role dynsecRole) error {
		c, err := hashedClient(a, text, role.Rolename)
		if err != nil {
			return err
		}
		file.Clients = append(file.Clients, c)
		file.Roles = append(file.Roles, role)
		return nil
	}

	gw := cfg.gateway
	if err := mqtt.ValidateInstanceID(gw.clientID); err != nil {
		return file, fmt.Errorf("--gateway-client-id: %v", err)
	}
	if len(gw.clientID) < 16 {
		return file, fmt.Errorf("--gateway-client-id %q is guessable: use 16 or more random characters (the same as chatgw's broker_client_id)", gw.clientID)
	}
	if gw.username == "" {
		return file, errors.New("--gateway-username is empty")
	}
	if err := claim("the gateway", gw); err != nil {
		return file, err
	}
	upAll := strings.TrimSuffix(topics.Up("+", "+"), "+/+") + "#"
	downAll := strings.TrimSuffix(topics.Down("+", "+"), "+/+") + "#"
	gwACLs := []dynsecACL{
		// Exactly the filter chatgw subscribes to.
		{"subscribeLiteral", topics.UpFilter(), true},
		{"publishClientReceive", upAll, true},
		{"publishClientSend", downAll, true},
	}
	if cfg.gatewayBans {
		const ctl = "$CONTROL/dynamic-security/v1"
		gwACLs = append(gwACLs,
			dynsecACL{"publishClientSend", ctl, true},
			dynsecACL{"subscribeLiteral", ctl + "/response", true},
			dynsecACL{"publishClientReceive", ctl + "/response", true})
	}
	if err := add(gw, "chatgw login gateway", dynsecRole{Rolename: "chatgw-gateway", ACLs: gwACLs}); err != nil {
		return file, err
	}

	if a := cfg.admin; a != nil {
		if err := mqtt.ValidateInstanceID(a.clientID); err != nil {
			return file, fmt.Errorf("--admin-client-id: %v", err)
		}
		if err := claim("the administrator", *a); err != nil {
			return file, err
		}
		// What `mosquitto_ctrl dynsec init` gives its administrator: the
		// plugin's control topics, and reading everything.
		const ctl = "$CONTROL/dynamic-security/#"
		if err := add(*a, "dynamic-security administrator", dynsecRole{Rolename: "dynsec-admin", ACLs: []dynsecACL{
			{"publishClientSend", ctl, true},
			{"publishClientReceive", ctl, true},
			{"subscribePattern", ctl, true},
			{"publishClientReceive", "$SYS/#", true},
			{"subscribePattern", "$SYS/#", true},
			{"publishClientReceive", "#", true},
			{"subscribePattern", "#", true},
		}}); err != nil {
			return file, err
		}
	}

	for i, d := range cfg.devices {
		what := fmt.Sprintf("device %d", i+1)
		if err := mqtt.ValidateUserID(d.username); err != nil {
			return file, fmt.Errorf("%s: %v", what, err)
		}
		if err := mqtt.ValidateInstanceID(d.clientID); err != nil {
			return file, fmt.Errorf("%s (%s): client id: %v", what, d.username, err)
		}
		if err := claim(what+" ("+d.username+")", d); err != nil {
			return file, err
		}
		// The plugin does not substitute %u or %c in its topics (Mosquitto
		// 2.0): every device has a role of its own with its topics spelt out.
		upT, downT := topics.Up(d.username, d.clientID), topics.Down(d.username, d.clientID)
		if err := add(d, "", dynsecRole{Rolename: "chatd-device:" + d.username, ACLs: []dynsecACL{
			{"publishClientSend", upT, true},
			{"subscribeLiteral", downT, true},
			{"publishClientReceive", downT, true},
		}}); err != nil {
			return file, err
		}
	}
	return file, nil
}

// hashedClient is an account with its password hashed the way the plugin
// checks it: PBKDF2-SHA512 over a random 12-byte salt, 64 bytes, base64.
func hashedClient(a dynsecAccount, text, role string) (dynsecClient, error) {
	salt := make([]byte, 12)
	if _, err := rand.Read(salt); err != nil {
		return dynsecClient{}, err
	}
	key, err := pbkdf2.Key(sha512.New, a.password, salt, dynsecIterations, sha512.Size)
	if err != nil {
		return dynsecClient{}, err
	}
	return dynsecClient{
		Username:   a.username,
		ClientID:   a.clientID,
		TextName:   text,
		Password:   base64.StdEncoding.EncodeToString(key),
		Salt:       base64.StdEncoding.EncodeToString(salt),
		Iterations: dynsecIterations,
		Roles:      []dynsecRoleRef{{Rolename: role}},
	}, nil
}

// writeFileAtomic writes b to path with mode 0600 through a temporary file
// in the same directory, so the broker never reads half a file.
func writeFileAtomic(path string, b []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

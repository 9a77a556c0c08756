package main

// chatgw on a NATS cluster: serve's NATS options, and `chatgw
// nats-accounts`, which writes the accounts of a fleet for nats-server.

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/crypto/bcrypt"

	"chatd/gateway"
	"chatd/mqtt"
)

// natsName is what a queue group, account or bucket name may be.
var natsName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// natsServeConfig checks serve's NATS options and sets cfg's.
func natsServeConfig(fc fileConfig, cfg *gateway.ServeConfig) error {
	natsOnly := map[string]bool{
		"nats_user": fc.NATSUser != "", "nats_password_file": fc.NATSPasswordFile != "", "nats_creds": fc.NATSCreds != "",
		"nats_nkey": fc.NATSNkey != "", "nats_tls_ca": fc.NATSTLSCA != "", "nats_tls_cert": fc.NATSTLSCert != "",
		"nats_tls_key": fc.NATSTLSKey != "", "nats_queue": fc.NATSQueue != "", "nats_kv_bucket": fc.NATSKVBucket != "",
		"nats_kv_replicas": fc.NATSKVReplicas != 0, "nats_shards": fc.NATSShards != 0,
	}
	if fc.NATS == "" {
		for _, o := range options {
			if natsOnly[o.key] {
				return fmt.Errorf("%s applies to a NATS cluster only: set nats (--nats URL,...) too, or remove it", o.key)
			}
		}
		return nil
	}
	if fc.EmbeddedBroker != "" || fc.Broker != "" {
		return errors.New("choose one of --nats, --broker and --embedded-broker")
	}
	brokerOnly := map[string]bool{
		"broker_username": fc.BrokerUsername != "", "broker_password_file": fc.BrokerPasswordFile != "",
		"broker_client_id": fc.BrokerClientID != "", "tls_ca": fc.TLSCA != "", "tls_cert": fc.TLSCert != "", "tls_key": fc.TLSKey != "",
	}
	for _, o := range options {
		if brokerOnly[o.key] {
			return fmt.Errorf("%s applies to an MQTT broker (--broker) only; on NATS use the nats_* options", o.key)
		}
	}
	var no gateway.NATSOptions
	for _, s := range strings.Split(fc.NATS, ",") {
		s = strings.TrimSpace(s)
		u, err := url.Parse(s)
		if err != nil || (u.Scheme != "nats" && u.Scheme != "tls") || u.Host == "" || u.Port() == "" || u.User != nil || (u.Path != "" && u.Path != "/") {
			return fmt.Errorf("nats: %q is not a server URL: use nats://HOST:PORT or tls://HOST:PORT, comma separated, without credentials (those go in nats_user and nats_password_file)", s)
		}
		no.URLs = append(no.URLs, s)
	}
	kinds := 0
	for _, set := range []bool{fc.NATSUser != "" || fc.NATSPasswordFile != "", fc.NATSCreds != "", fc.NATSNkey != ""} {
		if set {
			kinds++
		}
	}
	if kinds > 1 {
		return errors.New("NATS credentials: use one of nats_user with nats_password_file, nats_creds, or nats_nkey")
	}
	if (fc.NATSUser == "") != (fc.NATSPasswordFile == "") {
		return errors.New("nats_user and nats_password_file go together: set both or neither")
	}
	if fc.NATSUser != "" {
		b, err := os.ReadFile(fc.NATSPasswordFile)
		if err != nil {
			return fmt.Errorf("NATS password file: %w", err)
		}
		no.User, no.Password = fc.NATSUser, strings.TrimSpace(string(b))
		if no.Password == "" {
			return fmt.Errorf("NATS password file %s is empty", fc.NATSPasswordFile)
		}
	}
	for _, f := range []struct{ key, path string }{{"nats_creds", fc.NATSCreds}, {"nats_nkey", fc.NATSNkey}} {
		if f.path == "" {
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			return fmt.Errorf("%s: %w", f.key, err)
		}
	}
	no.CredsFile, no.NkeyFile = fc.NATSCreds, fc.NATSNkey
	if fc.NATSTLSCA != "" || fc.NATSTLSCert != "" || fc.NATSTLSKey != "" {
		tc, err := mqtt.LoadTLS(fc.NATSTLSCA, fc.NATSTLSCert, fc.NATSTLSKey)
		if err != nil {
			return fmt.Errorf("NATS %w", err)
		}
		no.TLS = tc
	}
	no.Shards = max(fc.NATSShards, 1)
	if no.Shards > gateway.MaxNATSShards {
		return fmt.Errorf("nats_shards %d: use 1 to %d", no.Shards, gateway.MaxNATSShards)
	}
	if no.Shards > 1 && fc.NATSUser == "" {
		return fmt.Errorf("nats_shards %d: devices spread over several accounts need nats_user and nats_password_file (the gateway's user in account i is NAME-i, as chatgw nats-accounts writes it), not a creds or nkey file", no.Shards)
	}
	no.Queue = fc.NATSQueue
	if no.Queue == "" {
		no.Queue = gateway.DefaultNATSQueue
	}
	if !natsName.MatchString(no.Queue) {
		return fmt.Errorf("nats_queue %q: use 1 to 64 letters, digits, '_' and '-'", no.Queue)
	}
	cfg.KVBucket = fc.NATSKVBucket
	if cfg.KVBucket == "" {
		cfg.KVBucket = gateway.DefaultKVBucket
	}
	if !natsName.MatchString(cfg.KVBucket) {
		return fmt.Errorf("nats_kv_bucket %q: use 1 to 64 letters, digits, '_' and '-'", cfg.KVBucket)
	}
	// 0: as many as the servers allow (see gateway.ServeConfig.KVReplicas).
	cfg.KVReplicas = fc.NATSKVReplicas
	if cfg.KVReplicas > 5 {
		return fmt.Errorf("nats_kv_replicas %d: JetStream keeps 1 to 5 replicas (3 on a three-node cluster)", cfg.KVReplicas)
	}
	if _, err := gateway.NATSUpSubject(cfg.Topics); err != nil {
		return err
	}
	cfg.NATS = no
	return nil
}

const natsAccountsUsage = `Usage: chatgw nats-accounts --devices FILE --gateway-password-file FILE [flags]

Writes the accounts of a chatgw fleet for nats-server's include: one
account for the chat traffic with the gateway's user and one user per
device, each confined to its own topics, and the system account. Passwords
are read from files and written only as bcrypt hashes.

The devices file has one device account a line: its UserID, white space,
and its password (or a bcrypt hash of it, "$2a$..."); blank lines and
lines starting with '#' are skipped.

`

// natsAccountsFlags are the options of chatgw nats-accounts.
type natsAccountsFlags struct {
	devices, gatewayPasswordFile, systemPasswordFile string
	gatewayUser, systemUser, account, prefix         string
	queue, bucket, out                               string
	cost, shards                                     int
}

// natsUser is one user of the generated accounts.
type natsUser struct {
	name, secret string // secret: a password or a bcrypt hash
	hash         string
	connTypes    []string
	pub, sub     []string
}

func natsAccounts(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("chatgw nats-accounts", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var f natsAccountsFlags
	fs.StringVar(&f.devices, "devices", "", "file of device accounts: a UserID and its password (or bcrypt hash) a line")
	fs.StringVar(&f.gatewayPasswordFile, "gateway-password-file", "", "file holding the gateway user's password (or bcrypt hash)")
	fs.StringVar(&f.gatewayUser, "gateway-user", "chatgw", "the gateways' NATS user")
	fs.StringVar(&f.systemPasswordFile, "system-password-file", "", "file holding the system account user's password (or bcrypt hash); default: no system user")
	fs.StringVar(&f.systemUser, "system-user", "sys", "the system account's user")
	fs.StringVar(&f.account, "account", "CHAT", "the account of the chat traffic")
	fs.StringVar(&f.prefix, "topic-prefix", "", "MQTT topic prefix, as serve's topic_prefix (default chat)")
	fs.StringVar(&f.queue, "queue", gateway.DefaultNATSQueue, "the gateways' queue group, as serve's nats_queue")
	fs.StringVar(&f.bucket, "kv-bucket", gateway.DefaultKVBucket, "the shared state's bucket, as serve's nats_kv_bucket")
	fs.IntVar(&f.shards, "shards", 1, fmt.Sprintf("spread the devices over this many accounts, 1 to %d, as serve's nats_shards (about one per 1,000 devices; see docs/scale-out.md)", gateway.MaxNATSShards))
	fs.IntVar(&f.cost, "bcrypt-cost", bcrypt.DefaultCost, "bcrypt cost of the password hashes (nats-server spends it at every connect)")
	fs.StringVar(&f.out, "out", "", "write the accounts to this file (mode 0600) instead of standard output")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), natsAccountsUsage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return &cliError{code: exitConfig}
	}
	if fs.NArg() > 0 {
		return usageErr("nats-accounts takes no arguments (passwords are read from files), got %q", fs.Args())
	}
	conf, err := f.build()
	if err != nil {
		return usageErr("%v", err)
	}
	if f.out == "" {
		_, err := stdout.Write(conf)
		return err
	}
	if err := writeFile0600(f.out, conf); err != nil {
		return &cliError{code: exitFailure, msg: err.Error()}
	}
	return nil
}

// build makes the accounts configuration.
func (f natsAccountsFlags) build() ([]byte, error) {
	if f.devices == "" || f.gatewayPasswordFile == "" {
		return nil, errors.New("--devices and --gateway-password-file are required")
	}
	if f.cost < bcrypt.MinCost || f.cost > bcrypt.MaxCost {
		return nil, fmt.Errorf("--bcrypt-cost %d: use %d to %d", f.cost, bcrypt.MinCost, bcrypt.MaxCost)
	}
	for _, n := range []struct{ flag, v string }{{"account", f.account}, {"queue", f.queue}, {"kv-bucket", f.bucket}} {
		if !natsName.MatchString(n.v) {
			return nil, fmt.Errorf("--%s %q: use 1 to 64 letters, digits, '_' and '-'", n.flag, n.v)
		}
	}
	if f.account == "SYS" || f.account == "$G" {
		return nil, fmt.Errorf("--account %s is nats-server's own", f.account)
	}
	topics, err := mqtt.NewTopics(f.prefix)
	if err != nil {
		return nil, err
	}
	up, err := gateway.NATSUpSubject(topics)
	if err != nil {
		return nil, err
	}
	// The subjects of one user's topics, with the instance a wildcard.
	userSubjects := func(user string) (up, down string, err error) {
		if up, err = gateway.NATSSubject(topics.Up(user, "i")); err != nil {
			return "", "", err
		}
		if down, err = gateway.NATSSubject(topics.Down(user, "i")); err != nil {
			return "", "", err
		}
		return strings.TrimSuffix(up, ".i") + ".*", strings.TrimSuffix(down, ".i") + ".*", nil
	}
	downAll := strings.TrimSuffix(strings.TrimSuffix(mustSubject(topics.Down("u", "i")), ".i"), ".u") + ".>"
	gwSecret, err := readSecret(f.gatewayPasswordFile)
	if err != nil {
		return nil, err
	}
	if f.shards < 1 || f.shards > gateway.MaxNATSShards {
		return nil, fmt.Errorf("--shards %d: use 1 to %d", f.shards, gateway.MaxNATSShards)
	}
	kv := "KV_" + f.bucket
	// Answers and pushes: core, and into the MQTT QoS 1 stream.
	downPub := []string{downAll, "$MQTT.msgs." + downAll}
	// The up subjects only within the queue group; replies to its
	// requests on its inbox.
	upSub := []string{up + " " + f.queue, "_INBOX.>"}
	gw := natsUser{name: f.gatewayUser, secret: gwSecret, connTypes: []string{"STANDARD"},
		pub: slices.Concat(downPub, []string{
			// The shared state's bucket, and nothing else of JetStream.
			"$JS.API.INFO",
			"$JS.API.STREAM.INFO." + kv, "$JS.API.STREAM.CREATE." + kv, "$JS.API.STREAM.UPDATE." + kv,
			"$JS.API.STREAM.MSG.GET." + kv, "$JS.API.DIRECT.GET." + kv, "$JS.API.DIRECT.GET." + kv + ".>",
			"$JS.API.CONSUMER.CREATE." + kv, "$JS.API.CONSUMER.CREATE." + kv + ".>",
			"$JS.API.CONSUMER.INFO." + kv + ".>", "$JS.API.CONSUMER.DELETE." + kv + ".>",
			"$JS.API.CONSUMER.MSG.NEXT." + kv + ".>",
			"$KV." + f.bucket + ".>", "$JS.ACK." + kv + ".>", "$JS.FC." + kv + ".>",
		}),
		sub: upSub,
	}
	// One account per shard: shard 0 is --account, with the state bucket;
	// shard i is ACCOUNT-i, where the gateway is user GATEWAY-i.
	accounts := make([]natsAccount, f.shards)
	seen := map[string]string{}
	for i := range accounts {
		a := &accounts[i]
		a.name = f.account
		u := &gw
		if i > 0 {
			a.name = f.account + "-" + strconv.Itoa(i)
			u = &natsUser{name: gateway.NATSShardUser(f.gatewayUser, i), secret: gwSecret, connTypes: []string{"STANDARD"}, pub: downPub, sub: upSub}
		}
		if what, dup := seen[u.name]; dup {
			return nil, fmt.Errorf("--gateway-user %q: its user %q in shard %d is also %s: NATS user names are one namespace", f.gatewayUser, u.name, i, what)
		}
		seen[u.name] = fmt.Sprintf("the gateway user of shard %d", i)
		a.users = []*natsUser{u}
	}
	var sys *natsUser
	if f.systemPasswordFile != "" {
		s, err := readSecret(f.systemPasswordFile)
		if err != nil {
			return nil, err
		}
		if what, dup := seen[f.systemUser]; dup {
			return nil, fmt.Errorf("--system-user %q is also %s: NATS user names are one namespace", f.systemUser, what)
		}
		seen[f.systemUser] = "the system user"
		sys = &natsUser{name: f.systemUser, secret: s}
	}
	devs, err := readDevices(f.devices)
	if err != nil {
		return nil, err
	}
	for _, d := range devs {
		if what, dup := seen[d.name]; dup {
			return nil, fmt.Errorf("devices file %s: UserID %q is also %s: NATS user names are one namespace", f.devices, d.name, what)
		}
		seen[d.name] = "a device above"
		pu, sd, err := userSubjects(d.name)
		if err != nil {
			return nil, fmt.Errorf("devices file %s: UserID %q cannot be confined on NATS: %v", f.devices, d.name, err)
		}
		d.connTypes = []string{"MQTT"}
		d.pub = []string{pu}
		// Nothing of $MQTT.: nats-server lets an MQTT connection subscribe
		// to the delivery subjects of its own QoS 1 consumers
		// ($MQTT.sub.<id>) whatever its permissions say, and its MQTT
		// sessions, QoS 1 and retained messages are written by the server.
		d.sub = []string{sd}
		a := &accounts[gateway.NATSShard(d.name, f.shards)]
		a.users = append(a.users, d)
		a.devices++
	}
	var all []*natsUser
	for _, a := range accounts {
		all = append(all, a.users...)
	}
	if sys != nil {
		all = append(all, sys)
	}
	if err := hashAll(all, f.cost); err != nil {
		return nil, err
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, `# The accounts of a chatgw fleet, written by chatgw nats-accounts; include
# it from nats-server's configuration, which sets system_account: SYS.
# Passwords are bcrypt hashes. Account %s holds the chat traffic: the
# gateways' user %s (the up subjects in queue group %s, the down subjects,
# the JetStream API of bucket %s only) and %d devices, each allowed to
# publish only its up subjects, to subscribe only to its down subjects, and
# to connect only over MQTT.
`, f.account, f.gatewayUser, f.queue, f.bucket, len(devs))
	if f.shards > 1 {
		fmt.Fprintf(&b, `# The devices are spread over %d accounts (shards), each with MQTT streams
# of its own: a device is in shard FNV-1a(UserID) mod %d; shard 0 is %s,
# shard i is %s-i, where the gateways' user is %s-i (the up and down
# subjects only). Serve with nats_shards = %d.
`, f.shards, f.shards, f.account, f.account, f.gatewayUser, f.shards)
	}
	b.WriteString("accounts {\n")
	for i, a := range accounts {
		if f.shards > 1 {
			fmt.Fprintf(&b, "  # shard %d: %d devices\n", i, a.devices)
		}
		fmt.Fprintf(&b, "  %s {\n    jetstream: enabled\n    users: [\n", natsQuote(a.name))
		for _, u := range a.users {
			writeUser(&b, u)
		}
		b.WriteString("    ]\n  }\n")
	}
	b.WriteString("  SYS {\n")
	if sys != nil {
		b.WriteString("    users: [\n")
		writeUser(&b, sys)
		b.WriteString("    ]\n")
	}
	b.WriteString("  }\n}\n")
	return b.Bytes(), nil
}

// natsAccount is one account of the generated configuration.
type natsAccount struct {
	name    string
	users   []*natsUser
	devices int
}

func mustSubject(topic string) string {
	s, err := gateway.NATSSubject(topic)
	if err != nil {
		panic(err) // a validated prefix with plain ids always maps
	}
	return s
}

func writeUser(b *bytes.Buffer, u *natsUser) {
	fmt.Fprintf(b, "      {user: %s, password: %s", natsQuote(u.name), natsQuote(u.hash))
	if len(u.connTypes) > 0 {
		fmt.Fprintf(b, ", allowed_connection_types: %s", natsList(u.connTypes))
	}
	if u.pub != nil || u.sub != nil {
		fmt.Fprintf(b, ",\n        permissions: {publish: {allow: %s}, subscribe: {allow: %s}}", natsList(u.pub), natsList(u.sub))
	}
	b.WriteString("}\n")
}

// natsQuote writes s as a double-quoted string of nats-server's
// configuration format (where '$' in quotes is no variable).
func natsQuote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '"' || c == '\\':
			b.WriteByte('\\')
			b.WriteByte(c)
		case c < ' ' || c > '~':
			fmt.Fprintf(&b, `\x%02x`, c)
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte('"')
	return b.String()
}

func natsList(ss []string) string {
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = natsQuote(s)
	}
	return "[" + strings.Join(q, ", ") + "]"
}

// isBcrypt reports whether s is a bcrypt hash (taken as is).
func isBcrypt(s string) bool {
	if !strings.HasPrefix(s, "$2a$") && !strings.HasPrefix(s, "$2b$") && !strings.HasPrefix(s, "$2y$") {
		return false
	}
	_, err := bcrypt.Cost([]byte(s))
	return err == nil
}

// minPassword is the shortest password taken.
const minPassword = 8

// readSecret reads a password file: one line, a password or a bcrypt hash.
func readSecret(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("reading password file: %w", err)
	}
	s := strings.TrimSpace(string(b))
	if strings.ContainsAny(s, "\n\r") {
		return "", fmt.Errorf("password file %s: one line, please", path)
	}
	if err := checkSecret(s); err != nil {
		return "", fmt.Errorf("password file %s: %v", path, err)
	}
	return s, nil
}

func checkSecret(s string) error {
	switch {
	case isBcrypt(s):
		return nil
	case strings.HasPrefix(s, "$2"):
		return errors.New("the password looks like a bcrypt hash but is not a valid one")
	case len(s) < minPassword:
		return fmt.Errorf("the password is shorter than %d characters", minPassword)
	case len(s) > 72:
		return errors.New("the password is longer than 72 bytes, which bcrypt does not hash")
	}
	return nil
}

// readDevices reads the devices file.
func readDevices(path string) ([]*natsUser, error) {
	fh, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading the devices file: %w", err)
	}
	defer fh.Close()
	var out []*natsUser
	seen := map[string]int{}
	sc := bufio.NewScanner(fh)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		user, secret, _ := strings.Cut(strings.ReplaceAll(line, "\t", " "), " ")
		secret = strings.TrimSpace(secret)
		if err := mqtt.ValidateUserID(user); err != nil {
			return nil, fmt.Errorf("devices file %s line %d: %v", path, n, err)
		}
		if secret == "" {
			return nil, fmt.Errorf("devices file %s line %d: UserID %q has no password (write it after the UserID, on the same line)", path, n, user)
		}
		if err := checkSecret(secret); err != nil {
			return nil, fmt.Errorf("devices file %s line %d (UserID %q): %v", path, n, user, err)
		}
		if l, dup := seen[user]; dup {
			return nil, fmt.Errorf("devices file %s line %d: UserID %q is already on line %d", path, n, user, l)
		}
		seen[user] = n
		out = append(out, &natsUser{name: user, secret: secret})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading the devices file %s: %w", path, err)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("devices file %s lists no device", path)
	}
	return out, nil
}

// hashAll sets each user's hash, on every CPU.
func hashAll(users []*natsUser, cost int) error {
	work := make(chan *natsUser)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	for range runtime.GOMAXPROCS(0) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for u := range work {
				if isBcrypt(u.secret) {
					u.hash = u.secret
					continue
				}
				h, err := bcrypt.GenerateFromPassword([]byte(u.secret), cost)
				if err != nil {
					mu.Lock()
					if first == nil {
						first = fmt.Errorf("hashing the password of %q: %w", u.name, err)
					}
					mu.Unlock()
					continue
				}
				u.hash = string(h)
			}
		}()
	}
	for _, u := range users {
		work <- u
	}
	close(work)
	wg.Wait()
	return first
}

// writeFile0600 writes b to path through a temporary file and a rename.
func writeFile0600(path string, b []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

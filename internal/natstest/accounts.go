package natstest

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"chatd/mqtt"
)

// User is a NATS user: a name and its password.
type User struct{ Name, Password string }

// Accounts is what the accounts include defines: the app's account with
// the gateway's user and one user per device, each device allowed to
// publish only its own up subjects and to subscribe only to its own down
// subjects, and the system account.
type Accounts struct {
	// Account is the app's account (default "CHAT").
	Account string
	// Prefix is the topic prefix (default mqtt.DefaultPrefix).
	Prefix  string
	Gateway User
	Devices []User
	System  User
}

// The names the shipped configuration expects.
const (
	DefaultAccount = "CHAT"
	SystemAccount  = "SYS" // system_account in build/nats/nats-server.conf
)

// subject turns an MQTT topic into the NATS subject nats-server maps it to
// ('/' separates MQTT levels, '.' NATS tokens).
func subject(topic string) string { return strings.ReplaceAll(topic, "/", ".") }

// Conf is the accounts include in nats-server's configuration syntax.
func (a Accounts) Conf() string {
	name := a.Account
	if name == "" {
		name = DefaultAccount
	}
	topics := mqtt.Topics{Prefix: a.Prefix}
	if topics.Prefix == "" {
		topics.Prefix = mqtt.DefaultPrefix
	}
	q := strconv.Quote
	var b strings.Builder
	b.WriteString("# The accounts of a chatgw cluster (written by the tests).\n")
	b.WriteString("accounts {\n")
	fmt.Fprintf(&b, "  %s {\n    jetstream: enabled\n    users: [\n", name)
	fmt.Fprintf(&b, "      {user: %s, password: %s}\n", q(a.Gateway.Name), q(a.Gateway.Password))
	for _, d := range a.Devices {
		// The instance is the last level: any instance of this user.
		up := subject(topics.Up(d.Name, "*"))
		down := subject(topics.Down(d.Name, "*"))
		fmt.Fprintf(&b, "      {user: %s, password: %s, permissions: {publish: {allow: [%s]}, subscribe: {allow: [%s]}}}\n",
			q(d.Name), q(d.Password), q(up), q(down))
	}
	b.WriteString("    ]\n  }\n")
	fmt.Fprintf(&b, "  %s {\n    users: [{user: %s, password: %s}]\n  }\n", SystemAccount, q(a.System.Name), q(a.System.Password))
	b.WriteString("}\n")
	return b.String()
}

// Write writes the include to path, readable by its owner only (it holds
// passwords).
func (a Accounts) Write(path string) error {
	return os.WriteFile(path, []byte(a.Conf()), 0o600)
}

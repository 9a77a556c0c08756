package mosquittotest_test

import (
	"net"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/google/go-cmp/cmp"

	"chatd/mqtt"
	"chatd/mqtt/mosquittotest"
)

func TestRestartSamePort(t *testing.T) {
	b := mosquittotest.Start(t, mosquittotest.Config{Users: users})
	addr := b.Addr
	connect(t, b, "alice", "inst-a")

	b.Stop()
	if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		c.Close()
		t.Fatalf("%s still accepts connections after Stop", addr)
	}
	b.Stop() // a second Stop does nothing

	b.Start()
	if b.Addr != addr {
		t.Errorf("Addr after restart = %s, want %s", b.Addr, addr)
	}
	alice := connect(t, b, "alice", "inst-a")
	alice.subscribe(t, topics.Down("alice", "inst-a"))
	alice.publish(t, topics.Down("alice", "inst-a"), "hello again")
	want := msg{topics.Down("alice", "inst-a"), "hello again"}
	if diff := cmp.Diff([]msg{want}, alice.in.until(t, want)); diff != "" {
		t.Errorf("alice received (-want +got):\n%s", diff)
	}
	if n := len(regexp.MustCompile(`mosquitto version \S+ running`).FindAllString(b.Log(), -1)); n != 2 {
		t.Errorf("log shows %d starts, want 2:\n%s", n, b.Log())
	}
}

func TestNoUsersIsAnonymous(t *testing.T) {
	b := mosquittotest.Start(t, mosquittotest.Config{})
	c := connect(t, b, "", "anyone")
	c.subscribe(t, "#")
	c.publish(t, "any/topic", "x")
	want := msg{"any/topic", "x"}
	if diff := cmp.Diff([]msg{want}, c.in.until(t, want)); diff != "" {
		t.Errorf("received (-want +got):\n%s", diff)
	}
}

// The ACL template rewritten for another prefix confines devices the same way.
func TestACLPrefix(t *testing.T) {
	const prefix = "acme/chat"
	acme, err := mqtt.NewTopics(prefix)
	if err != nil {
		t.Fatal(err)
	}
	b := mosquittotest.Start(t, mosquittotest.Config{
		ACLFile: mosquittotest.ACLTemplate(t),
		Users:   users,
		Prefix:  prefix,
	})
	gw := connect(t, b, "chatgw", "chatgw")
	gw.subscribe(t, acme.UpFilter())
	gw.subscribe(t, topics.UpFilter())

	// The default prefix is no longer granted.
	mustPubDenied(t, b, "alice", "inst-a", topics.Up("alice", "inst-a"), "old prefix")
	mustPubDenied(t, b, "bob", "inst-b", acme.Up("alice", "inst-a"), "forged")
	marker := msg{acme.Up("alice", "inst-a"), "login"}
	mustPub(t, b, "alice", "inst-a", marker.Topic, marker.Payload)

	if diff := cmp.Diff([]msg{marker}, gw.in.until(t, marker)); diff != "" {
		t.Errorf("gateway received (-want +got):\n%s", diff)
	}
}

func TestRewritePrefix(t *testing.T) {
	acl := "# chat/v1/up stays in comments\n" +
		"pattern write chat/v1/up/%u/%c\n" +
		"user chatgw\n" +
		"topic read chat/v1/up/#\n" +
		"topic chat/v1/down/#\n" +
		"topic read chatter/x\n"
	want := "# chat/v1/up stays in comments\n" +
		"pattern write acme/chat/v1/up/%u/%c\n" +
		"user chatgw\n" +
		"topic read acme/chat/v1/up/#\n" +
		"topic acme/chat/v1/down/#\n" +
		"topic read chatter/x\n"
	if diff := cmp.Diff(want, mosquittotest.RewritePrefix(acl, "acme/chat")); diff != "" {
		t.Errorf("RewritePrefix (-want +got):\n%s", diff)
	}
}

func TestACLTemplate(t *testing.T) {
	p := mosquittotest.ACLTemplate(t)
	if filepath.Base(filepath.Dir(p)) != "mosquitto" || filepath.Base(p) != "acl" {
		t.Errorf("ACLTemplate = %s, want .../build/mosquitto/acl", p)
	}
	if _, err := os.Stat(p); err != nil {
		t.Error(err)
	}
}

// The shipped settings: Nagle off, and no retained messages (a client that
// publishes one is disconnected and its message is not kept).
func TestShippedSettings(t *testing.T) {
	got := mosquittotest.ShippedSettings(t)
	for _, want := range []string{"set_tcp_nodelay true", "retain_available false"} {
		if !slices.Contains(got, want) {
			t.Errorf("shipped settings %q lack %q", got, want)
		}
	}
	b := mosquittotest.Start(t, mosquittotest.Config{ACLFile: mosquittotest.ACLTemplate(t), Users: users, Shipped: true})
	alice := connect(t, b, "alice", "inst-a")
	lost := make(chan struct{})
	alice2 := connect(t, b, "alice", "inst-r", func(o *paho.ClientOptions) {
		o.SetConnectionLostHandler(func(paho.Client, error) { close(lost) })
	})
	alice2.c.Publish(topics.Up("alice", "inst-r"), 1, true, "retained login")
	select {
	case <-lost:
	case <-time.After(waitTimeout):
		t.Error("a client publishing a retained message stayed connected")
	}
	// Nothing was retained: a new subscriber to the up topics gets nothing
	// before the marker.
	gw := connect(t, b, "chatgw", "chatgw-x")
	gw.subscribe(t, topics.UpFilter())
	marker := msg{topics.Up("alice", "inst-a"), "marker"}
	alice.publish(t, marker.Topic, marker.Payload)
	if diff := cmp.Diff([]msg{marker}, gw.in.until(t, marker)); diff != "" {
		t.Errorf("the gateway received (-want +got):\n%s", diff)
	}
}

// The shipped configuration's dynamic-security lines name the plugin the
// tests load, where the installed package has it.
func TestShippedDynsecLines(t *testing.T) {
	plugin := mosquittotest.DynsecPlugin(t)
	b, err := os.ReadFile(filepath.Join("..", "..", "build", "mosquitto", "mosquitto.conf"))
	if err != nil {
		t.Fatal(err)
	}
	var shipped, file string
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "#plugin "); ok {
			shipped = v
		}
		if v, ok := strings.CutPrefix(line, "#plugin_opt_config_file "); ok {
			file = v
		}
	}
	if filepath.Base(shipped) != mosquittotest.DynsecPluginName || file == "" {
		t.Fatalf("mosquitto.conf: plugin %q, config file %q", shipped, file)
	}
	if runtime.GOARCH == "amd64" && shipped != plugin {
		t.Errorf("mosquitto.conf names %s; the mosquitto package installed %s", shipped, plugin)
	}
}

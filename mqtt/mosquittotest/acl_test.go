package mosquittotest_test

import (
	"errors"
	"os/exec"
	"regexp"
	"strings"
	"testing"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/google/go-cmp/cmp"

	"chatd/mqtt"
	"chatd/mqtt/mosquittotest"
)

// These tests check build/mosquitto/acl against a real Mosquitto: paho
// clients play the gateway and the legitimate devices, mosquitto_pub and
// mosquitto_sub the intruders. A denied publish is dropped silently, so every
// "nothing arrived" is proven with a marker: a message the same party is
// allowed to send after the denied one. The receiver gets both in order on
// one connection, so if the marker arrives alone the forged message is not
// late, it is gone; and the broker's log must show the denial.

// users are the broker's users and their passwords.
var users = map[string]string{
	"chatgw": "gw-secret",
	"alice":  "alice-secret",
	"bob":    "bob-secret",
}

// topics are the protocol's topics under the default prefix.
var topics = mqtt.Topics{}

func startACLBroker(t *testing.T) *mosquittotest.Broker {
	t.Helper()
	return mosquittotest.Start(t, mosquittotest.Config{
		ACLFile: mosquittotest.ACLTemplate(t),
		Users:   users,
	})
}

// mustPubDenied publishes with mosquitto_pub and requires the broker to
// accept the connection and log that it denied the publish. Without the
// denial the test goes on, so that it also shows where the message went.
func mustPubDenied(t *testing.T, b *mosquittotest.Broker, user, clientID, topic, payload string) {
	t.Helper()
	mark := b.LogMark()
	mustPub(t, b, user, clientID, topic, payload)
	denied := regexp.MustCompile(`Denied PUBLISH from ` + regexp.QuoteMeta(clientID) + ` \(.*'` + regexp.QuoteMeta(topic) + `'`)
	if !b.WaitLog(mark, denied, waitTimeout) {
		t.Errorf("the broker did not log a denied publish from %s to %s", clientID, topic)
	}
}

func TestDeviceReachesGateway(t *testing.T) {
	b := startACLBroker(t)
	gw := connect(t, b, "chatgw", "chatgw")
	gw.subscribe(t, topics.UpFilter())
	alice := connect(t, b, "alice", "inst-a")

	alice.publish(t, topics.Up("alice", "inst-a"), "login")

	want := []msg{{topics.Up("alice", "inst-a"), "login"}}
	if diff := cmp.Diff(want, gw.in.until(t, want[0])); diff != "" {
		t.Errorf("gateway received (-want +got):\n%s", diff)
	}
}

func TestGatewayReachesDevice(t *testing.T) {
	b := startACLBroker(t)
	alice := connect(t, b, "alice", "inst-a")
	alice.subscribe(t, topics.Down("alice", "inst-a"))
	gw := connect(t, b, "chatgw", "chatgw")

	gw.publish(t, topics.Down("alice", "inst-a"), "login_result")

	want := []msg{{topics.Down("alice", "inst-a"), "login_result"}}
	if diff := cmp.Diff(want, alice.in.until(t, want[0])); diff != "" {
		t.Errorf("alice received (-want +got):\n%s", diff)
	}
}

// A device cannot send requests in another device's name.
func TestForgedRequestDropped(t *testing.T) {
	for _, tc := range []struct {
		name           string
		user, clientID string
		forged         string // topic
	}{
		{"other user's topic", "bob", "inst-b", topics.Up("alice", "inst-a")},
		{"other user's topic with its client id", "bob", "inst-a", topics.Up("alice", "inst-a")},
		{"same user, other instance", "alice", "inst-a2", topics.Up("alice", "inst-a")},
		{"level below own topic", "bob", "inst-b", topics.Up("bob", "inst-b") + "/x"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := startACLBroker(t)
			gw := connect(t, b, "chatgw", "chatgw")
			// Wider than the gateway's chat/v1/up/+/+, to see any forged topic.
			gw.subscribe(t, "chat/#")

			mustPubDenied(t, b, tc.user, tc.clientID, tc.forged, "forged")
			// The marker: the same user and client id on their own topic.
			marker := msg{topics.Up(tc.user, tc.clientID), "marker"}
			mustPub(t, b, tc.user, tc.clientID, marker.Topic, marker.Payload)

			want := []msg{marker}
			if diff := cmp.Diff(want, gw.in.until(t, marker)); diff != "" {
				t.Errorf("gateway received (-want +got):\n%s", diff)
			}
		})
	}
}

// A device cannot read what the gateway sends another device, whatever it
// subscribes to; the broker acknowledges the subscriptions all the same.
func TestEavesdropperGetsNothing(t *testing.T) {
	for _, tc := range []struct {
		name           string
		user, clientID string
		filters        []string
	}{
		{
			name: "other user", user: "bob", clientID: "inst-b",
			filters: []string{topics.Down("alice", "inst-a"), "chat/v1/down/alice/+", "chat/v1/down/+/+", "chat/v1/down/#", "#"},
		},
		{
			name: "same user, other instance", user: "alice", clientID: "inst-a2",
			filters: []string{topics.Down("alice", "inst-a"), "chat/v1/down/alice/+", "chat/v1/down/#"},
		},
		{
			name: "another device's requests", user: "bob", clientID: "inst-b",
			filters: []string{topics.Up("alice", "inst-a"), topics.UpFilter(), "chat/v1/up/#"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := startACLBroker(t)
			alice := connect(t, b, "alice", "inst-a")
			alice.subscribe(t, topics.Down("alice", "inst-a"))
			gw := connect(t, b, "chatgw", "chatgw")
			own := topics.Down(tc.user, tc.clientID)
			spy, granted := sub(t, b, tc.user, tc.clientID, append(tc.filters, own)...)
			t.Logf("SUBACK for %q: %s", append(tc.filters, own), granted)

			secret := msg{topics.Down("alice", "inst-a"), "for alice"}
			alice.publish(t, topics.Up("alice", "inst-a"), "alice's request")
			gw.publish(t, secret.Topic, secret.Payload)
			marker := msg{own, "marker"}
			gw.publish(t, marker.Topic, marker.Payload)

			if diff := cmp.Diff([]msg{secret}, alice.in.until(t, secret)); diff != "" {
				t.Errorf("alice received (-want +got):\n%s", diff)
			}
			// The marker may come once per matching filter; the first is enough.
			if diff := cmp.Diff([]msg{marker}, spy.until(t, marker)); diff != "" {
				t.Errorf("%s as %s received (-want +got):\n%s", tc.clientID, tc.user, diff)
			}
		})
	}
}

// A device cannot publish to a down topic: no spoofed kick or result.
func TestSpoofedDownMessageDropped(t *testing.T) {
	for _, tc := range []struct {
		name           string
		user, clientID string
	}{
		{"same user, other instance", "alice", "inst-a2"},
		{"other user", "bob", "inst-b"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := startACLBroker(t)
			alice := connect(t, b, "alice", "inst-a")
			alice.subscribe(t, topics.Down("alice", "inst-a"))
			gw := connect(t, b, "chatgw", "chatgw")

			kick := string(mqtt.Encode(mqtt.Message{Type: mqtt.TypeKick, Reason: mqtt.KickAdmin}))
			mustPubDenied(t, b, tc.user, tc.clientID, topics.Down("alice", "inst-a"), kick)
			marker := msg{topics.Down("alice", "inst-a"), "marker"}
			gw.publish(t, marker.Topic, marker.Payload)

			want := []msg{marker}
			if diff := cmp.Diff(want, alice.in.until(t, marker)); diff != "" {
				t.Errorf("alice received (-want +got):\n%s", diff)
			}
		})
	}
}

// The ACL cannot reserve a client id: any device that knows the gateway's
// client id can connect with it and so take over the gateway's persistent
// session (which is why chatgw's client id is random and secret). Mosquitto then starts a
// fresh session, because the username differs, so the device gets none of the
// requests queued for the gateway (they are lost: a denial of service, not a
// leak; see build/mosquitto/README.md). The gateway itself resuming is the
// control: it does get the queued request.
func TestGatewaySessionTakeover(t *testing.T) {
	request := msg{topics.Up("alice", "inst-a"), "alice's login"}
	for _, tc := range []struct {
		name   string
		user   string
		filter string
		marker msg // sent by alice if an up topic, else by the gateway
		want   []msg
	}{
		{
			name: "gateway resumes", user: "chatgw", filter: topics.UpFilter(),
			marker: msg{topics.Up("alice", "inst-a"), "marker"},
			want:   []msg{request, {topics.Up("alice", "inst-a"), "marker"}},
		},
		{
			name: "device takes over", user: "bob", filter: topics.Down("bob", "chatgw"),
			marker: msg{topics.Down("bob", "chatgw"), "marker"},
			want:   []msg{{topics.Down("bob", "chatgw"), "marker"}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := startACLBroker(t)
			persistent := func(o *paho.ClientOptions) { o.SetCleanSession(false) }
			gw := connect(t, b, "chatgw", "chatgw", persistent)
			gw.subscribe(t, topics.UpFilter())
			gw.c.Disconnect(250) // the session stays, and queues what arrives

			alice := connect(t, b, "alice", "inst-a")
			alice.publish(t, request.Topic, request.Payload)

			// -c: a persistent session, to resume or take over the gateway's.
			got, _ := subArgs(t, b, tc.user, "chatgw", []string{"-c"}, tc.filter)
			sender := alice
			if !strings.HasPrefix(tc.marker.Topic, "chat/v1/up/") {
				sender = connect(t, b, "chatgw", "chatgw-2")
			}
			sender.publish(t, tc.marker.Topic, tc.marker.Payload)

			if diff := cmp.Diff(tc.want, got.until(t, tc.marker)); diff != "" {
				t.Errorf("%s as client chatgw received (-want +got):\n%s", tc.user, diff)
			}
		})
	}
}

func TestConnectRefused(t *testing.T) {
	b := startACLBroker(t)
	for _, tc := range []struct {
		name, user, password string
	}{
		{"wrong password", "alice", "wrong"},
		{"gateway with a device's password", "chatgw", users["alice"]},
		{"unknown user", "mallory", "mallory-secret"},
		{"no credentials", "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := pub(t, b, tc.user, tc.password, "inst-a", topics.Up("alice", "inst-a"), "login")
			var exit *exec.ExitError
			if !errors.As(err, &exit) {
				t.Fatalf("mosquitto_pub: got error %v, want a non-zero exit\n%s", err, out)
			}
			if !strings.Contains(out, "not authorised") {
				t.Errorf("mosquitto_pub exited with %d and %q, want a refusal that says \"not authorised\"", exit.ExitCode(), out)
			}
		})
	}
}

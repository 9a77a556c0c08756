package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"chatd/client"
	"chatd/internal/proctest"
	"chatd/mqtt/mosquittotest"
)

const dynsecGatewayID = "chatgw-e2e-0123456789abcdef"

// mosquittoDynsec starts a real Mosquitto with the dynamic-security file
// that `chatgw mosquitto-dynsec` writes for devices (user -> client id),
// and chatgw on it with its bound client id.
func (e *env) mosquittoDynsec(devices map[string]string) {
	e.t.Helper()
	var fleet strings.Builder
	for u, id := range devices {
		fleet.WriteString(u + " " + id + " " + u + "-pass\n")
		os.WriteFile(filepath.Join(e.dir, u+".pass"), []byte(u+"-pass\n"), 0o600)
	}
	fleetPath, gwPass, out := filepath.Join(e.dir, "fleet"), filepath.Join(e.dir, "gw.pass"), filepath.Join(e.dir, "dynsec.json")
	os.WriteFile(fleetPath, []byte(fleet.String()), 0o600)
	os.WriteFile(gwPass, []byte("gw-pass\n"), 0o600)
	if msg, err := exec.Command(proctest.Binary(e.t, "chatgw"), "mosquitto-dynsec", "--fleet", fleetPath,
		"--gateway-client-id", dynsecGatewayID, "--gateway-password-file", gwPass, "--out", out).CombinedOutput(); err != nil {
		e.t.Fatalf("chatgw mosquitto-dynsec: %v\n%s", err, msg)
	}
	e.mosq = mosquittotest.Start(e.t, mosquittotest.Config{Shipped: true, Dynsec: out})
	e.broker = e.mosq.URL()
	e.gw = proctest.Start(e.t, proctest.Binary(e.t, "chatgw"), "serve", "--sdkappid", appID, "--key-file", e.key,
		"--broker", e.broker, "--broker-username", "chatgw", "--broker-password-file", gwPass,
		"--broker-client-id", dynsecGatewayID, "--admin", e.adminS, "--state", filepath.Join(e.dir, "gw.db"))
	proctest.Wait(e.t, 10*time.Second, "the gateway's admin socket", func() bool { _, err := os.Stat(e.adminS); return err == nil })
}

// The real chatd with [mqtt] client_id set to the id its account is bound
// to logs in through the real chatgw on Mosquitto's dynamic-security
// plugin; the same chatd with another client id is refused by the broker
// and says why.
func TestE2EMosquittoDynsec(t *testing.T) {
	e := newEnv(t)
	e.mosquittoDynsec(map[string]string{"dev-42": "dev-42-a"})
	e.mqttCfg = "client_id = \"dev-42-a\"\n"
	a := e.device("a", "dev-42", "")
	s := a.waitLogined()
	if s.Instance != "dev-42-a" {
		t.Errorf("instance %q, want the configured dev-42-a", s.Instance)
	}
	if got := e.gatewaySessions("dev-42"); !strings.Contains(got, `"instance": "dev-42-a"`) || !strings.Contains(got, s.Session) {
		t.Errorf("the gateway's view of dev-42: %s", got)
	}
	if code := a.p.Stop(); code != 0 {
		t.Errorf("chatd exited %d", code)
	}

	// Not the bound id: the broker refuses the account's CONNECT.
	e.mqttCfg = "client_id = \"dev-42-b\"\n"
	b := e.device("b", "dev-42", "")
	b.waitFor("a refused connection reported", func(s client.Status) bool {
		return !s.Connected && s.LastError.Code != 0
	})
	if le := b.status().LastError; le.Code != 6017 || !strings.Contains(le.Message, "client_id") {
		t.Errorf("with another client id: %+v, want 6017 naming client_id", le)
	}
}

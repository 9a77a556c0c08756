package main

import (
	"flag"
	"io"
	"reflect"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// Every field of fileConfig is an option (a flag), and every option a field.
func TestOptionsCoverFileConfig(t *testing.T) {
	var keys []string
	rt := reflect.TypeOf(fileConfig{})
	for i := 0; i < rt.NumField(); i++ {
		keys = append(keys, rt.Field(i).Tag.Get("toml"))
	}
	var opts []string
	for _, o := range options {
		opts = append(opts, o.key)
	}
	if diff := cmp.Diff(keys, opts); diff != "" {
		t.Errorf("fileConfig's TOML keys and options differ (-fileConfig +options):\n%s", diff)
	}
	// Each option's setter fills its own field, and only that one.
	for _, o := range options {
		var fc fileConfig
		v := "7"
		if err := o.set(&fc, v); err != nil {
			t.Fatalf("%s: %v", o.key, err)
		}
		rv := reflect.ValueOf(fc)
		for i := 0; i < rt.NumField(); i++ {
			set := !rv.Field(i).IsZero()
			if mine := rt.Field(i).Tag.Get("toml") == o.key; set != mine {
				t.Errorf("--%s sets %s: %v", o.flag(), rt.Field(i).Tag.Get("toml"), set)
			}
		}
	}
}

func parseServe(t *testing.T, args ...string) (fileConfig, error) {
	t.Helper()
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	sf := newServeFlags(fs)
	if err := fs.Parse(args); err != nil {
		return fileConfig{}, err
	}
	return sf.load()
}

func TestFlagsOverrideFile(t *testing.T) {
	conf := writeFile(t, "chatgw.toml", `
sdkappid = 1400000001
key_file = "/etc/chatgw/key"
embedded_broker = "127.0.0.1:1883"
admin = "/run/chatgw/admin.sock"
policy = "dual"
`)
	got, err := parseServe(t, "--config", conf, "--sdkappid", "1400000002", "--policy", "multi", "--broker-client-id", "gw-2")
	if err != nil {
		t.Fatal(err)
	}
	want := fileConfig{
		SDKAppID: 1400000002, KeyFile: "/etc/chatgw/key", EmbeddedBroker: "127.0.0.1:1883",
		Admin: "/run/chatgw/admin.sock", Policy: "multi", BrokerClientID: "gw-2",
	}
	if diff := cmp.Diff(want, got, cmp.AllowUnexported(fileConfig{})); diff != "" {
		t.Errorf("config (-want +got):\n%s", diff)
	}
	if _, err := parseServe(t, "--sdkappid", "0"); err == nil || !strings.Contains(err.Error(), "SDKAppID") {
		t.Errorf("--sdkappid 0: %v, want an error naming the SDKAppID", err)
	}
}

// The unit's ExecCondition: skip (exit 1, saying what is missing) until
// the config names the app, its key and a broker. A broken file lets the
// unit start, so that it fails visibly instead of being skipped.
func TestServeConfigured(t *testing.T) {
	empty := writeFile(t, "empty.toml", "# nothing set\n")
	full := writeFile(t, "full.toml", "sdkappid = 1\nkey_file = \"/nonexistent\"\nembedded_broker = \"127.0.0.1:0\"\n")
	for _, tc := range []struct {
		name     string
		args     []string
		wantCode int
		wantErr  string
	}{
		{"empty file", []string{"serve", "--config", empty, "--configured"}, 1, "does not set sdkappid, key_file, embedded_broker, broker or nats yet"},
		{"no broker", []string{"serve", "--config", empty, "--sdkappid", "1", "--key-file", "k", "--configured"}, 1, "embedded_broker, broker or nats"},
		{"configured", []string{"serve", "--config", full, "--configured"}, 0, ""},
		{"broken file", []string{"serve", "--config", writeFile(t, "bad.toml", "sdkappid = \n"), "--configured"}, 0, "bad.toml"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, errOut, code := chatgw(t, tc.args...)
			if code != tc.wantCode || !strings.Contains(errOut, tc.wantErr) {
				t.Errorf("exit %d, stderr %q; want exit %d and %q", code, errOut, tc.wantCode, tc.wantErr)
			}
		})
	}
}

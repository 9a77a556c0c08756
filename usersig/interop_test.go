package usersig

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

const interopHint = "run `make npm-deps` (npm ci in usersig/interop)"

// interopCase is one input for interop/gen.js, in the JSON form it reads.
type interopCase struct {
	SDKAppID uint64  `json:"sdkappid"`
	Key      string  `json:"key"`
	User     string  `json:"user"`
	Expire   int64   `json:"expire"`
	UserBuf  *string `json:"userbuf"` // base64, nil for none
	NowMS    int64   `json:"now_ms"`
}

// requireInterop skips the test (or fails it when CHATD_REQUIRE_INTEROP=1)
// when the npm package or node is missing.
func requireInterop(t *testing.T) {
	t.Helper()
	missing := func(what string) {
		t.Helper()
		msg := what + ": " + interopHint
		if os.Getenv("CHATD_REQUIRE_INTEROP") == "1" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	if _, err := os.Stat(filepath.Join("interop", "node_modules")); err != nil {
		missing("usersig/interop/node_modules is missing")
	}
	if _, err := os.Stat(filepath.Join("interop", "node_modules", "tls-sig-api-v2", "TLSSigAPIv2.js")); err != nil {
		missing("tls-sig-api-v2 is not installed in usersig/interop/node_modules")
	}
	if _, err := exec.LookPath("node"); err != nil {
		missing("node is not in PATH")
	}
}

// nodeGenerate runs interop/gen.js and returns one UserSig per case.
func nodeGenerate(t *testing.T, cases []interopCase) []string {
	t.Helper()
	in, err := json.Marshal(cases)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", "gen.js")
	cmd.Dir = "interop"
	cmd.Stdin = bytes.NewReader(in)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("node gen.js: %v\nstderr:\n%s", err, stderr.String())
	}
	var sigs []string
	if err := json.Unmarshal(stdout.Bytes(), &sigs); err != nil {
		t.Fatalf("node gen.js output is not a JSON array of strings: %v\n%s", err, stdout.String())
	}
	if len(sigs) != len(cases) {
		t.Fatalf("node gen.js returned %d UserSigs for %d cases", len(sigs), len(cases))
	}
	return sigs
}

func b64(b []byte) *string {
	s := base64.StdEncoding.EncodeToString(b)
	return &s
}

// TestInterop checks byte compatibility with the official npm package
// tls-sig-api-v2@1.0.2: its UserSigs verify with Verify, and Generate signs
// exactly the same content (same TLS.sig) for the same inputs.
func TestInterop(t *testing.T) {
	requireInterop(t)

	const hexKey = testKeyText
	binary := []byte{0x00, 0xff, 0x80, 0x7f, '\n', '"', '\\', 0x01, 0xfe}
	long := make([]byte, 300)
	for i := range long {
		long[i] = byte(i * 7)
	}
	cases := []struct {
		name string
		c    interopCase
	}{
		{"plain", interopCase{1400000000, hexKey, "alice", 86400, nil, 1700000000000}},
		{"sub-second clock", interopCase{1400000000, hexKey, "alice", 86400, nil, 1700000000999}},
		{"32-byte id", interopCase{1400000001, hexKey, "abcdefghijklmnopqrstuvwxyz_-0123", 180 * 86400, nil, 1735689600123}},
		{"underscore and dash", interopCase{20000001, hexKey, "_user-01_", 300, nil, 1717171717171}},
		{"digits only id", interopCase{1600012345, hexKey, "10086", 1, nil, 1600000000000}},
		{"non-ascii id", interopCase{1400000000, hexKey, "张三", 86400, nil, 1700000000000}},
		{"max uint32 sdkappid", interopCase{4294967295, hexKey, "bob", 10 * 365 * 86400, nil, 1700000000000}},
		{"max safe integer sdkappid", interopCase{9007199254740991, hexKey, "bob", 86400, nil, 1700000000000}},
		{"non-hex key", interopCase{1400000000, "ключ secret: not hex!", "carol", 604800, nil, 1700000000000}},
		{"ascii userbuf", interopCase{1400000000, hexKey, "alice", 86400, b64([]byte("room-1234")), 1700000000000}},
		{"binary userbuf", interopCase{1400000002, hexKey, "dev_01-x", 300, b64(binary), 1700000000500}},
		{"long binary userbuf", interopCase{20000001, hexKey, "abcdefghijklmnopqrstuvwxyz_-0123", 3600, b64(long), 1700000000000}},
		{"empty userbuf", interopCase{1400000000, hexKey, "alice", 86400, b64([]byte{}), 1700000000000}},
	}
	in := make([]interopCase, len(cases))
	for i, tc := range cases {
		in[i] = tc.c
	}
	sigs := nodeGenerate(t, in)

	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, nodeSig := tc.c, sigs[i]
			key := NewSecret(c.Key)
			now := time.UnixMilli(c.NowMS)
			var ub []byte
			if c.UserBuf != nil {
				var err error
				if ub, err = base64.StdEncoding.DecodeString(*c.UserBuf); err != nil {
					t.Fatal(err)
				}
			}
			issued := c.NowMS / 1000
			content := fmt.Sprintf("TLS.identifier:%s\nTLS.sdkappid:%d\nTLS.time:%d\nTLS.expire:%d\n", c.User, c.SDKAppID, issued, c.Expire)
			if c.UserBuf != nil {
				content += "TLS.userbuf:" + *c.UserBuf + "\n"
			}
			want := &Ticket{
				Version:    "2.0",
				Identifier: c.User,
				SDKAppID:   c.SDKAppID,
				Time:       issued,
				Expire:     c.Expire,
				UserBuf:    ub,
				Sig:        wantSig(c.Key, content),
			}

			// Node's UserSig verifies and decodes to the expected fields.
			got, err := Verify(nodeSig, c.SDKAppID, key, c.User, now)
			if err != nil {
				t.Fatalf("Verify(node UserSig): code %d: %v", CodeOf(err), err)
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("node UserSig decoded (-want +got):\n%s", diff)
			}

			// Our UserSig for the same inputs has the same fields and HMAC.
			ours, err := GenerateWithUserBuf(c.SDKAppID, key, c.User, time.Duration(c.Expire)*time.Second, ub, now)
			if err != nil {
				t.Fatal(err)
			}
			dec, err := Decode(ours)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(got, dec); diff != "" {
				t.Errorf("our UserSig vs node's (-node +ours):\n%s", diff)
			}

			// Failures (and the expiry boundary) on a node UserSig.
			checks := []struct {
				name string
				app  uint64
				key  Secret
				user string
				now  time.Time
				want int
			}{
				{"wrong key", c.SDKAppID, NewSecret(c.Key + "x"), c.User, now, CodeBadSignature},
				{"wrong user", c.SDKAppID, key, c.User + "x", now, CodeIdentifierMismatch},
				{"wrong sdkappid", c.SDKAppID + 1, key, c.User, now, CodeSDKAppIDMismatch},
				{"last valid second", c.SDKAppID, key, c.User, time.Unix(issued+c.Expire, 999e6), 0},
				{"expired", c.SDKAppID, key, c.User, time.Unix(issued+c.Expire+1, 0), CodeExpired},
			}
			for _, f := range checks {
				t.Run(f.name, func(t *testing.T) {
					_, err := Verify(nodeSig, f.app, f.key, f.user, f.now)
					if gotCode := CodeOf(err); gotCode != f.want {
						t.Errorf("code = %d, want %d (%v)", gotCode, f.want, err)
					}
					if err != nil && strings.Contains(err.Error(), nodeSig) {
						t.Errorf("error contains the UserSig")
					}
				})
			}
		})
	}
}

// TestInteropNodeJSONLayout documents the JSON the npm package writes: field
// order, and numbers as JSON numbers (not strings).
func TestInteropNodeJSONLayout(t *testing.T) {
	requireInterop(t)
	sigs := nodeGenerate(t, []interopCase{
		{1400000000, testKeyText, "alice", 86400, nil, 1700000000000},
		{1400000000, testKeyText, "alice", 86400, b64([]byte{1, 2}), 1700000000000},
	})
	sig := wantSig(testKeyText, "TLS.identifier:alice\nTLS.sdkappid:1400000000\nTLS.time:1700000000\nTLS.expire:86400\n")
	sigUB := wantSig(testKeyText, "TLS.identifier:alice\nTLS.sdkappid:1400000000\nTLS.time:1700000000\nTLS.expire:86400\nTLS.userbuf:AQI=\n")
	want := []string{
		`{"TLS.ver":"2.0","TLS.identifier":"alice","TLS.sdkappid":1400000000,"TLS.time":1700000000,"TLS.expire":86400,"TLS.sig":` + strconv.Quote(sig) + `}`,
		`{"TLS.ver":"2.0","TLS.identifier":"alice","TLS.sdkappid":1400000000,"TLS.time":1700000000,"TLS.expire":86400,"TLS.userbuf":"AQI=","TLS.sig":` + strconv.Quote(sigUB) + `}`,
	}
	for i, s := range sigs {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			if got := rawJSON(t, s); got != want[i] {
				t.Errorf("node JSON:\n got %s\nwant %s", got, want[i])
			}
			// Our encoder writes the same document.
			ours, err := Decode(s)
			if err != nil {
				t.Fatal(err)
			}
			js, err := encodeJSON(ours)
			if err != nil {
				t.Fatal(err)
			}
			if string(js) != want[i] {
				t.Errorf("our JSON:\n got %s\nwant %s", js, want[i])
			}
		})
	}
}

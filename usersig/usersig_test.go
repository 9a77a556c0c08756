package usersig

import (
	"bytes"
	"compress/zlib"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// testKeyText is the public example key from the tls-sig-api-v2 README.
const testKeyText = "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e"

var (
	testKey   = NewSecret(testKeyText)
	otherKey  = NewSecret("0000000000000000000000000000000000000000000000000000000000000000")
	testApp   = uint64(1400000000)
	testIssue = time.Unix(1700000000, 0)
)

// wantSig computes TLS.sig independently of the package: HMAC-SHA256 keyed
// with the raw key bytes over the literal content string.
func wantSig(key, content string) string {
	m := hmac.New(sha256.New, []byte(key))
	m.Write([]byte(content))
	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

// rawUserSig builds a UserSig from arbitrary JSON text, independently of the
// package's encoder.
func rawUserSig(t *testing.T, jsonText string) string {
	t.Helper()
	var z bytes.Buffer
	zw := zlib.NewWriter(&z)
	if _, err := zw.Write([]byte(jsonText)); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return escapeB64(base64.StdEncoding.EncodeToString(z.Bytes()))
}

func escapeB64(s string) string {
	return strings.NewReplacer("+", "*", "/", "-", "=", "_").Replace(s)
}

// rawJSON decodes a UserSig to its JSON text, independently of Decode.
func rawJSON(t *testing.T, userSig string) string {
	t.Helper()
	b, err := base64.StdEncoding.DecodeString(strings.NewReplacer("*", "+", "-", "/", "_", "=").Replace(userSig))
	if err != nil {
		t.Fatalf("base64: %v", err)
	}
	zr, err := zlib.NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("zlib: %v", err)
	}
	var out bytes.Buffer
	if _, err := out.ReadFrom(zr); err != nil {
		t.Fatalf("zlib: %v", err)
	}
	return out.String()
}

func mustGenerate(t *testing.T, sdkappid uint64, key Secret, user string, expire time.Duration, userBuf []byte, now time.Time) string {
	t.Helper()
	var s string
	var err error
	if userBuf == nil {
		s, err = Generate(sdkappid, key, user, expire, now)
	} else {
		s, err = GenerateWithUserBuf(sdkappid, key, user, expire, userBuf, now)
	}
	if err != nil {
		t.Fatalf("Generate: %v", err)
	}
	return s
}

func TestRoundTrip(t *testing.T) {
	tests := []struct {
		name    string
		app     uint64
		user    string
		expire  time.Duration
		userBuf []byte
		now     time.Time
		content string // expected signed content
	}{
		{
			name: "no userbuf", app: testApp, user: "alice", expire: 24 * time.Hour, now: testIssue,
			content: "TLS.identifier:alice\nTLS.sdkappid:1400000000\nTLS.time:1700000000\nTLS.expire:86400\n",
		},
		{
			name: "binary userbuf", app: 20000001, user: "bob_01-x", expire: 300 * time.Second,
			userBuf: []byte{0, 1, 2, 0xff, 0x80, '\n'}, now: testIssue,
			content: "TLS.identifier:bob_01-x\nTLS.sdkappid:20000001\nTLS.time:1700000000\nTLS.expire:300\nTLS.userbuf:AAEC/4AK\n",
		},
		{
			name: "empty non-nil userbuf is signed", app: testApp, user: "carol", expire: time.Hour, userBuf: []byte{}, now: testIssue,
			content: "TLS.identifier:carol\nTLS.sdkappid:1400000000\nTLS.time:1700000000\nTLS.expire:3600\nTLS.userbuf:\n",
		},
		{
			name: "32-byte id, sub-second now and expire", app: 4294967295, user: "abcdefghijklmnopqrstuvwxyz_-0123",
			expire: 180*24*time.Hour + 999*time.Millisecond, now: time.Unix(1700000000, 999999999),
			content: "TLS.identifier:abcdefghijklmnopqrstuvwxyz_-0123\nTLS.sdkappid:4294967295\nTLS.time:1700000000\nTLS.expire:15552000\n",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			us := mustGenerate(t, tc.app, testKey, tc.user, tc.expire, tc.userBuf, tc.now)
			if strings.ContainsAny(us, "+/=") {
				t.Errorf("UserSig contains +, / or =: %s", us)
			}
			want := &Ticket{
				Version:    "2.0",
				Identifier: tc.user,
				SDKAppID:   tc.app,
				Time:       tc.now.Unix(),
				Expire:     int64(tc.expire / time.Second),
				UserBuf:    tc.userBuf,
				Sig:        wantSig(testKeyText, tc.content),
			}
			got, err := Verify(us, tc.app, testKey, tc.user, tc.now)
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("Verify ticket (-want +got):\n%s", diff)
			}
			dec, err := Decode(us)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if diff := cmp.Diff(want, dec); diff != "" {
				t.Errorf("Decode ticket (-want +got):\n%s", diff)
			}
		})
	}
}

// TestJSONLayout checks the JSON inside a generated UserSig, decoded
// independently: field names, types and the HMAC over the documented content.
func TestJSONLayout(t *testing.T) {
	tests := []struct {
		name    string
		userBuf []byte
		want    string
	}{
		{
			name: "no userbuf",
			want: `{"TLS.ver":"2.0","TLS.identifier":"alice","TLS.sdkappid":1400000000,"TLS.time":1700000000,"TLS.expire":86400,"TLS.sig":"` +
				wantSig(testKeyText, "TLS.identifier:alice\nTLS.sdkappid:1400000000\nTLS.time:1700000000\nTLS.expire:86400\n") + `"}`,
		},
		{
			name:    "userbuf",
			userBuf: []byte("room<1>&"),
			want: `{"TLS.ver":"2.0","TLS.identifier":"alice","TLS.sdkappid":1400000000,"TLS.time":1700000000,"TLS.expire":86400,"TLS.userbuf":"cm9vbTwxPiY=","TLS.sig":"` +
				wantSig(testKeyText, "TLS.identifier:alice\nTLS.sdkappid:1400000000\nTLS.time:1700000000\nTLS.expire:86400\nTLS.userbuf:cm9vbTwxPiY=\n") + `"}`,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			us := mustGenerate(t, testApp, testKey, "alice", 24*time.Hour, tc.userBuf, testIssue)
			if got := rawJSON(t, us); got != tc.want {
				t.Errorf("JSON:\n got %s\nwant %s", got, tc.want)
			}
		})
	}
}

// TestLenientJSON feeds hand-written JSON documents in layouts other
// implementations produce.
func TestLenientJSON(t *testing.T) {
	sig := wantSig(testKeyText, "TLS.identifier:alice\nTLS.sdkappid:1400000000\nTLS.time:1700000000\nTLS.expire:86400\n")
	sigUB := wantSig(testKeyText, "TLS.identifier:alice\nTLS.sdkappid:1400000000\nTLS.time:1700000000\nTLS.expire:86400\nTLS.userbuf:AAE=\n")
	want := &Ticket{Version: "2.0", Identifier: "alice", SDKAppID: testApp, Time: 1700000000, Expire: 86400, Sig: sig}
	wantUB := &Ticket{Version: "2.0", Identifier: "alice", SDKAppID: testApp, Time: 1700000000, Expire: 86400, UserBuf: []byte{0, 1}, Sig: sigUB}
	tests := []struct {
		name string
		json string
		want *Ticket
	}{
		{
			name: "reversed field order",
			json: `{"TLS.sig":"` + sig + `","TLS.expire":86400,"TLS.time":1700000000,"TLS.sdkappid":1400000000,"TLS.identifier":"alice","TLS.ver":"2.0"}`,
			want: want,
		},
		{
			name: "numeric strings",
			json: `{"TLS.ver":"2.0","TLS.identifier":"alice","TLS.sdkappid":"1400000000","TLS.time":"1700000000","TLS.expire":"86400","TLS.sig":"` + sig + `"}`,
			want: want,
		},
		{
			name: "whitespace, unknown fields, userbuf first",
			json: "{\n  \"TLS.userbuf\" : \"AAE=\",\n  \"TLS.extra\": [1, 2],\n  \"TLS.expire\": 86400, \"TLS.sig\": \"" + sigUB +
				"\", \"TLS.identifier\": \"alice\", \"TLS.time\": \"1700000000\", \"TLS.sdkappid\": 1400000000, \"TLS.ver\": \"2.0\"\n}\n",
			want: wantUB,
		},
		{
			name: "null userbuf is no userbuf",
			json: `{"TLS.ver":"2.0","TLS.identifier":"alice","TLS.sdkappid":1400000000,"TLS.time":1700000000,"TLS.expire":86400,"TLS.userbuf":null,"TLS.sig":"` + sig + `"}`,
			want: want,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Verify(rawUserSig(t, tc.json), testApp, testKey, "alice", testIssue)
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("ticket (-want +got):\n%s", diff)
			}
		})
	}
}

// zipBomb returns a valid UserSig-sized zlib stream that inflates to far
// more than MaxJSONLen.
func zipBomb(t *testing.T) string {
	var z bytes.Buffer
	zw, _ := zlib.NewWriterLevel(&z, zlib.BestCompression)
	zw.Write([]byte(`{"TLS.ver":"`))
	zw.Write(bytes.Repeat([]byte("a"), 4<<20))
	zw.Write([]byte(`"}`))
	zw.Close()
	us := escapeB64(base64.StdEncoding.EncodeToString(z.Bytes()))
	if len(us) > MaxUserSigLen {
		t.Fatalf("zip bomb is %d bytes, too long for the test", len(us))
	}
	return us
}

func TestVerifyErrors(t *testing.T) {
	good := mustGenerate(t, testApp, testKey, "alice", 24*time.Hour, nil, testIssue)
	goodSig := wantSig(testKeyText, "TLS.identifier:alice\nTLS.sdkappid:1400000000\nTLS.time:1700000000\nTLS.expire:86400\n")
	doc := func(fields string) string {
		return rawUserSig(t, "{"+fields+"}")
	}
	base := `"TLS.ver":"2.0","TLS.identifier":"alice","TLS.sdkappid":1400000000,"TLS.time":1700000000,"TLS.expire":86400`
	withSig := base + `,"TLS.sig":"` + goodSig + `"`
	replace := func(old, new string) string {
		if !strings.Contains(withSig, old) {
			t.Fatalf("%q not in test document", old)
		}
		return doc(strings.Replace(withSig, old, new, 1))
	}

	tests := []struct {
		name       string
		userSig    string
		app        uint64
		key        Secret
		user       string
		now        time.Time
		wantCode   int
		wantInMsg  string
		wantTicket bool
	}{
		{name: "valid", userSig: good, wantCode: 0, wantTicket: true},
		{name: "empty", userSig: "", wantCode: 70002, wantInMsg: "empty"},
		{name: "bad base64 character", userSig: "eJyr!!!!", wantCode: 70003, wantInMsg: "base64"},
		{name: "standard base64 alphabet +/ is not accepted", userSig: strings.NewReplacer("*", "+", "-", "/").Replace(good) + "+/", wantCode: 70003},
		{name: "padding in the middle", userSig: "eJyr_Vgrx", wantCode: 70003, wantInMsg: "base64"},
		{name: "trailing newline", userSig: good + "\n", wantCode: 70003, wantInMsg: "whitespace"},
		{name: "decodes to nothing", userSig: "___", wantCode: 70003},
		{name: "not zlib", userSig: escapeB64(base64.StdEncoding.EncodeToString([]byte(`{"TLS.ver":"2.0"}`))), wantCode: 70003, wantInMsg: "zlib"},
		{name: "zlib but not JSON", userSig: rawUserSig(t, "hello"), wantCode: 70003, wantInMsg: "JSON"},
		{name: "JSON array", userSig: rawUserSig(t, "[1,2]"), wantCode: 70003, wantInMsg: "JSON"},
		{name: "trailing garbage after JSON", userSig: rawUserSig(t, "{"+withSig+"}x"), wantCode: 70003},
		{name: "ver 1.0", userSig: replace(`"TLS.ver":"2.0"`, `"TLS.ver":"1.0"`), wantCode: 70003, wantInMsg: "TLS.ver"},
		{name: "ver as number", userSig: replace(`"TLS.ver":"2.0"`, `"TLS.ver":2.0`), wantCode: 70003, wantInMsg: "TLS.ver"},
		{name: "missing ver", userSig: replace(`"TLS.ver":"2.0",`, ``), wantCode: 70003, wantInMsg: "no TLS.ver"},
		{name: "missing identifier", userSig: replace(`"TLS.identifier":"alice",`, ``), wantCode: 70003, wantInMsg: "TLS.identifier"},
		{name: "empty identifier", userSig: replace(`"TLS.identifier":"alice"`, `"TLS.identifier":""`), wantCode: 70003, wantInMsg: "TLS.identifier"},
		{name: "identifier as number", userSig: replace(`"TLS.identifier":"alice"`, `"TLS.identifier":7`), wantCode: 70003, wantInMsg: "TLS.identifier"},
		{name: "missing sdkappid", userSig: replace(`"TLS.sdkappid":1400000000,`, ``), wantCode: 70003, wantInMsg: "TLS.sdkappid"},
		{name: "null time", userSig: replace(`"TLS.time":1700000000`, `"TLS.time":null`), wantCode: 70003, wantInMsg: "TLS.time"},
		{name: "missing expire", userSig: replace(`,"TLS.expire":86400`, ``), wantCode: 70003, wantInMsg: "TLS.expire"},
		{name: "missing sig", userSig: doc(base), wantCode: 70003, wantInMsg: "TLS.sig"},
		{name: "empty sig", userSig: doc(base + `,"TLS.sig":""`), wantCode: 70003, wantInMsg: "TLS.sig"},
		{name: "sig not base64", userSig: doc(base + `,"TLS.sig":"not base64!"`), wantCode: 70003, wantInMsg: "TLS.sig"},
		{name: "negative time", userSig: replace(`"TLS.time":1700000000`, `"TLS.time":-1`), wantCode: 70003, wantInMsg: "negative TLS.time"},
		{name: "negative expire string", userSig: replace(`"TLS.expire":86400`, `"TLS.expire":"-86400"`), wantCode: 70003, wantInMsg: "negative TLS.expire"},
		{name: "fractional expire", userSig: replace(`"TLS.expire":86400`, `"TLS.expire":86400.5`), wantCode: 70003, wantInMsg: "TLS.expire"},
		{name: "exponent time", userSig: replace(`"TLS.time":1700000000`, `"TLS.time":1.7e9`), wantCode: 70003, wantInMsg: "TLS.time"},
		{name: "leading zero sdkappid string", userSig: replace(`"TLS.sdkappid":1400000000`, `"TLS.sdkappid":"01400000000"`), wantCode: 70003, wantInMsg: "TLS.sdkappid"},
		{name: "non-numeric string", userSig: replace(`"TLS.expire":86400`, `"TLS.expire":"a day"`), wantCode: 70003, wantInMsg: "TLS.expire"},
		{name: "boolean expire", userSig: replace(`"TLS.expire":86400`, `"TLS.expire":true`), wantCode: 70003, wantInMsg: "TLS.expire"},
		{name: "sdkappid out of range", userSig: replace(`"TLS.sdkappid":1400000000`, `"TLS.sdkappid":18446744073709551616`), wantCode: 70003, wantInMsg: "range"},
		{name: "time plus expire overflows", userSig: replace(`"TLS.expire":86400`, `"TLS.expire":9223372036854775807`), wantCode: 70003, wantInMsg: "range"},
		{name: "userbuf not base64", userSig: doc(withSig + `,"TLS.userbuf":"%%%"`), wantCode: 70003, wantInMsg: "TLS.userbuf"},
		{name: "userbuf not canonical", userSig: doc(withSig + `,"TLS.userbuf":"AAE=\n"`), wantCode: 70003, wantInMsg: "TLS.userbuf"},
		{name: "userbuf number", userSig: doc(withSig + `,"TLS.userbuf":5`), wantCode: 70003, wantInMsg: "TLS.userbuf"},
		{name: "too long", userSig: strings.Repeat("A", MaxUserSigLen+1), wantCode: 70003, wantInMsg: "long"},
		{name: "zip bomb", userSig: zipBomb(t), wantCode: 70003, wantInMsg: "decompresses"},
		{name: "truncated to half", userSig: good[:len(good)/2], wantCode: 70005, wantInMsg: "truncated"},
		{name: "truncated by one char", userSig: good[:len(good)-3], wantCode: 70005, wantInMsg: "truncated"},
		{name: "truncated to the zlib header", userSig: good[:2], wantCode: 70005},
		{name: "sdkappid mismatch", userSig: good, app: 1400000001, wantCode: 70014, wantInMsg: "UserSig is for 1400000000, login is for 1400000001"},
		{name: "sdkappid checked before identifier", userSig: good, app: 1400000001, user: "bob", wantCode: 70014},
		{name: "identifier mismatch", userSig: good, user: "bob", wantCode: 70013, wantInMsg: `(UserSig is for "alice", login is for "bob")`},
		{name: "identifier is case sensitive", userSig: good, user: "Alice", wantCode: 70013},
		{name: "identifier checked before key", userSig: good, user: "bob", key: otherKey, wantCode: 70013},
		{name: "wrong key", userSig: good, key: otherKey, wantCode: 70009, wantInMsg: "different secret key"},
		{name: "key checked before expiry", userSig: good, key: otherKey, now: testIssue.Add(48 * time.Hour), wantCode: 70009},
		{name: "tampered expire", userSig: replace(`"TLS.expire":86400`, `"TLS.expire":86401`), wantCode: 70009},
		{name: "tampered userbuf added", userSig: doc(withSig + `,"TLS.userbuf":""`), wantCode: 70009},
		{name: "expired", userSig: good, now: testIssue.Add(24*time.Hour + time.Second), wantCode: 70001, wantInMsg: "expired at 2023-11-15T22:13:20Z", wantTicket: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			app, key, user, now := testApp, testKey, "alice", testIssue
			if tc.app != 0 {
				app = tc.app
			}
			if !tc.key.IsZero() {
				key = tc.key
			}
			if tc.user != "" {
				user = tc.user
			}
			if !tc.now.IsZero() {
				now = tc.now
			}
			ticket, err := Verify(tc.userSig, app, key, user, now)
			if got := CodeOf(err); got != tc.wantCode {
				t.Fatalf("CodeOf(Verify) = %d, want %d (err: %v)", got, tc.wantCode, err)
			}
			if got := ticket != nil; got != tc.wantTicket {
				t.Errorf("Verify returned ticket: %v, want %v", got, tc.wantTicket)
			}
			if err == nil {
				return
			}
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("error %T is not an *Error", err)
			}
			msg := err.Error()
			if want := fmt.Sprintf("usersig: %d ", tc.wantCode); !strings.HasPrefix(msg, want) {
				t.Errorf("message %q does not start with %q", msg, want)
			}
			if !strings.Contains(msg, tc.wantInMsg) {
				t.Errorf("message %q does not contain %q", msg, tc.wantInMsg)
			}
			if tc.userSig != "" && strings.Contains(msg, tc.userSig) {
				t.Errorf("message contains the UserSig: %q", msg)
			}
			for _, secret := range []string{testKeyText, otherKey.Reveal(), goodSig} {
				if strings.Contains(msg, secret) {
					t.Errorf("message contains a key or signature: %q", msg)
				}
			}
			if len(msg) > 400 {
				t.Errorf("message is %d bytes long: %q", len(msg), msg)
			}
		})
	}
}

func TestExpiryBoundary(t *testing.T) {
	us := mustGenerate(t, testApp, testKey, "alice", 24*time.Hour, nil, testIssue)
	end := testIssue.Add(24 * time.Hour)
	tests := []struct {
		name     string
		now      time.Time
		wantCode int
	}{
		{name: "at issue", now: testIssue, wantCode: 0},
		{name: "before issue (clock skew)", now: testIssue.Add(-time.Hour), wantCode: 0},
		{name: "exactly time+expire", now: end, wantCode: 0},
		{name: "time+expire plus 999ms", now: end.Add(999 * time.Millisecond), wantCode: 0},
		{name: "time+expire plus 1s", now: end.Add(time.Second), wantCode: 70001},
		{name: "a year later", now: end.Add(365 * 24 * time.Hour), wantCode: 70001},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ticket, err := Verify(us, testApp, testKey, "alice", tc.now)
			if got := CodeOf(err); got != tc.wantCode {
				t.Fatalf("code = %d, want %d (err: %v)", got, tc.wantCode, err)
			}
			if ticket == nil {
				t.Fatal("no ticket")
			}
			if got, want := ticket.ExpiresAt(), end.UTC(); !got.Equal(want) {
				t.Errorf("ExpiresAt = %v, want %v", got, want)
			}
		})
	}
}

func TestGenerateInvalid(t *testing.T) {
	tests := []struct {
		name    string
		app     uint64
		key     Secret
		user    string
		expire  time.Duration
		now     time.Time
		userBuf []byte
		wantMsg string
	}{
		{name: "zero sdkappid", app: 0, key: testKey, user: "alice", expire: time.Hour, now: testIssue, wantMsg: "sdkappid"},
		{name: "empty key", app: testApp, key: Secret{}, user: "alice", expire: time.Hour, now: testIssue, wantMsg: "key is empty"},
		{name: "empty user", app: testApp, key: testKey, user: "", expire: time.Hour, now: testIssue, wantMsg: "userID is empty"},
		{name: "newline in user", app: testApp, key: testKey, user: "alice\nTLS.sdkappid:1", expire: time.Hour, now: testIssue, wantMsg: "control character"},
		{name: "zero expire", app: testApp, key: testKey, user: "alice", expire: 0, now: testIssue, wantMsg: "expire"},
		{name: "negative expire", app: testApp, key: testKey, user: "alice", expire: -time.Hour, now: testIssue, wantMsg: "expire"},
		{name: "sub-second expire", app: testApp, key: testKey, user: "alice", expire: 999 * time.Millisecond, now: testIssue, wantMsg: "expire"},
		{name: "userbuf too large", app: testApp, key: testKey, user: "alice", expire: time.Hour, now: testIssue, userBuf: bytes.Repeat([]byte{0}, 16<<10), wantMsg: "more than"},
		{name: "random userbuf too large", app: testApp, key: testKey, user: "alice", expire: time.Hour, now: testIssue, userBuf: pseudoRandom(7 << 10), wantMsg: "more than"},
		{name: "zero now", app: testApp, key: testKey, user: "alice", expire: time.Hour, now: time.Time{}, wantMsg: "1970"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ubs := [][]byte{nil, []byte("x")}
			if tc.userBuf != nil {
				ubs = [][]byte{tc.userBuf}
			}
			for _, ub := range ubs {
				_, err := GenerateWithUserBuf(tc.app, tc.key, tc.user, tc.expire, ub, tc.now)
				if err == nil {
					t.Fatal("no error")
				}
				if got := CodeOf(err); got != -1 {
					t.Errorf("CodeOf = %d, want -1 (plain error)", got)
				}
				if !strings.Contains(err.Error(), tc.wantMsg) {
					t.Errorf("error %q does not contain %q", err, tc.wantMsg)
				}
				if strings.Contains(err.Error(), testKeyText) {
					t.Errorf("error contains the key: %q", err)
				}
			}
		})
	}
}

// pseudoRandom returns n incompressible bytes, the same on every run.
func pseudoRandom(n int) []byte {
	b := make([]byte, n)
	x := uint32(2463534242)
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}

func TestVerifyInvalidArgs(t *testing.T) {
	us := mustGenerate(t, testApp, testKey, "alice", time.Hour, nil, testIssue)
	tests := []struct {
		name string
		app  uint64
		key  Secret
		user string
	}{
		{name: "zero sdkappid", app: 0, key: testKey, user: "alice"},
		{name: "empty key", app: testApp, key: Secret{}, user: "alice"},
		{name: "empty user", app: testApp, key: testKey, user: ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ticket, err := Verify(us, tc.app, tc.key, tc.user, testIssue)
			if got := CodeOf(err); got != -1 {
				t.Errorf("CodeOf = %d, want -1 (err: %v)", got, err)
			}
			if ticket != nil {
				t.Error("ticket returned with an argument error")
			}
		})
	}
}

func TestCodeOfAndMeaning(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want int
	}{
		{name: "nil", err: nil, want: 0},
		{name: "plain", err: errors.New("boom"), want: -1},
		{name: "direct", err: &Error{Code: 70013, Msg: "x"}, want: 70013},
		{name: "wrapped", err: fmt.Errorf("login: %w", &Error{Code: 70001, Msg: "x"}), want: 70001},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := CodeOf(tc.err); got != tc.want {
				t.Errorf("CodeOf = %d, want %d", got, tc.want)
			}
		})
	}
	unknown := Meaning(12345)
	for _, code := range []int{70001, 70002, 70003, 70005, 70009, 70013, 70014} {
		t.Run(fmt.Sprint(code), func(t *testing.T) {
			if m := Meaning(code); m == "" || m == unknown {
				t.Errorf("Meaning(%d) = %q", code, m)
			}
		})
	}
	if got, want := (&Error{Code: 70013, Msg: "identifier mismatch"}).Error(), "usersig: 70013 identifier mismatch"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

func TestSecretNeverPrinted(t *testing.T) {
	type config struct {
		SDKAppID uint64
		Key      Secret
		KeyPtr   *Secret
	}
	c := config{SDKAppID: testApp, Key: testKey, KeyPtr: &testKey}
	tests := []struct {
		name string
		out  func() (string, error)
	}{
		{name: "%v", out: func() (string, error) { return fmt.Sprintf("%v", testKey), nil }},
		{name: "%s", out: func() (string, error) { return fmt.Sprintf("%s", testKey), nil }},
		{name: "%+v", out: func() (string, error) { return fmt.Sprintf("%+v", testKey), nil }},
		{name: "%#v", out: func() (string, error) { return fmt.Sprintf("%#v", testKey), nil }},
		{name: "%q", out: func() (string, error) { return fmt.Sprintf("%q", testKey), nil }},
		{name: "%x", out: func() (string, error) { return fmt.Sprintf("%x", testKey), nil }},
		{name: "struct %v", out: func() (string, error) { return fmt.Sprintf("%v", c), nil }},
		{name: "struct %+v", out: func() (string, error) { return fmt.Sprintf("%+v", c), nil }},
		{name: "struct %#v", out: func() (string, error) { return fmt.Sprintf("%#v", c), nil }},
		{name: "pointer to struct %+v", out: func() (string, error) { return fmt.Sprintf("%+v", &c), nil }},
		{name: "json.Marshal struct", out: func() (string, error) { b, err := json.Marshal(c); return string(b), err }},
		{name: "json.Marshal map", out: func() (string, error) { b, err := json.Marshal(map[string]any{"k": testKey}); return string(b), err }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.out()
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(got, testKeyText) || strings.Contains(got, fmt.Sprintf("%x", testKeyText)) {
				t.Errorf("output reveals the key: %s", got)
			}
			if !strings.Contains(got, "redacted") && !strings.Contains(got, fmt.Sprintf("%x", "[redacted]")) {
				t.Errorf("output %q does not say redacted", got)
			}
		})
	}
}

func TestLoadKeyFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	tests := []struct {
		name    string
		path    string
		want    string
		wantErr string
	}{
		{name: "plain", path: write("plain", testKeyText), want: testKeyText},
		{name: "trailing newline", path: write("nl", testKeyText+"\n"), want: testKeyText},
		{name: "crlf and spaces", path: write("crlf", "  "+testKeyText+"\r\n"), want: testKeyText},
		{name: "bom", path: write("bom", "\ufeff"+testKeyText+"\n"), want: testKeyText},
		{name: "missing", path: filepath.Join(dir, "nope"), wantErr: "does not exist"},
		{name: "empty", path: write("empty", ""), wantErr: "is empty"},
		{name: "whitespace only", path: write("ws", " \n\t\n"), wantErr: "is empty"},
		{name: "two lines", path: write("two", testKeyText+"\n"+testKeyText+"\n"), wantErr: "more than one line"},
		{name: "directory", path: dir, wantErr: "not a regular file"},
		{name: "too large", path: write("large", strings.Repeat(testKeyText, 100)), wantErr: "larger than"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := LoadKeyFile(tc.path)
			if tc.wantErr != "" {
				if err == nil {
					t.Fatalf("no error, want %q", tc.wantErr)
				}
				if !strings.Contains(err.Error(), tc.wantErr) {
					t.Errorf("error %q does not contain %q", err, tc.wantErr)
				}
				if strings.Contains(err.Error(), testKeyText) {
					t.Errorf("error reveals the key: %q", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Reveal() != tc.want {
				t.Errorf("key mismatch (len %d, want len %d)", len(got.Reveal()), len(tc.want))
			}
		})
	}
}

// nodeCase is one UserSig produced by the official npm package, stored in
// testdata/node-generated.json.
type nodeCase struct {
	Name     string  `json:"name"`
	SDKAppID uint64  `json:"sdkappid"`
	Key      string  `json:"key"`
	User     string  `json:"user"`
	Expire   int64   `json:"expire"`
	UserBuf  *string `json:"userbuf"`
	NowMS    int64   `json:"now_ms"`
	Time     int64   `json:"time"`
	TLSSig   string  `json:"tls_sig"`
	UserSig  string  `json:"usersig"`
}

// TestKnownAnswer verifies UserSigs generated once by tls-sig-api-v2@1.0.2
// (see interop/gen.js) and checks that Generate signs the same content.
func TestKnownAnswer(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("testdata", "node-generated.json"))
	if err != nil {
		t.Fatal(err)
	}
	var file struct {
		Cases []nodeCase `json:"cases"`
	}
	if err := json.Unmarshal(b, &file); err != nil {
		t.Fatal(err)
	}
	if len(file.Cases) == 0 {
		t.Fatal("no cases")
	}
	for _, tc := range file.Cases {
		t.Run(tc.Name, func(t *testing.T) {
			key := NewSecret(tc.Key)
			now := time.UnixMilli(tc.NowMS)
			var ub []byte
			if tc.UserBuf != nil {
				if ub, err = base64.StdEncoding.DecodeString(*tc.UserBuf); err != nil {
					t.Fatal(err)
				}
			}
			want := &Ticket{
				Version: "2.0", Identifier: tc.User, SDKAppID: tc.SDKAppID,
				Time: tc.Time, Expire: tc.Expire, UserBuf: ub, Sig: tc.TLSSig,
			}
			got, err := Verify(tc.UserSig, tc.SDKAppID, key, tc.User, now)
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("ticket (-want +got):\n%s", diff)
			}
			expired := time.Unix(tc.Time+tc.Expire+1, 0)
			if _, err := Verify(tc.UserSig, tc.SDKAppID, key, tc.User, expired); CodeOf(err) != 70001 {
				t.Errorf("Verify one second after expiry: %v, want 70001", err)
			}
			ours := mustGenerate(t, tc.SDKAppID, key, tc.User, time.Duration(tc.Expire)*time.Second, ub, now)
			dec, err := Decode(ours)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(want, dec); diff != "" {
				t.Errorf("our Generate for the same inputs (-node +ours):\n%s", diff)
			}
		})
	}
}

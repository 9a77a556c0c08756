package mqtt

import (
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestTopics(t *testing.T) {
	tp, err := NewTopics("")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := tp.Up("dev-42", "inst"), "chat/v1/up/dev-42/inst"; got != want {
		t.Errorf("Up = %q, want %q", got, want)
	}
	if got, want := tp.Down("dev-42", "inst"), "chat/v1/down/dev-42/inst"; got != want {
		t.Errorf("Down = %q, want %q", got, want)
	}
	if got, want := tp.UpFilter(), "chat/v1/up/+/+"; got != want {
		t.Errorf("UpFilter = %q, want %q", got, want)
	}
	for _, tc := range []struct {
		topic      string
		user, inst string
		ok         bool
	}{
		{"chat/v1/up/dev-42/inst", "dev-42", "inst", true},
		{"chat/v1/down/dev-42/inst", "", "", false},
		{"chat/v2/up/dev-42/inst", "", "", false},
		{"chat/v1/up/dev-42", "", "", false},
		{"chat/v1/up//inst", "", "", false},
		{"chat/v1/up/dev-42/inst/extra", "", "", false},
		{"other/v1/up/dev-42/inst", "", "", false},
	} {
		t.Run(tc.topic, func(t *testing.T) {
			u, i, err := tp.ParseUp(tc.topic)
			if (err == nil) != tc.ok || u != tc.user || i != tc.inst {
				t.Errorf("ParseUp = %q, %q, %v", u, i, err)
			}
		})
	}
	for _, bad := range []string{"a/#", "+", "/a", "a/", "a//b", "$SYS"} {
		if _, err := NewTopics(bad); err == nil {
			t.Errorf("NewTopics(%q) accepted", bad)
		}
	}
	if tp, err := NewTopics("acme/chat"); err != nil || tp.Up("u", "i") != "acme/chat/v1/up/u/i" {
		t.Errorf("prefix with two levels: %v", err)
	}
}

func TestValidateUserID(t *testing.T) {
	for _, tc := range []struct {
		id string
		ok bool
	}{
		{"dev-42", true},
		{"a_b-C9", true},
		{"alice@example", true},
		{strings.Repeat("x", 32), true},
		{strings.Repeat("x", 33), false},
		{"", false},
		{"a b", false},
		{"a/b", false},
		{"a+b", false},
		{"a#b", false},
		{"é", false},
		{"a\x00", false},
	} {
		t.Run(fmt.Sprintf("%q", tc.id), func(t *testing.T) {
			if err := ValidateUserID(tc.id); (err == nil) != tc.ok {
				t.Errorf("ValidateUserID = %v, want ok=%v", err, tc.ok)
			}
		})
	}
}

func TestMessageNeverShowsUserSig(t *testing.T) {
	m := Message{Type: TypeLogin, ID: "1", UserID: "dev-42", UserSig: "eJwsecretsig"}
	var logged strings.Builder
	slog.New(slog.NewTextHandler(&logged, nil)).Info("got", "msg", m)
	for name, s := range map[string]string{
		"String": m.String(), "%v": fmt.Sprintf("%v", m), "%+v": fmt.Sprintf("%+v", m), "slog": logged.String(),
	} {
		if strings.Contains(s, "eJwsecretsig") {
			t.Errorf("%s shows the UserSig: %s", name, s)
		}
	}
	// The wire form does carry it.
	var back Message
	if err := json.Unmarshal(Encode(m), &back); err != nil || back.UserSig != m.UserSig {
		t.Errorf("Encode lost the UserSig: %v", err)
	}
}

func TestDecode(t *testing.T) {
	for _, tc := range []struct {
		name    string
		payload string
		want    Message
		wantErr string
	}{
		{"login", `{"type":"login","id":"1","user_id":"u","user_sig":"s","platform":"Linux"}`, Message{Type: "login", ID: "1", UserID: "u", UserSig: "s", Platform: "Linux"}, ""},
		{"unknown fields are ignored", `{"type":"kick","session":"s","future":true}`, Message{Type: "kick", Session: "s"}, ""},
		{"no type", `{"id":"1"}`, Message{}, "no \"type\""},
		{"not JSON", `{`, Message{}, "bad protocol message"},
		{"wrong field type", `{"type":"login","code":"x"}`, Message{}, "bad protocol message"},
		{"too large", `{"type":"x","desc":"` + strings.Repeat("a", MaxPayload) + `"}`, Message{}, "limit is"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Decode([]byte(tc.payload))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func FuzzDecode(f *testing.F) {
	f.Add([]byte(`{"type":"login","id":"1","user_id":"u","user_sig":"s"}`))
	f.Add([]byte(`{"type":"resume_result","code":6208,"server_time_ms":1}`))
	f.Add([]byte(`{"type":""}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Decode(b)
		if err != nil {
			return
		}
		if m.Type == "" {
			t.Fatal("decoded a message without a type")
		}
		again, err := Decode(Encode(m))
		if err != nil {
			t.Fatalf("re-decoding: %v", err)
		}
		if diff := cmp.Diff(m, again); diff != "" {
			t.Fatalf("round trip changed the message:\n%s", diff)
		}
	})
}

func TestAnswersCarryCode(t *testing.T) {
	for _, tc := range []struct {
		m        Message
		wantCode bool
	}{
		{Message{Type: TypeLoginResult, ID: "1", Session: "s"}, true},
		{Message{Type: TypeLogoutResult, ID: "1"}, true},
		{Message{Type: TypeResumeResult, Code: 6014, Desc: "x"}, true},
		{Message{Type: TypeKick, Code: 6208}, true},
		{Message{Type: TypeError, Code: 6017}, true},
		{Message{Type: TypeUserSigExpire, Code: 70001}, true},
		{Message{Type: TypeLogin, ID: "1"}, false},
		{Message{Type: TypeOffline}, false},
	} {
		t.Run(tc.m.Type, func(t *testing.T) {
			var fields map[string]any
			if err := json.Unmarshal(Encode(tc.m), &fields); err != nil {
				t.Fatal(err)
			}
			if _, ok := fields["code"]; ok != tc.wantCode {
				t.Errorf("%s: code present = %v, want %v", Encode(tc.m), ok, tc.wantCode)
			}
			back, err := Decode(Encode(tc.m))
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.m, back); diff != "" {
				t.Errorf("round trip (-want +got):\n%s", diff)
			}
		})
	}
}

func TestDecodeErrorsSpeakJSON(t *testing.T) {
	for _, tc := range []struct {
		payload string
		want    string
		id      string
	}{
		{`{"type":5,"id":"a1"}`, `field "type" must be a string, not a JSON number`, "a1"},
		{`{"type":"login","id":"a2","code":"x"}`, `field "code" must be a number, not a JSON string`, "a2"},
		{`{"type":"login","id":7}`, `field "id" must be a string`, ""},
		{`[1,2]`, "not a JSON object", ""},
		{`"login"`, "not a JSON object", ""},
		{`{{{`, "not valid JSON", ""},
		{`{"type":"login"`, "not valid JSON", ""},
		{`{"id":"a3"}`, `no "type" field`, "a3"},
	} {
		t.Run(tc.payload, func(t *testing.T) {
			_, err := Decode([]byte(tc.payload))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Decode error %v, want it to mention %q", err, tc.want)
			}
			for _, goWord := range []string{"Go ", "struct", "mqtt.", "int64", "unmarshal"} {
				if err != nil && strings.Contains(err.Error(), goWord) {
					t.Errorf("error %q shows Go internals (%q)", err, goWord)
				}
			}
			if got := PeekID([]byte(tc.payload)); got != tc.id {
				t.Errorf("PeekID = %q, want %q", got, tc.id)
			}
		})
	}
}

func TestSetConn(t *testing.T) {
	got := SetConn([]byte(`{"type":"offline","conn":"forged","x":1}`), "c-7")
	m, err := Decode(got)
	if err != nil || m.Conn != "c-7" || m.Type != TypeOffline {
		t.Errorf("SetConn = %s (%v)", got, err)
	}
	for _, p := range []string{"", "junk", "[1]"} {
		if got := SetConn([]byte(p), "c"); string(got) != p {
			t.Errorf("SetConn(%q) = %q, want it unchanged", p, got)
		}
	}
}

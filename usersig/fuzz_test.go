package usersig

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// FuzzDecode checks that Decode never panics, fails only with Decode's error
// codes and never echoes the input in its messages, and that a decoded
// Ticket survives re-encoding: encoding its fields again and decoding the
// result gives the same Ticket.
//
// The input is also parsed as the JSON document inside a UserSig, so that
// the fuzzer reaches the field checks without having to produce valid zlib
// data.
//
// Seeds live in testdata/fuzz/FuzzDecode.
func FuzzDecode(f *testing.F) {
	f.Fuzz(func(t *testing.T, userSig string) {
		if ticket, err := parseJSON([]byte(userSig)); err == nil {
			checkReencode(t, ticket)
		} else if code := CodeOf(err); code != CodeMalformed {
			t.Fatalf("parseJSON error code %d (%v)", code, err)
		}

		ticket, err := Decode(userSig)
		if err != nil {
			if ticket != nil {
				t.Errorf("Decode returned a ticket together with %v", err)
			}
			switch code := CodeOf(err); code {
			case CodeEmpty, CodeMalformed, CodeTruncated:
			default:
				t.Fatalf("Decode error code %d (%v)", code, err)
			}
			if len(userSig) >= 24 && strings.Contains(err.Error(), userSig) {
				t.Errorf("error message contains the UserSig: %q", err)
			}
			return
		}
		checkReencode(t, ticket)
	})
}

// checkReencode encodes ticket again and checks that decoding the result
// gives the same ticket and signed content.
func checkReencode(t *testing.T, ticket *Ticket) {
	t.Helper()
	js, err := encodeJSON(ticket)
	if err != nil {
		t.Fatalf("re-encode %+v: %v", ticket, err)
	}
	if len(js) > MaxJSONLen {
		// JSON escaping can make the document grow (for example invalid
		// UTF-8 becomes U+FFFD); such a ticket cannot be re-encoded
		// within the limits, which is not a Decode bug.
		return
	}
	again, err := encode(ticket)
	if err != nil {
		t.Fatalf("re-encode %+v: %v", ticket, err)
	}
	if len(again) > MaxUserSigLen {
		return // see above
	}
	ticket2, err := Decode(again)
	if err != nil {
		t.Fatalf("decode re-encoded %+v: %v", ticket, err)
	}
	if diff := cmp.Diff(ticket, ticket2); diff != "" {
		t.Errorf("round trip changed the ticket (-first +second):\n%s", diff)
	}
	if content(ticket) != content(ticket2) {
		t.Errorf("round trip changed the signed content")
	}
}

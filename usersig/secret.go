package usersig

import (
	"crypto/subtle"
	"encoding/json"
	"log/slog"
)

// Secret holds a secret string (a UserSig or a signing key) so that it cannot
// leak by accident: it prints, logs and marshals as "[redacted]". Reveal
// returns the value for the few places that must send or sign with it.
//
// The value sits behind a pointer: fmt cannot call String on a Secret held
// in an unexported struct field and prints the fields instead, which then
// shows an address, not the secret.
type Secret struct {
	p *string
}

// NewSecret wraps s.
func NewSecret(s string) Secret {
	if s == "" {
		return Secret{}
	}
	return Secret{p: &s}
}

// Reveal returns the secret value. Call it only where the value leaves the
// process on purpose (the login request, the HMAC key, the 0600 state file).
func (s Secret) Reveal() string {
	if s.p == nil {
		return ""
	}
	return *s.p
}

// IsZero reports whether the secret is empty.
func (s Secret) IsZero() bool { return s.p == nil || *s.p == "" }

// Equal compares two secrets in constant time.
func (s Secret) Equal(o Secret) bool {
	return subtle.ConstantTimeCompare([]byte(s.Reveal()), []byte(o.Reveal())) == 1
}

const redacted = "[redacted]"

// String implements fmt.Stringer without revealing the value.
func (s Secret) String() string {
	if s.IsZero() {
		return ""
	}
	return redacted
}

// GoString implements fmt.GoStringer without revealing the value.
func (s Secret) GoString() string { return "usersig.Secret(" + redacted + ")" }

// LogValue implements slog.LogValuer without revealing the value.
func (s Secret) LogValue() slog.Value { return slog.StringValue(s.String()) }

// MarshalJSON never reveals the value; JSON is for APIs and events.
func (s Secret) MarshalJSON() ([]byte, error) { return json.Marshal(s.String()) }

// MarshalText never reveals the value.
func (s Secret) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

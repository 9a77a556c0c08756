package usersig

import (
	"crypto/subtle"
	"encoding/json"
	"log/slog"
)

// Secret holds a secret string (a UserSig or a signing key) so that it cannot
// leak by accident: it prints, logs and marshals as "[redacted]". Reveal
// returns the value for the few places that must send or sign with it.
type Secret struct {
	s string
}

// NewSecret wraps s.
func NewSecret(s string) Secret { return Secret{s: s} }

// Reveal returns the secret value. Call it only where the value leaves the
// process on purpose (the login request, the HMAC key, the 0600 state file).
func (s Secret) Reveal() string { return s.s }

// IsZero reports whether the secret is empty.
func (s Secret) IsZero() bool { return s.s == "" }

// Equal compares two secrets in constant time.
func (s Secret) Equal(o Secret) bool {
	return subtle.ConstantTimeCompare([]byte(s.s), []byte(o.s)) == 1
}

const redacted = "[redacted]"

// String implements fmt.Stringer without revealing the value.
func (s Secret) String() string {
	if s.s == "" {
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

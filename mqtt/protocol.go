// Package mqtt is the wire protocol between the device daemon (chatd) and the
// login gateway (chatgw): topic names, message types and their JSON form, and
// a device-side connection that speaks it over paho. docs/protocol.md is the
// specification; this package is its only implementation.
package mqtt

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"reflect"
	"strings"
)

// Version is the protocol version; it is a level of every topic, so two
// versions can run side by side on one broker.
const Version = "v1"

// DefaultPrefix is the topic prefix used when none is configured.
const DefaultPrefix = "chat"

// MaxPayload is the largest message either side accepts. Larger ones are
// dropped and counted; a UserSig is a few hundred bytes.
const MaxPayload = 16 << 10

// QoS levels, per message; docs/protocol.md says why each is what it is.
const (
	// QoSRequest is for device requests (login, resume, logout, offline):
	// at least once, because every request is idempotent by its id or effect.
	QoSRequest = 1
	// QoSReply is for replies and pushes (results, kick, usersig_expired):
	// at least once; a duplicate reply is matched by id once, a duplicate
	// kick names the same session and is harmless.
	QoSReply = 1
	// QoSWill is the presence Will's QoS.
	QoSWill = 1
)

// Message types. Up: device to gateway. Down: gateway to device.
const (
	TypeLogin   = "login"   // up: log in with user_id, user_sig, platform
	TypeResume  = "resume"  // up: resume session after a reconnect
	TypeLogout  = "logout"  // up: end the session
	TypeOffline = "offline" // up: presence (the Will, or a clean goodbye)

	TypeLoginResult   = "login_result"    // down: answer to login
	TypeResumeResult  = "resume_result"   // down: answer to resume
	TypeLogoutResult  = "logout_result"   // down: answer to logout
	TypeKick          = "kick"            // down: this session was kicked
	TypeUserSigExpire = "usersig_expired" // down: the session's UserSig ran out
	TypeError         = "error"           // down: the request could not be understood
)

// Kick reasons.
const (
	KickOtherInstance = "other_instance" // a newer login went over the policy's limit
	KickAdmin         = "admin"          // an operator kicked the user
)

// Message is every message of the protocol; which fields are set depends on
// Type. Unknown fields are ignored so that minor additions stay compatible.
type Message struct {
	Type string `json:"type"`
	// ID correlates a request with its result; the device chooses it.
	ID string `json:"id,omitempty"`

	// Request fields.
	UserID   string `json:"user_id,omitempty"`
	UserSig  string `json:"user_sig,omitempty"` // login only; never logged
	Platform string `json:"platform,omitempty"`
	Session  string `json:"session,omitempty"`
	// Conn names the device's current MQTT connection (a random id the
	// device makes per connection, 1 to 64 letters, digits, '_' or '-'). A
	// device that sets it in its Will, its goodbye and its login and resume
	// requests gets per-connection presence: an offline message naming an
	// older connection never marks the session of a newer one offline.
	// The embedded broker sets it itself on everything a device publishes.
	Conn string `json:"conn,omitempty"`

	// Result and push fields.
	Code int    `json:"code,omitempty"`
	Desc string `json:"desc,omitempty"`
	// ServerTimeMs is the gateway's clock (Unix milliseconds) when it
	// answered a login or resume; the device learns its clock offset from it.
	ServerTimeMs int64 `json:"server_time_ms,omitempty"`
	// UserSigExpiresAt is when the session's UserSig expires (Unix seconds).
	UserSigExpiresAt int64 `json:"usersig_expires_at,omitempty"`
	// Reason says why a kick happened (KickOtherInstance, KickAdmin).
	Reason string `json:"reason,omitempty"`
	// ByPlatform is the platform of the login that caused a kick.
	ByPlatform string `json:"by_platform,omitempty"`
	// RetryAfterMs, on a retryable answer, is how long (milliseconds) the
	// gateway asks the device to wait before it sends the request again:
	// a saturated gateway spreads the retries it asks for over its
	// measured capacity.
	RetryAfterMs int64 `json:"retry_after_ms,omitempty"`
}

// String describes m without its UserSig.
func (m Message) String() string {
	c := m
	if c.UserSig != "" {
		c.UserSig = "[redacted]"
	}
	b, _ := json.Marshal(c)
	return string(b)
}

// LogValue implements slog.LogValuer without the UserSig.
func (m Message) LogValue() slog.Value {
	attrs := []slog.Attr{slog.String("type", m.Type)}
	if m.ID != "" {
		attrs = append(attrs, slog.String("id", m.ID))
	}
	if m.UserID != "" {
		attrs = append(attrs, slog.String("user", m.UserID))
	}
	if m.Session != "" {
		attrs = append(attrs, slog.String("session", m.Session))
	}
	if m.Code != 0 {
		attrs = append(attrs, slog.Int("code", m.Code))
	}
	return slog.GroupValue(attrs...)
}

// ErrPayload is wrapped by every Decode error.
var ErrPayload = errors.New("bad protocol message")

// Decode parses a payload, bounding its size and requiring a type.
func Decode(payload []byte) (Message, error) {
	var m Message
	if len(payload) > MaxPayload {
		return m, fmt.Errorf("%w: %d bytes, the limit is %d", ErrPayload, len(payload), MaxPayload)
	}
	if err := json.Unmarshal(payload, &m); err != nil {
		return Message{}, fmt.Errorf("%w: %s", ErrPayload, jsonProblem(err))
	}
	if m.Type == "" {
		return Message{}, fmt.Errorf("%w: no \"type\" field", ErrPayload)
	}
	return m, nil
}

// jsonProblem says what is wrong with a payload in the protocol's words,
// never in Go's (no type or struct names).
func jsonProblem(err error) string {
	var typeErr *json.UnmarshalTypeError
	var syntaxErr *json.SyntaxError
	switch {
	case errors.As(err, &typeErr):
		if typeErr.Field == "" {
			return "not a JSON object"
		}
		want := "a string"
		if k := typeErr.Type.Kind(); k >= reflect.Int && k <= reflect.Int64 {
			want = "a number"
		}
		return fmt.Sprintf("field %q must be %s, not a JSON %s", typeErr.Field, want, typeErr.Value)
	case errors.As(err, &syntaxErr):
		return fmt.Sprintf("not valid JSON (at byte %d)", syntaxErr.Offset)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "not valid JSON (it ends too early)"
	}
	return "not valid JSON"
}

// Answer reports whether t is a message type the gateway sends (down).
func Answer(t string) bool {
	switch t {
	case TypeLoginResult, TypeResumeResult, TypeLogoutResult, TypeKick, TypeUserSigExpire, TypeError:
		return true
	}
	return false
}

// MarshalJSON writes "code" on every answer, also when it is 0 (success),
// and leaves it out of requests.
func (m Message) MarshalJSON() ([]byte, error) {
	type plain Message // without this method
	if !Answer(m.Type) {
		return json.Marshal(plain(m))
	}
	return json.Marshal(struct {
		plain
		Code int `json:"code"`
	}{plain(m), m.Code})
}

// Encode returns the JSON form of m.
func Encode(m Message) []byte {
	b, err := json.Marshal(m)
	if err != nil {
		// Message has only strings and integers: this cannot happen.
		panic(err)
	}
	return b
}

// PeekID returns the "id" of a payload that Decode refused, when the
// payload is a JSON object whose "id" is a string, so that the error
// answer can still name the request.
func PeekID(payload []byte) string {
	if len(payload) > MaxPayload {
		return ""
	}
	var v struct {
		ID json.RawMessage `json:"id"`
	}
	if json.Unmarshal(payload, &v) != nil {
		return ""
	}
	var id string
	if json.Unmarshal(v.ID, &id) != nil {
		return ""
	}
	return id
}

// SetConn returns payload with its "conn" field set to conn (replacing the
// device's own, if any). A payload that is not a JSON object is returned
// unchanged: the gateway refuses it anyway.
func SetConn(payload []byte, conn string) []byte {
	if len(payload) == 0 || len(payload) > MaxPayload || payload[0] != '{' {
		return payload
	}
	var fields map[string]json.RawMessage
	if json.Unmarshal(payload, &fields) != nil {
		return payload
	}
	c, _ := json.Marshal(conn)
	fields["conn"] = c
	out, err := json.Marshal(fields)
	if err != nil {
		return payload
	}
	return out
}

// Topics names the topics under one prefix:
//
//	<prefix>/v1/up/<user id>/<instance id>    device -> gateway
//	<prefix>/v1/down/<user id>/<instance id>  gateway -> device
//
// The instance id is also the device's MQTT client id, so a broker ACL can
// confine each device to its own two topics (%u/%c in Mosquitto patterns).
type Topics struct {
	Prefix string
}

// NewTopics validates prefix (empty means DefaultPrefix).
func NewTopics(prefix string) (Topics, error) {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if strings.ContainsAny(prefix, "+#\x00") || strings.HasPrefix(prefix, "/") ||
		strings.HasSuffix(prefix, "/") || strings.Contains(prefix, "//") || strings.HasPrefix(prefix, "$") {
		return Topics{}, fmt.Errorf("topic prefix %q: use one or more non-empty levels separated by '/', without '+', '#', a leading '$' or '/'", prefix)
	}
	return Topics{Prefix: prefix}, nil
}

func (t Topics) base() string {
	if t.Prefix == "" {
		return DefaultPrefix + "/" + Version
	}
	return t.Prefix + "/" + Version
}

// Up is the topic a device publishes its requests and presence to.
func (t Topics) Up(user, instance string) string {
	return t.base() + "/up/" + user + "/" + instance
}

// Down is the topic a device subscribes to.
func (t Topics) Down(user, instance string) string {
	return t.base() + "/down/" + user + "/" + instance
}

// UpFilter is the subscription that receives every device's requests.
func (t Topics) UpFilter() string { return t.base() + "/up/+/+" }

// ParseUp returns the user and instance of an up topic.
func (t Topics) ParseUp(topic string) (user, instance string, err error) {
	rest, ok := strings.CutPrefix(topic, t.base()+"/up/")
	if !ok {
		return "", "", fmt.Errorf("%w: topic %q is not under %s/up/", ErrPayload, topic, t.base())
	}
	user, instance, ok = strings.Cut(rest, "/")
	if !ok || user == "" || instance == "" || strings.Contains(instance, "/") {
		return "", "", fmt.Errorf("%w: topic %q is not %s/up/<user>/<instance>", ErrPayload, topic, t.base())
	}
	return user, instance, nil
}

// MaxUserIDLen is the longest UserID, in bytes.
const MaxUserIDLen = 32

// ValidateUserID checks a UserID the way the gateway does (error 7003):
// 1 to 32 bytes of printable ASCII, without space and without the MQTT
// topic characters '/', '+' and '#'. Letters, digits, '_' and '-' are the
// documented safe set; the rest is tolerated like the SDK tolerates it.
func ValidateUserID(id string) error {
	switch {
	case id == "":
		return errors.New("UserID is empty")
	case len(id) > MaxUserIDLen:
		return fmt.Errorf("UserID is %d bytes long; at most %d are allowed", len(id), MaxUserIDLen)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if c <= ' ' || c > '~' || c == '/' || c == '+' || c == '#' {
			return fmt.Errorf("UserID %q has the character %q at byte %d; use letters, digits, '_' and '-'", id, c, i)
		}
	}
	return nil
}

// ValidateInstanceID checks an instance id (the MQTT client id): 1 to 64
// bytes of letters, digits, '_' and '-'.
func ValidateInstanceID(id string) error {
	if id == "" || len(id) > 64 {
		return fmt.Errorf("instance id must be 1 to 64 bytes long, got %d", len(id))
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return fmt.Errorf("instance id %q has the character %q; use letters, digits, '_' and '-'", id, c)
		}
	}
	return nil
}

// Platforms the gateway knows, as the SDK names them.
var Platforms = []string{"Android", "iPhone", "iPad", "Windows", "Mac", "Linux", "Web"}

// ValidPlatform reports whether p is one of Platforms.
func ValidPlatform(p string) bool {
	for _, q := range Platforms {
		if p == q {
			return true
		}
	}
	return false
}

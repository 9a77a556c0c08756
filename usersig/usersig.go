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
	"io"
	"math"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Version is the only TLS.ver value this package produces and accepts.
const Version = "2.0"

// Size limits applied by Decode, so that a hostile UserSig cannot make it use
// much memory (a "zip bomb").
const (
	// MaxUserSigLen is the longest UserSig accepted, in bytes.
	MaxUserSigLen = 8 << 10
	// MaxJSONLen is the largest decompressed JSON document accepted, in bytes.
	MaxJSONLen = 16 << 10
)

// JSON field names inside a UserSig.
const (
	fieldVer        = "TLS.ver"
	fieldIdentifier = "TLS.identifier"
	fieldSDKAppID   = "TLS.sdkappid"
	fieldTime       = "TLS.time"
	fieldExpire     = "TLS.expire"
	fieldUserBuf    = "TLS.userbuf"
	fieldSig        = "TLS.sig"
)

// Ticket holds the fields decoded from a UserSig. Decoding needs no key, so
// a Ticket returned by Decode is not authenticated; one returned by Verify
// without error (or with a 70001 error) is.
type Ticket struct {
	// Version is TLS.ver, always "2.0".
	Version string `json:"version"`
	// Identifier is TLS.identifier, the UserID the UserSig was issued for.
	Identifier string `json:"identifier"`
	// SDKAppID is TLS.sdkappid, the application the UserSig was issued for.
	SDKAppID uint64 `json:"sdkappid"`
	// Time is TLS.time, when the UserSig was issued, in unix seconds.
	Time int64 `json:"time"`
	// Expire is TLS.expire, the lifetime of the UserSig in seconds.
	Expire int64 `json:"expire"`
	// UserBuf is the decoded TLS.userbuf. It is nil when the UserSig has no
	// TLS.userbuf and non-nil (possibly empty) when it has one: an empty
	// userbuf is still part of the signed content.
	UserBuf []byte `json:"userbuf,omitempty"`
	// Sig is TLS.sig, the base64 HMAC-SHA256 exactly as found in the UserSig.
	Sig string `json:"sig"`
}

// ExpiresAt returns the moment the UserSig expires (Time + Expire), in UTC.
// The UserSig is still valid at that very second and expired after it.
func (t *Ticket) ExpiresAt() time.Time {
	end, ok := addNoOverflow(t.Time, t.Expire)
	if !ok {
		end = math.MaxInt64
		if t.Expire < 0 {
			end = math.MinInt64
		}
	}
	return time.Unix(end, 0).UTC()
}

// Generate returns a UserSig for userID in the application sdkappid, signed
// with key, issued at now and valid for expire (whole seconds; a fraction of
// a second is dropped). Tencent recommends lifetimes of at least 24 hours.
//
// It fails when sdkappid is 0, key is empty, userID is empty or contains
// control characters, expire is shorter than one second, or now is before
// 1970.
func Generate(sdkappid uint64, key Secret, userID string, expire time.Duration, now time.Time) (string, error) {
	return generate(sdkappid, key, userID, expire, nil, now)
}

// GenerateWithUserBuf is Generate with a userbuf, as used for TRTC
// PrivateMapKeys. A nil userBuf gives the same result as Generate; a non-nil
// empty userBuf adds an empty TLS.userbuf (like the official libraries when
// given an empty buffer).
func GenerateWithUserBuf(sdkappid uint64, key Secret, userID string, expire time.Duration, userBuf []byte, now time.Time) (string, error) {
	return generate(sdkappid, key, userID, expire, userBuf, now)
}

func generate(sdkappid uint64, key Secret, userID string, expire time.Duration, userBuf []byte, now time.Time) (string, error) {
	if sdkappid == 0 {
		return "", errors.New("usersig: generate: sdkappid must not be 0")
	}
	if key.IsZero() {
		return "", errors.New("usersig: generate: the secret key is empty")
	}
	if userID == "" {
		return "", errors.New("usersig: generate: userID is empty")
	}
	if i := strings.IndexFunc(userID, isControl); i >= 0 {
		return "", fmt.Errorf("usersig: generate: userID %q contains a control character at byte %d", userID, i)
	}
	secs := int64(expire / time.Second)
	if secs <= 0 {
		return "", fmt.Errorf("usersig: generate: expire must be at least 1s, got %v", expire)
	}
	issued := now.Unix()
	if issued < 0 {
		return "", fmt.Errorf("usersig: generate: now (%v) is before 1970; is the clock set?", now)
	}
	if _, ok := addNoOverflow(issued, secs); !ok {
		return "", fmt.Errorf("usersig: generate: expire %v is too long", expire)
	}
	t := &Ticket{
		Version:    Version,
		Identifier: userID,
		SDKAppID:   sdkappid,
		Time:       issued,
		Expire:     secs,
		UserBuf:    userBuf,
	}
	t.Sig = base64.StdEncoding.EncodeToString(computeHMAC(key, t))
	js, err := encodeJSON(t)
	if err != nil {
		return "", err
	}
	if len(js) > MaxJSONLen {
		return "", fmt.Errorf("usersig: generate: the UserSig would hold %d bytes of JSON, more than the %d Decode accepts; use a shorter userID or userBuf", len(js), MaxJSONLen)
	}
	us, err := compress(js)
	if err != nil {
		return "", err
	}
	if len(us) > MaxUserSigLen {
		return "", fmt.Errorf("usersig: generate: the UserSig would be %d bytes long, more than the %d Decode accepts; use a shorter userID or userBuf", len(us), MaxUserSigLen)
	}
	return us, nil
}

func isControl(r rune) bool { return r < 0x20 || r == 0x7f }

// content returns the string the HMAC is computed over.
func content(t *Ticket) string {
	var b strings.Builder
	b.WriteString("TLS.identifier:")
	b.WriteString(t.Identifier)
	b.WriteString("\nTLS.sdkappid:")
	b.WriteString(strconv.FormatUint(t.SDKAppID, 10))
	b.WriteString("\nTLS.time:")
	b.WriteString(strconv.FormatInt(t.Time, 10))
	b.WriteString("\nTLS.expire:")
	b.WriteString(strconv.FormatInt(t.Expire, 10))
	b.WriteString("\n")
	if t.UserBuf != nil {
		b.WriteString("TLS.userbuf:")
		b.WriteString(base64.StdEncoding.EncodeToString(t.UserBuf))
		b.WriteString("\n")
	}
	return b.String()
}

func computeHMAC(key Secret, t *Ticket) []byte {
	m := hmac.New(sha256.New, []byte(key.Reveal()))
	m.Write([]byte(content(t)))
	return m.Sum(nil)
}

// sigDoc is the JSON document inside a UserSig, with the fields in the order
// the official libraries write them.
type sigDoc struct {
	Ver        string  `json:"TLS.ver"`
	Identifier string  `json:"TLS.identifier"`
	SDKAppID   uint64  `json:"TLS.sdkappid"`
	Time       int64   `json:"TLS.time"`
	Expire     int64   `json:"TLS.expire"`
	UserBuf    *string `json:"TLS.userbuf,omitempty"`
	Sig        string  `json:"TLS.sig"`
}

// encode builds the UserSig string for t as it is, without checks.
func encode(t *Ticket) (string, error) {
	js, err := encodeJSON(t)
	if err != nil {
		return "", err
	}
	return compress(js)
}

// compress zlib-compresses and encodes a JSON document as a UserSig.
func compress(js []byte) (string, error) {
	var z bytes.Buffer
	zw := zlib.NewWriter(&z)
	if _, err := zw.Write(js); err != nil {
		return "", fmt.Errorf("usersig: compress: %w", err)
	}
	if err := zw.Close(); err != nil {
		return "", fmt.Errorf("usersig: compress: %w", err)
	}
	return escaper.Replace(base64.StdEncoding.EncodeToString(z.Bytes())), nil
}

// encodeJSON returns the JSON document of a UserSig holding t's fields.
func encodeJSON(t *Ticket) ([]byte, error) {
	doc := sigDoc{
		Ver:        t.Version,
		Identifier: t.Identifier,
		SDKAppID:   t.SDKAppID,
		Time:       t.Time,
		Expire:     t.Expire,
		Sig:        t.Sig,
	}
	if t.UserBuf != nil {
		ub := base64.StdEncoding.EncodeToString(t.UserBuf)
		doc.UserBuf = &ub
	}
	var js bytes.Buffer
	enc := json.NewEncoder(&js)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(doc); err != nil {
		return nil, fmt.Errorf("usersig: encode JSON: %w", err)
	}
	return bytes.TrimSuffix(js.Bytes(), []byte("\n")), nil
}

var (
	escaper   = strings.NewReplacer("+", "*", "/", "-", "=", "_")
	unescaper = strings.NewReplacer("*", "+", "-", "/", "_", "=")
)

// Decode decodes a UserSig without checking its signature (no key needed).
// Errors are *Error values: 70002 when userSig is empty, 70005 when it has
// been cut off, 70003 for anything else that is wrong with it (bad base64,
// zlib or JSON, TLS.ver other than "2.0", missing, negative or non-integer
// numeric fields, longer than MaxUserSigLen or decompressing to more than
// MaxJSONLen).
//
// Decoding is lenient where implementations differ: the JSON fields may come
// in any order, unknown fields are ignored, and TLS.sdkappid, TLS.time and
// TLS.expire may be JSON numbers or strings holding a decimal integer. The
// numbers must be written canonically (no sign, exponent, fraction or
// leading zero) because the HMAC covers their decimal text.
func Decode(userSig string) (*Ticket, error) {
	if userSig == "" {
		return nil, newError(CodeEmpty, "UserSig is empty: pass the UserSig generated for this UserID")
	}
	if len(userSig) > MaxUserSigLen {
		return nil, newError(CodeMalformed, "UserSig is %d bytes long, more than the %d allowed: it is not a UserSig", len(userSig), MaxUserSigLen)
	}
	if i := strings.IndexAny(userSig, " \t\r\n"); i >= 0 {
		return nil, newError(CodeMalformed, "UserSig contains whitespace at byte %d: strip newlines and spaces (a trailing newline from a file?)", i)
	}
	raw, err := decodeBase64(userSig)
	if err != nil {
		return nil, newError(CodeMalformed, "UserSig is not valid base64 (%v): copy the whole UserSig, unchanged", err)
	}
	js, err := inflate(raw)
	if err != nil {
		return nil, err
	}
	return parseJSON(js)
}

// decodeBase64 undoes the character substitution and decodes standard
// base64, with or without padding. A last group of a single character (which
// cannot carry a whole byte) is dropped, so that a UserSig cut off anywhere
// is reported as truncated by the zlib stage rather than as bad base64.
func decodeBase64(s string) ([]byte, error) {
	s = strings.TrimRight(unescaper.Replace(s), "=")
	if len(s)%4 == 1 {
		s = s[:len(s)-1]
	}
	return base64.RawStdEncoding.DecodeString(s)
}

// inflate decompresses a zlib stream, refusing more than MaxJSONLen bytes.
func inflate(raw []byte) ([]byte, error) {
	if len(raw) == 0 {
		return nil, newError(CodeMalformed, "UserSig decodes to nothing: copy the whole UserSig, unchanged")
	}
	zr, err := getInflater(raw)
	if err != nil {
		return nil, zlibError(err)
	}
	defer inflaters.Put(zr)
	js, err := io.ReadAll(io.LimitReader(zr, MaxJSONLen+1))
	if err != nil {
		return nil, zlibError(err)
	}
	if len(js) > MaxJSONLen {
		return nil, newError(CodeMalformed, "UserSig decompresses to more than %d bytes: it is not a UserSig", MaxJSONLen)
	}
	return js, nil
}

// inflaters keeps zlib readers for reuse: a new one allocates its 32 KiB
// window and tables, most of what a login's Verify would otherwise cost.
var inflaters sync.Pool

// getInflater returns a zlib reader of raw, reused from inflaters when one
// is there. Reset starts every reader afresh, whatever its last stream did.
func getInflater(raw []byte) (io.ReadCloser, error) {
	if zr, ok := inflaters.Get().(io.ReadCloser); ok {
		if err := zr.(zlib.Resetter).Reset(bytes.NewReader(raw), nil); err != nil {
			inflaters.Put(zr)
			return nil, err
		}
		return zr, nil
	}
	return zlib.NewReader(bytes.NewReader(raw))
}

func zlibError(err error) *Error {
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return newError(CodeTruncated, "UserSig is truncated (the compressed data ends early): copy the whole UserSig")
	}
	return newError(CodeMalformed, "UserSig is not valid zlib data (%v): copy the whole UserSig, unchanged", err)
}

// parseJSON reads the JSON document of a UserSig.
func parseJSON(js []byte) (*Ticket, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(js, &m); err != nil {
		return nil, newError(CodeMalformed, "UserSig does not hold a valid JSON object: %v", jsonErrorText(err))
	}
	t := &Ticket{}
	var err error
	if t.Version, err = stringField(m, fieldVer); err != nil {
		return nil, err
	}
	if t.Version != Version {
		return nil, newError(CodeMalformed, "UserSig has %s %s, want %q: generate it with a TLS sig API v2 library", fieldVer, shortID(t.Version), Version)
	}
	if t.Identifier, err = stringField(m, fieldIdentifier); err != nil {
		return nil, err
	}
	if t.Identifier == "" {
		return nil, newError(CodeMalformed, "UserSig has an empty %s: generate it for a UserID", fieldIdentifier)
	}
	if t.SDKAppID, err = uintField(m, fieldSDKAppID); err != nil {
		return nil, err
	}
	var u uint64
	if u, err = uintField(m, fieldTime); err != nil {
		return nil, err
	}
	if u > math.MaxInt64 {
		return nil, newError(CodeMalformed, "UserSig has %s out of range", fieldTime)
	}
	t.Time = int64(u)
	if u, err = uintField(m, fieldExpire); err != nil {
		return nil, err
	}
	if u > math.MaxInt64 {
		return nil, newError(CodeMalformed, "UserSig has %s out of range", fieldExpire)
	}
	t.Expire = int64(u)
	if _, ok := addNoOverflow(t.Time, t.Expire); !ok {
		return nil, newError(CodeMalformed, "UserSig has %s + %s out of range", fieldTime, fieldExpire)
	}
	if raw, ok := m[fieldUserBuf]; ok && !isNull(raw) {
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, newError(CodeMalformed, "UserSig has a %s that is not a string", fieldUserBuf)
		}
		b, err := base64.StdEncoding.DecodeString(s)
		if err != nil || base64.StdEncoding.EncodeToString(b) != s {
			return nil, newError(CodeMalformed, "UserSig has a %s that is not canonical standard base64", fieldUserBuf)
		}
		if b == nil {
			b = []byte{}
		}
		t.UserBuf = b
	}
	if t.Sig, err = stringField(m, fieldSig); err != nil {
		return nil, err
	}
	if t.Sig == "" {
		return nil, newError(CodeMalformed, "UserSig has an empty %s", fieldSig)
	}
	b, err := base64.StdEncoding.DecodeString(t.Sig)
	if err != nil || base64.StdEncoding.EncodeToString(b) != t.Sig {
		return nil, newError(CodeMalformed, "UserSig has a %s that is not canonical standard base64", fieldSig)
	}
	return t, nil
}

// jsonErrorText describes a JSON error without quoting the input.
func jsonErrorText(err error) string {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Sprintf("syntax error at offset %d", se.Offset)
	}
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return "not a JSON object"
	}
	return "cannot parse"
}

func isNull(raw json.RawMessage) bool { return string(raw) == "null" }

func stringField(m map[string]json.RawMessage, name string) (string, error) {
	raw, ok := m[name]
	if !ok || isNull(raw) {
		return "", newError(CodeMalformed, "UserSig has no %s", name)
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", newError(CodeMalformed, "UserSig has a %s that is not a string", name)
	}
	return s, nil
}

// uintField reads a non-negative integer given as a JSON number or as a JSON
// string holding the number, written canonically.
func uintField(m map[string]json.RawMessage, name string) (uint64, error) {
	raw, ok := m[name]
	if !ok || isNull(raw) {
		return 0, newError(CodeMalformed, "UserSig has no %s", name)
	}
	text := string(raw)
	if strings.HasPrefix(text, `"`) {
		if err := json.Unmarshal(raw, &text); err != nil {
			return 0, newError(CodeMalformed, "UserSig has a %s that is not a number", name)
		}
	}
	if strings.HasPrefix(text, "-") {
		return 0, newError(CodeMalformed, "UserSig has a negative %s", name)
	}
	if !isCanonicalUint(text) {
		return 0, newError(CodeMalformed, "UserSig has a %s that is not a plain non-negative integer", name)
	}
	v, err := strconv.ParseUint(text, 10, 64)
	if err != nil {
		return 0, newError(CodeMalformed, "UserSig has %s out of range", name)
	}
	return v, nil
}

// isCanonicalUint reports whether s is a decimal integer as strconv would
// format it: digits only, no leading zero unless s is "0".
func isCanonicalUint(s string) bool {
	if s == "" || (len(s) > 1 && s[0] == '0') {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

func addNoOverflow(a, b int64) (int64, bool) {
	c := a + b
	if (b > 0 && c < a) || (b < 0 && c > a) {
		return 0, false
	}
	return c, true
}

// Verify checks userSig for a login by userID to the application sdkappid,
// whose secret key is key, at the moment now. It returns the decoded Ticket
// when the UserSig is good.
//
// Failures are *Error values, checked in this order: 70002 empty, 70003
// malformed, 70005 truncated (see Decode), 70014 SDKAppID mismatch, 70013
// UserID mismatch, 70009 HMAC mismatch (the UserSig was signed with another
// key), 70001 expired (only when now is after Time + Expire, in whole
// seconds). With a 70001 error Verify still returns the Ticket, whose
// signature is good; with any other error the Ticket is nil.
//
// Invalid arguments (sdkappid 0, empty key, empty userID) are programming
// errors and are reported as plain errors (CodeOf gives -1).
func Verify(userSig string, sdkappid uint64, key Secret, userID string, now time.Time) (*Ticket, error) {
	if sdkappid == 0 {
		return nil, errors.New("usersig: verify: sdkappid must not be 0")
	}
	if key.IsZero() {
		return nil, errors.New("usersig: verify: the secret key is empty")
	}
	if userID == "" {
		return nil, errors.New("usersig: verify: userID is empty")
	}
	t, err := Decode(userSig)
	if err != nil {
		return nil, err
	}
	if t.SDKAppID != sdkappid {
		return nil, newError(CodeSDKAppIDMismatch,
			"SDKAppID in the UserSig does not match (UserSig is for %d, login is for %d): generate the UserSig for SDKAppID %d",
			t.SDKAppID, sdkappid, sdkappid)
	}
	if t.Identifier != userID {
		return nil, newError(CodeIdentifierMismatch,
			"identifier in the UserSig does not match (UserSig is for %s, login is for %s): generate the UserSig for %s",
			shortID(t.Identifier), shortID(userID), shortID(userID))
	}
	got, _ := base64.StdEncoding.DecodeString(t.Sig) // checked by Decode
	if !hmac.Equal(got, computeHMAC(key, t)) {
		return nil, newError(CodeBadSignature,
			"signature in the UserSig does not match: it was signed with a different secret key than the one configured for SDKAppID %d; check the key, or generate the UserSig with it",
			sdkappid)
	}
	if now.Unix() > t.Time+t.Expire {
		return t, newError(CodeExpired,
			"UserSig expired at %s (issued %s, lifetime %s, now %s): generate a new UserSig",
			t.ExpiresAt().Format(time.RFC3339), time.Unix(t.Time, 0).UTC().Format(time.RFC3339),
			lifetime(t.Expire), now.UTC().Format(time.RFC3339))
	}
	return t, nil
}

// lifetime formats a lifetime in seconds for messages.
func lifetime(secs int64) string {
	if secs > int64(math.MaxInt64/time.Second) {
		return strconv.FormatInt(secs, 10) + "s"
	}
	return (time.Duration(secs) * time.Second).String()
}

// shortID quotes a UserID (or another string field) for an error message,
// cutting very long ones.
func shortID(id string) string {
	const max = 64
	if len(id) > max {
		return strconv.Quote(id[:max]) + "..."
	}
	return strconv.Quote(id)
}

package usersig

import (
	"errors"
	"fmt"
)

// Error codes reported by Decode and Verify. They are the codes the Tencent
// Cloud Chat server returns for the same failures.
const (
	// CodeExpired means the UserSig has expired (now > time + expire).
	CodeExpired = 70001
	// CodeEmpty means the UserSig is empty.
	CodeEmpty = 70002
	// CodeMalformed means the UserSig cannot be decoded: bad base64, bad zlib
	// data, bad JSON, a wrong TLS.ver, or missing, negative or malformed
	// fields; also UserSigs that are too large.
	CodeMalformed = 70003
	// CodeTruncated means the UserSig has been cut off (the zlib stream ends
	// early).
	CodeTruncated = 70005
	// CodeBadSignature means the HMAC does not match: the UserSig was signed
	// with another secret key.
	CodeBadSignature = 70009
	// CodeIdentifierMismatch means the UserSig was issued for another UserID.
	CodeIdentifierMismatch = 70013
	// CodeSDKAppIDMismatch means the UserSig was issued for another SDKAppID.
	CodeSDKAppIDMismatch = 70014
)

// Error is a UserSig check failure. Code is one of the Code* constants; Msg
// says what is wrong and what to fix. Msg never contains the UserSig or the
// key.
type Error struct {
	Code int
	Msg  string
}

// Error returns "usersig: <code> <message>".
func (e *Error) Error() string {
	return fmt.Sprintf("usersig: %d %s", e.Code, e.Msg)
}

func newError(code int, format string, args ...any) *Error {
	return &Error{Code: code, Msg: fmt.Sprintf(format, args...)}
}

// CodeOf returns the code of the *Error in err's chain: 0 when err is nil and
// -1 when err is not (and does not wrap) an *Error.
func CodeOf(err error) int {
	if err == nil {
		return 0
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return -1
}

// Meaning returns a short description of a code returned by CodeOf.
func Meaning(code int) string {
	switch code {
	case 0:
		return "ok"
	case -1:
		return "not a UserSig check error"
	case CodeExpired:
		return "UserSig expired"
	case CodeEmpty:
		return "UserSig empty"
	case CodeMalformed:
		return "UserSig malformed"
	case CodeTruncated:
		return "UserSig truncated"
	case CodeBadSignature:
		return "UserSig signed with the wrong key or SDKAppID"
	case CodeIdentifierMismatch:
		return "UserID in the UserSig does not match"
	case CodeSDKAppIDMismatch:
		return "SDKAppID in the UserSig does not match"
	default:
		return "unknown UserSig error code"
	}
}

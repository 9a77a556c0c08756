package main

import "fmt"

// codeInfo is what a result code means and what to do about it.
type codeInfo struct {
	meaning, todo string
}

// codes are the login codes of the Tencent Chat SDK and its server that
// chatd reports (docs/protocol.md).
var codes = map[int]codeInfo{
	6013:  {"not initialised: no identity configured", "configure chatd's user_id"},
	6014:  {"not logged in, or kicked offline", "log in first"},
	6015:  {"operation in progress", "wait for it"},
	6017:  {"invalid parameters", "check the UserID and UserSig"},
	6206:  {"UserSig expired (noticed on the device)", "get a NEW UserSig, then log in"},
	6208:  {"kicked offline by another terminal or an operator", "decide deliberately before logging in again"},
	7003:  {"invalid UserID", "use letters, digits, _ and -, at most 32 bytes"},
	7008:  {"called too often", "back off and try later"},
	7009:  {"interrupted by shutdown", ""},
	7501:  {"a login is already in progress", "wait for its result (chatctl wait --status LOGINED)"},
	7502:  {"a logout is already in progress", "wait for its result"},
	70001: {"UserSig expired", "get a NEW UserSig, then log in"},
	70002: {"UserSig empty", "pass the UserSig generated for this UserID"},
	70003: {"UserSig check failed (malformed)", "copy the whole UserSig, unchanged"},
	70005: {"UserSig check failed (truncated)", "copy the whole UserSig"},
	70009: {"UserSig signed with the wrong key or SDKAppID", "generate it with this app's key"},
	70013: {"UserID in the UserSig does not match", "generate the UserSig for this UserID"},
	70014: {"SDKAppID in the UserSig does not match", "generate the UserSig for this app"},
	70016: {"key not found", ""},
	70020: {"SDKAppID not found", ""},
	70050: {"too many failed attempts", "retry after 1 minute"},
	70051: {"account blocked", ""},
	70052: {"UserSig invalidated (for example by an admin kick)", "get a NEW UserSig, then log in"},
	70107: {"account not imported", ""},
	70169: {"server timeout", "retry later"},
	70202: {"server internal error", "retry later"},
	70500: {"server internal error", "retry later"},
}

// codeMeaning says what a code means, for messages.
func codeMeaning(code int) string {
	if code == 0 {
		return "ok"
	}
	if ci, ok := codes[code]; ok {
		return ci.meaning
	}
	return "unknown code"
}

// codeHint says what to do about a code, or "".
func codeHint(code int) string {
	return codes[code].todo
}

// describeCode is "70001 (UserSig expired)".
func describeCode(code int) string {
	return fmt.Sprintf("%d (%s)", code, codeMeaning(code))
}

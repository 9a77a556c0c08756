// Package usersig generates, decodes and verifies UserSigs, the login
// credentials of Tencent Cloud Chat (IM), byte-compatible with Tencent's
// "TLS sig API v2" libraries (for example the official npm package
// tls-sig-api-v2).
//
// A UserSig is built like this:
//
//  1. The content string, each line ending in "\n", in this order:
//     "TLS.identifier:<userID>", "TLS.sdkappid:<sdkappid>",
//     "TLS.time:<unix seconds>", "TLS.expire:<lifetime seconds>" and, only
//     when a userbuf is used, "TLS.userbuf:<standard base64 of userbuf>".
//  2. TLS.sig is the standard base64 of HMAC-SHA256 over the content, keyed
//     with the raw bytes of the secret key string.
//  3. A JSON object holds TLS.ver ("2.0"), TLS.identifier, TLS.sdkappid,
//     TLS.time, TLS.expire, the optional TLS.userbuf and TLS.sig.
//  4. The JSON is zlib-compressed, standard-base64 encoded, and then '+' is
//     replaced by '*', '/' by '-' and '=' by '_'.
//
// Because zlib output differs between implementations, two UserSigs for the
// same inputs are compared by their decoded fields and TLS.sig, never as
// whole strings.
//
// Decode needs no key and is meant for diagnostics ("who is this UserSig for,
// and when does it expire?"). Verify checks a UserSig the way the server does
// and reports failures as *Error values carrying the server's error codes
// (70001 expired, 70002 empty, 70003 malformed, 70005 truncated, 70009 wrong
// key, 70013 wrong user, 70014 wrong SDKAppID). Error messages say what to fix
// and never contain the UserSig or the key.
//
// The signing key is held in a Secret so that it cannot be printed, logged or
// marshalled by accident.
package usersig

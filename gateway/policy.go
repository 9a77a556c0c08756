package gateway

import (
	"fmt"
	"strconv"
	"strings"

	"chatd/mqtt"
)

// Policy is a multi-client login policy: which platforms of one user may be
// online at the same time.
type Policy int

// The policies, as the Chat SDK's console names them.
const (
	// SinglePlatform: one of Android, iPhone, iPad, Windows, Mac, Linux,
	// Web at a time.
	SinglePlatform Policy = iota + 1
	// DualPlatform: one of the native platforms, plus Web.
	DualPlatform
	// TriplePlatform: one mobile (Android, iPhone, iPad), one desktop
	// (Windows, Mac, Linux), plus Web.
	TriplePlatform
	// MultiPlatform: every platform at once.
	MultiPlatform
)

var policyNames = map[Policy]string{
	SinglePlatform: "single",
	DualPlatform:   "dual",
	TriplePlatform: "triple",
	MultiPlatform:  "multi",
}

func (p Policy) String() string {
	if s, ok := policyNames[p]; ok {
		return s
	}
	return "Policy(" + strconv.Itoa(int(p)) + ")"
}

// ParsePolicy accepts "single", "dual", "triple" or "multi" (with or without
// a "-platform" suffix).
func ParsePolicy(s string) (Policy, error) {
	t := strings.TrimSuffix(strings.ToLower(strings.TrimSpace(s)), "-platform")
	for p, name := range policyNames {
		if t == name {
			return p, nil
		}
	}
	return 0, fmt.Errorf("unknown policy %q: use single, dual, triple or multi", s)
}

// group returns the set of platforms that exclude each other under p: a
// login on one platform of a group kicks the sessions on the group's other
// platforms.
func (p Policy) group(platform string) string {
	switch p {
	case SinglePlatform:
		return "all"
	case DualPlatform:
		if platform == "Web" {
			return "web"
		}
		return "native"
	case TriplePlatform:
		switch platform {
		case "Web":
			return "web"
		case "Android", "iPhone", "iPad":
			return "mobile"
		default:
			return "desktop" // Windows, Mac, Linux
		}
	default:
		return platform
	}
}

// MaxInstanceLimit is the largest number of instances allowed per platform.
func MaxInstanceLimit(platform string) int {
	if platform == "Web" {
		return 10
	}
	return 3
}

// Instances is the number of login instances allowed per platform.
type Instances map[string]int

// DefaultInstances allows one instance per platform.
func DefaultInstances() Instances {
	m := Instances{}
	for _, p := range mqtt.Platforms {
		m[p] = 1
	}
	return m
}

// Max returns the limit for platform (1 when unset).
func (in Instances) Max(platform string) int {
	if n, ok := in[platform]; ok && n > 0 {
		return n
	}
	return 1
}

// ParseInstances reads "N" (every platform) or "Platform=N,..." (the named
// platforms; the rest stay at 1), checking the limits: up to 10 on Web, up
// to 3 elsewhere.
func ParseInstances(s string) (Instances, error) {
	in := DefaultInstances()
	s = strings.TrimSpace(s)
	if s == "" {
		return in, nil
	}
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if n, err := strconv.Atoi(part); err == nil {
			// A bare number in a list sets the default for every platform.
			if n < 1 || n > 3 {
				return nil, fmt.Errorf("max instances %q: a number for every platform must be 1 to 3; Web allows up to 10 by itself, as in \"3,Web=10\"", part)
			}
			for _, p := range mqtt.Platforms {
				in[p] = n
			}
			continue
		}
		name, val, ok := strings.Cut(part, "=")
		if !ok {
			return nil, fmt.Errorf("max instances %q: write N or Platform=N, for example \"Linux=3,Web=10\"", part)
		}
		name = strings.TrimSpace(name)
		if !mqtt.ValidPlatform(name) {
			return nil, fmt.Errorf("max instances: unknown platform %q; platforms are %s", name, strings.Join(mqtt.Platforms, ", "))
		}
		n, err := strconv.Atoi(strings.TrimSpace(val))
		if err != nil || n < 1 || n > MaxInstanceLimit(name) {
			return nil, fmt.Errorf("max instances for %s: %q is not a number from 1 to %d", name, val, MaxInstanceLimit(name))
		}
		in[name] = n
	}
	return in, nil
}

package gateway

import (
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// FloodBan has the gateway cut off a flooding device on Mosquitto with the
// dynamic-security plugin (build/mosquitto/README.md): the account of a
// device with Drops messages over its rate within Window is disabled, which
// disconnects it and refuses it until the gateway enables it again after
// Duration. The gateway's broker account needs the plugin's control topic
// (`chatgw mosquitto-dynsec --gateway-ban-floods`).
//
// The account is marked (its textname) with the ban's end, so a gateway
// that restarts during a ban finds it at its next connect and lifts it on
// time.
type FloodBan struct {
	Duration time.Duration // default 1 min
	Drops    int           // default 100
	Window   time.Duration // default 10 s
}

const (
	dynsecControl  = "$CONTROL/dynamic-security/v1"
	dynsecResponse = dynsecControl + "/response"
	// banMark starts the textname of an account disabled for flooding,
	// followed by the ban's end (RFC 3339).
	banMark = "chatgw: disabled for flooding until "
)

// Ban actions, the label values of chatgw_flood_bans_total.
const (
	banDisabled = "disabled"
	banEnabled  = "enabled"
	banError    = "error"
)

// banner counts each device account's dropped messages and disables and
// enables accounts through the plugin.
type banner struct {
	opts  FloodBan
	log   *slog.Logger
	stats *stats

	mu sync.Mutex
	// publish sends a batch of commands; nil or false while there is no
	// broker connection to send it on.
	publish func(payload []byte) bool
	windows map[string]*dropWindow // username -> drops in its current window
	banned  map[string]time.Time   // username -> when its ban ends
	listed  bool                   // the plugin answered a listClients
}

type dropWindow struct {
	since time.Time
	drops int
}

func newBanner(o FloodBan, log *slog.Logger, st *stats) *banner {
	if o.Duration <= 0 {
		o.Duration = time.Minute
	}
	if o.Drops <= 0 {
		o.Drops = 100
	}
	if o.Window <= 0 {
		o.Window = 10 * time.Second
	}
	return &banner{opts: o, log: log, stats: st, windows: map[string]*dropWindow{}, banned: map[string]time.Time{}}
}

// dynsecCommand is one command of the plugin's control API.
type dynsecCommand struct {
	Command  string  `json:"command"`
	Username string  `json:"username,omitempty"`
	TextName *string `json:"textname,omitempty"`
	Verbose  bool    `json:"verbose,omitempty"`
}

func (b *banner) send(cmds ...dynsecCommand) bool {
	payload, _ := json.Marshal(struct {
		Commands []dynsecCommand `json:"commands"`
	}{cmds})
	return b.publish != nil && b.publish(payload)
}

// pahoPublish publishes commands on c without waiting (it runs in paho's
// message handler); a failure is logged when it is known.
func (b *banner) pahoPublish(c paho.Client) func([]byte) bool {
	return func(payload []byte) bool {
		if !c.IsConnectionOpen() {
			return false
		}
		t := c.Publish(dynsecControl, 1, false, payload)
		go func() {
			if t.WaitTimeout(10*time.Second) && t.Error() != nil {
				b.log.Error("sending a dynamic-security command failed", "err", t.Error())
			}
		}()
		return true
	}
}

// connected subscribes c to the plugin's answers and asks for the accounts,
// to find bans an earlier run left.
func (b *banner) connected(c paho.Client) {
	b.mu.Lock()
	b.publish = b.pahoPublish(c)
	b.listed = false
	b.mu.Unlock()
	if t := c.Subscribe(dynsecResponse, 1, b.handle); !t.WaitTimeout(10*time.Second) || t.Error() != nil {
		b.log.Error("subscribing to the dynamic-security answers failed: flooding devices are not cut off", "err", t.Error())
		return
	}
	b.mu.Lock()
	b.send(dynsecCommand{Command: "listClients", Verbose: true})
	b.mu.Unlock()
	time.AfterFunc(10*time.Second, func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		if !b.listed && c.IsConnectionOpen() {
			b.log.Error("no answer from the dynamic-security plugin within 10 s: flooding devices are not cut off; load the plugin, and give the gateway's account its control topic (chatgw mosquitto-dynsec --gateway-ban-floods)")
		}
	})
}

// dropped records a message of user's dropped over the rate, and disables
// the account when it has dropped too many.
func (b *banner) dropped(user string, now time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.banned[user]; ok {
		return
	}
	w := b.windows[user]
	if w == nil || now.Sub(w.since) > b.opts.Window {
		w = &dropWindow{since: now}
		b.windows[user] = w
	}
	w.drops++
	if w.drops < b.opts.Drops {
		return
	}
	delete(b.windows, user)
	until := now.Add(b.opts.Duration)
	b.banned[user] = until
	mark := banMark + until.UTC().Format(time.RFC3339)
	if !b.send(dynsecCommand{Command: "modifyClient", Username: user, TextName: &mark},
		dynsecCommand{Command: "disableClient", Username: user}) {
		delete(b.banned, user) // not connected: its next drops try again
		return
	}
	b.log.Warn("disabling the broker account of a flooding device", "user", user,
		"dropped", b.opts.Drops, "within", b.opts.Window, "until", until.UTC().Format(time.RFC3339))
}

// tick enables the accounts whose ban is over and forgets old drop counts.
func (b *banner) tick(now time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for user, until := range b.banned {
		if now.Before(until) {
			continue
		}
		empty := ""
		if !b.send(dynsecCommand{Command: "enableClient", Username: user},
			dynsecCommand{Command: "modifyClient", Username: user, TextName: &empty}) {
			return // not connected: the next tick tries again
		}
		delete(b.banned, user)
		b.log.Info("enabling the broker account of a device after its flood ban", "user", user)
	}
	for user, w := range b.windows {
		if now.Sub(w.since) > b.opts.Window {
			delete(b.windows, user)
		}
	}
}

// dynsecAnswer is the plugin's answer to a batch of commands.
type dynsecAnswer struct {
	Responses []struct {
		Command string `json:"command"`
		Error   string `json:"error"`
		Data    struct {
			Clients []struct {
				Username string `json:"username"`
				TextName string `json:"textname"`
				Disabled bool   `json:"disabled"`
			} `json:"clients"`
		} `json:"data"`
	} `json:"responses"`
}

// handle takes the plugin's answers: errors are logged and counted; the
// account list picks up the bans of an earlier run.
func (b *banner) handle(_ paho.Client, m paho.Message) {
	var a dynsecAnswer
	if err := json.Unmarshal(m.Payload(), &a); err != nil {
		b.log.Warn("unreadable dynamic-security answer", "err", err)
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, r := range a.Responses {
		if r.Error != "" {
			b.stats.bans.With(banError).Add(1)
			b.log.Error("the dynamic-security plugin refused a command", "command", r.Command, "error", r.Error)
			continue
		}
		switch r.Command {
		case "disableClient":
			b.stats.bans.With(banDisabled).Add(1)
			continue
		case "enableClient":
			b.stats.bans.With(banEnabled).Add(1)
			continue
		case "listClients":
			b.listed = true
		default:
			continue
		}
		for _, c := range r.Data.Clients {
			end, ok := strings.CutPrefix(c.TextName, banMark)
			if !c.Disabled || !ok {
				continue
			}
			until, err := time.Parse(time.RFC3339, end)
			if err != nil {
				until = time.Time{} // unreadable: lift it at the next tick
			}
			if _, known := b.banned[c.Username]; !known {
				b.banned[c.Username] = until
				b.log.Info("found a flood ban of an earlier run", "user", c.Username, "until", end)
			}
		}
	}
}

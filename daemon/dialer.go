package daemon

import (
	"context"
	"crypto/tls"
	"fmt"
	"os"
	"strings"
	"syscall"

	"chatd/mqtt"
)

// MQTTDialer connects to the configured brokers with chatd/mqtt.
type MQTTDialer struct {
	cfg      Config
	topics   mqtt.Topics
	tls      *tls.Config
	password string
}

// NewMQTTDialer reads the TLS files and broker password the config names.
func NewMQTTDialer(cfg Config, topics mqtt.Topics) (*MQTTDialer, error) {
	d := &MQTTDialer{cfg: cfg, topics: topics}
	if cfg.MQTT.TLSCA != "" || cfg.MQTT.TLSCert != "" {
		tc, err := mqtt.LoadTLS(cfg.MQTT.TLSCA, cfg.MQTT.TLSCert, cfg.MQTT.TLSKey)
		if err != nil {
			return nil, err
		}
		d.tls = tc
	}
	if cfg.MQTT.PasswordFile != "" {
		b, err := os.ReadFile(cfg.MQTT.PasswordFile)
		if err != nil {
			return nil, fmt.Errorf("mqtt.password_file: %w", err)
		}
		d.password = strings.TrimSpace(string(b))
	}
	return d, nil
}

// Dial implements Dialer.
func (d *MQTTDialer) Dial(ctx context.Context, p DialParams) (Conn, error) {
	return mqtt.Dial(ctx, mqtt.DialOptions{
		Brokers:        d.cfg.Broker,
		Topics:         d.topics,
		UserID:         p.UserID,
		Instance:       p.Instance,
		Username:       d.cfg.MQTT.Username,
		Password:       d.password,
		UserSig:        p.UserSig.Reveal(),
		TLS:            d.tls,
		KeepAlive:      d.cfg.MQTT.KeepAlive.Duration,
		ConnectTimeout: d.cfg.MQTT.ConnectTimeout.Duration,
	})
}

// systemClockSynced asks the kernel whether NTP has synchronised the clock
// (adjtimex: STA_UNSYNC clear). Where a sandbox forbids adjtimex
// (ProtectClock=), systemd-timesyncd's flag file answers instead.
func systemClockSynced() bool {
	var tx syscall.Timex
	state, err := syscall.Adjtimex(&tx)
	if err != nil {
		_, err := os.Stat("/run/systemd/timesync/synchronized")
		return err == nil
	}
	const staUnsync = 0x0040
	const timeError = 5
	return state != timeError && tx.Status&staUnsync == 0
}

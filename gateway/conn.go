package gateway

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/url"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"chatd/mqtt"
)

// BrokerOptions say how the gateway reaches its broker.
type BrokerOptions struct {
	URL      string // tcp://, ssl://, ws:// ...; ignored when Dial is set
	ClientID string // default "chatgw"
	Username string
	Password string
	TLS      *tls.Config
	// Dial, when set, opens the connection itself (the embedded broker's
	// in-process pipe).
	Dial func(ctx context.Context) (net.Conn, error)
	// QueueSize bounds the messages waiting for the gateway (default 4096);
	// past it, new ones are dropped and counted rather than blocking the
	// MQTT client.
	QueueSize int
}

type pahoPublisher struct{ c paho.Client }

func (p pahoPublisher) Publish(topic string, qos byte, payload []byte) error {
	t := p.c.Publish(topic, qos, false, payload)
	// Do not wait for the acknowledgement: the handler must not block.
	// An immediate failure (not connected) is reported.
	select {
	case <-t.Done():
		return t.Error()
	default:
		return nil
	}
}

// Serve connects to the broker, subscribes to every device's up topic and
// processes messages until ctx ends. It reconnects by itself; the
// subscription is renewed on every connect.
func (g *Gateway) Serve(ctx context.Context, bo BrokerOptions) error {
	if bo.ClientID == "" {
		bo.ClientID = "chatgw"
	}
	if bo.QueueSize == 0 {
		bo.QueueSize = 4096
	}
	in := make(chan paho.Message, bo.QueueSize)
	o := paho.NewClientOptions()
	o.SetClientID(bo.ClientID)
	o.SetUsername(bo.Username)
	o.SetPassword(bo.Password)
	o.SetTLSConfig(bo.TLS)
	o.SetKeepAlive(30 * time.Second)
	o.SetPingTimeout(10 * time.Second)
	o.SetConnectTimeout(10 * time.Second)
	o.SetAutoReconnect(true)
	o.SetConnectRetry(true)
	o.SetConnectRetryInterval(time.Second)
	o.SetMaxReconnectInterval(10 * time.Second)
	// A persistent session: on a broker that keeps sessions (Mosquitto), the
	// requests devices send while the gateway restarts wait for it.
	o.SetCleanSession(false)
	o.SetOrderMatters(false)
	if bo.Dial != nil {
		o.AddBroker("tcp://embedded")
		o.SetCustomOpenConnectionFn(func(*url.URL, paho.ClientOptions) (net.Conn, error) {
			dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			return bo.Dial(dctx)
		})
	} else {
		if bo.URL == "" {
			return errors.New("no broker: pass --broker URL or --embedded-broker ADDR")
		}
		o.AddBroker(bo.URL)
	}
	handler := func(_ paho.Client, m paho.Message) {
		select {
		case in <- m:
		default:
			g.stats.dropped("queue_full")
		}
	}
	filter := g.topics.UpFilter()
	o.SetOnConnectHandler(func(c paho.Client) {
		g.log.Info("connected to broker", "subscribing", filter)
		// This handler runs in its own goroutine: retry until subscribed or
		// the connection is gone (the next connect runs it again).
		for c.IsConnectionOpen() {
			t := c.Subscribe(filter, mqtt.QoSRequest, handler)
			if t.WaitTimeout(10*time.Second) && t.Error() == nil {
				g.subscribedOnce.Do(func() { close(g.subscribed) })
				return
			}
			g.log.Error("subscribing failed; retrying", "filter", filter, "err", t.Error())
			time.Sleep(time.Second)
		}
	})
	o.SetConnectionLostHandler(func(_ paho.Client, err error) {
		g.log.Warn("lost the broker connection; reconnecting", "err", err)
	})
	c := paho.NewClient(o)
	g.SetPublisher(pahoPublisher{c})
	t := c.Connect()
	// With ConnectRetry the token completes only once connected; don't wait.
	go func() {
		<-t.Done()
		if err := t.Error(); err != nil {
			g.log.Error("connecting to broker failed", "err", err)
		}
	}()
	timersDone := make(chan error, 1)
	tctx, cancelTimers := context.WithCancel(ctx)
	go func() { timersDone <- g.RunTimers(tctx) }()
	defer func() {
		cancelTimers()
		<-timersDone
		c.Disconnect(250)
		g.SetPublisher(nil)
	}()
	for {
		select {
		case <-ctx.Done():
			return nil
		case m := <-in:
			g.HandleMessage(m.Topic(), m.Payload())
		}
	}
}

// Command bareclient is the baseline of the benchmark suite's idle
// figures: a bare paho client with chatd's connection settings, connected
// and subscribed, doing nothing else until SIGTERM. It links paho and the
// protocol's encoder only.
//
//	bareclient BROKER USER PASSWORD CLIENTID [reconnect]
//
// With reconnect, paho's own reconnect is on (its defaults), it
// subscribes on every connect and prints "connected UNIXNANO" each time.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"chatd/mqtt"
)

func main() {
	if len(os.Args) != 5 && (len(os.Args) != 6 || os.Args[5] != "reconnect") {
		fmt.Fprintln(os.Stderr, "usage: bareclient BROKER USER PASSWORD CLIENTID [reconnect]")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2], os.Args[3], os.Args[4], len(os.Args) == 6); err != nil {
		fmt.Fprintln(os.Stderr, "bareclient:", err)
		os.Exit(1)
	}
}

func run(broker, user, pass, inst string, reconnect bool) error {
	topics := mqtt.Topics{Prefix: mqtt.DefaultPrefix}
	// chatd's settings (mqtt.Dial): clean session, no auto-reconnect,
	// keepalive 30 s with a 4 s ping timeout, ordered delivery, a Will.
	o := paho.NewClientOptions().AddBroker(broker).SetClientID(inst).SetUsername(user).SetPassword(pass).
		SetCleanSession(true).SetAutoReconnect(false).SetConnectRetry(false).
		SetKeepAlive(30*time.Second).SetPingTimeout(4*time.Second).SetConnectTimeout(10*time.Second).
		SetWriteTimeout(10*time.Second).SetOrderMatters(true).
		SetBinaryWill(topics.Up(user, inst), mqtt.Encode(mqtt.Message{Type: mqtt.TypeOffline, Conn: "c0"}), mqtt.QoSWill, false)
	sub := func(c paho.Client) error {
		tok := c.Subscribe(topics.Down(user, inst), mqtt.QoSReply, func(paho.Client, paho.Message) {})
		if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			return fmt.Errorf("subscribe: %v", tok.Error())
		}
		return nil
	}
	if reconnect {
		o.SetAutoReconnect(true).SetOnConnectHandler(func(c paho.Client) {
			if sub(c) == nil {
				fmt.Printf("connected %d\n", time.Now().UnixNano())
			}
		})
	}
	c := paho.NewClient(o)
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		return fmt.Errorf("connect: %v", tok.Error())
	}
	if !reconnect {
		if err := sub(c); err != nil {
			return err
		}
	}
	fmt.Println("ready")
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	c.Disconnect(0)
	return nil
}

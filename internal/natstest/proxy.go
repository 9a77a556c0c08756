package natstest

import (
	"io"
	"net"
	"strconv"
	"sync"
	"syscall"
)

// link is one direction of the route between two nodes: node from
// connects to the link's listener, which forwards to node to's cluster
// port. Cut, it still accepts and reads, but delivers nothing in either
// direction, as a network that drops every packet: the nodes notice by
// their pings going unanswered.
type link struct {
	from, to int
	ln       net.Listener
	target   func() string // to's cluster address now ("" while it is down)

	mu    sync.Mutex
	cut   bool
	conns map[*pipe]struct{}
	done  bool
}

type pipe struct {
	a, b   net.Conn
	frozen bool // set under link.mu: the pipe lived through a cut
}

func newLink(from, to int, target func() string) (*link, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	l := &link{from: from, to: to, ln: ln, target: target, conns: map[*pipe]struct{}{}}
	go l.serve()
	return l, nil
}

func (l *link) addr() string { return l.ln.Addr().String() }

func (l *link) serve() {
	for {
		c, err := l.ln.Accept()
		if err != nil {
			return
		}
		go l.handle(c)
	}
}

func (l *link) handle(a net.Conn) {
	p := &pipe{a: a}
	l.mu.Lock()
	if l.done {
		l.mu.Unlock()
		a.Close()
		return
	}
	cut := l.cut
	l.mu.Unlock()
	if cut {
		// Nothing reaches the other side: read and drop until the node
		// gives up on the connection.
		p.frozen = true
		l.track(p)
		io.Copy(io.Discard, a)
		l.untrack(p)
		return
	}
	addr := l.target()
	if addr == "" {
		a.Close()
		return
	}
	b, err := net.Dial("tcp", addr)
	if err != nil {
		a.Close()
		return
	}
	p.b = b
	l.track(p)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); l.copy(p, b, a) }()
	go func() { defer wg.Done(); l.copy(p, a, b) }()
	wg.Wait()
	l.untrack(p)
}

// copy forwards src to dst until either side closes, dropping what it
// reads once the pipe is frozen.
func (l *link) copy(p *pipe, dst, src net.Conn) {
	defer func() { p.a.Close(); p.b.Close() }()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			l.mu.Lock()
			frozen := p.frozen
			l.mu.Unlock()
			if !frozen {
				if _, werr := dst.Write(buf[:n]); werr != nil {
					return
				}
			}
		}
		if err != nil {
			return
		}
	}
}

func (l *link) track(p *pipe) {
	l.mu.Lock()
	l.conns[p] = struct{}{}
	l.mu.Unlock()
}

func (l *link) untrack(p *pipe) {
	l.mu.Lock()
	delete(l.conns, p)
	l.mu.Unlock()
}

// setCut stalls the link (every connection on it, and every new one), or
// heals it: the connections that lived through the cut are closed (they
// are dead to both nodes by then, or soon), new ones are forwarded.
func (l *link) setCut(cut bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.cut = cut
	for p := range l.conns {
		if cut {
			p.frozen = true
		} else if p.frozen {
			p.a.Close()
			if p.b != nil {
				p.b.Close()
			}
		}
	}
}

// drop closes every connection on the link (the node at one end died).
func (l *link) drop() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for p := range l.conns {
		p.a.Close()
		if p.b != nil {
			p.b.Close()
		}
	}
}

func (l *link) close() {
	l.mu.Lock()
	l.done = true
	l.mu.Unlock()
	l.ln.Close()
	l.drop()
}

// refuser is the address every node advertises for its routes, so that no
// node bypasses the links by connecting to an address it learns from
// another: a port bound but not listening, which refuses every connection.
// (One that accepted and closed would be dialled again and again for ever:
// nats-server counts a connection made as a success and reconnects.)
type refuser struct {
	fd   int
	addr string
}

func newRefuser() (*refuser, error) {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		syscall.Close(fd)
		return nil, err
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		syscall.Close(fd)
		return nil, err
	}
	port := sa.(*syscall.SockaddrInet4).Port
	return &refuser{fd: fd, addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port))}, nil
}

func (r *refuser) close() { syscall.Close(r.fd) }

// Package natsembed runs a NATS server with JetStream inside the easguard
// process. The all-in-one binary uses it so that one command runs the whole
// pipeline; tests use it so that they talk to a real JetStream, never a mock.
// Workers connect to it in-process, exactly as they would to a remote server
// through a URL.
package natsembed

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// Options configures the embedded server.
type Options struct {
	// StoreDir holds JetStream's file store; it survives restarts.
	StoreDir string
	// Listen is host:port for clients outside the process (the nats CLI,
	// separate worker processes); empty means in-process only. Port 0
	// picks a free port.
	Listen string
	// MonitorListen is host:port for the server's HTTP monitoring
	// (/healthz, /jsz); empty disables it.
	MonitorListen string
	// ReadyTimeout bounds the wait for the server to accept connections.
	ReadyTimeout time.Duration
	// Logs enables the server's own log on stderr.
	Logs bool
	// Username and Password, when set, are what every client must log on
	// with, the in-process ones included (Connect passes them): a listener
	// beyond loopback needs them (IsLoopback).
	Username, Password string
}

// Server is a running embedded NATS server.
type Server struct {
	ns         *server.Server
	user, pass string
}

// IsLoopback reports whether a listen address (host:port) accepts
// connections from this machine only: localhost, 127.0.0.0/8 or ::1. An
// empty host listens on every interface.
func IsLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Start starts the server and waits until it accepts connections.
func Start(o Options) (*Server, error) {
	if o.StoreDir == "" {
		return nil, errors.New("start embedded nats: store directory is empty")
	}
	opts := &server.Options{
		ServerName: "easguard-embedded",
		JetStream:  true,
		StoreDir:   o.StoreDir,
		NoSigs:     true,
		NoLog:      !o.Logs,
		DontListen: o.Listen == "",
		Username:   o.Username,
		Password:   o.Password,
	}
	if (o.Username == "") != (o.Password == "") {
		return nil, errors.New("start embedded nats: give a user and a password, or neither")
	}
	var err error
	if o.Listen != "" {
		if opts.Host, opts.Port, err = listenAddr(o.Listen); err != nil {
			return nil, fmt.Errorf("start embedded nats: listen address: %w", err)
		}
	}
	if o.MonitorListen != "" {
		if opts.HTTPHost, opts.HTTPPort, err = listenAddr(o.MonitorListen); err != nil {
			return nil, fmt.Errorf("start embedded nats: monitor address: %w", err)
		}
	}
	ns, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("start embedded nats: %w", err)
	}
	if o.Logs {
		ns.ConfigureLogger()
	}
	go ns.Start()
	timeout := o.ReadyTimeout
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	if !ns.ReadyForConnections(timeout) {
		ns.Shutdown()
		return nil, fmt.Errorf("start embedded nats: not ready after %s (store %s)", timeout, o.StoreDir)
	}
	if !ns.JetStreamEnabled() {
		ns.Shutdown()
		return nil, fmt.Errorf("start embedded nats: JetStream did not start (store %s)", o.StoreDir)
	}
	return &Server{ns: ns, user: o.Username, pass: o.Password}, nil
}

// listenAddr splits host:port for the server's options; port 0 asks the
// server to pick a free one.
func listenAddr(addr string) (string, int, error) {
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("port %q is not a number from 0 to 65535", p)
	}
	if port == 0 {
		port = server.RANDOM_PORT
	}
	return host, port, nil
}

// Connect opens a client connection through an in-process pipe, no socket.
func (s *Server) Connect(name string, opts ...nats.Option) (*nats.Conn, error) {
	opts = append([]nats.Option{nats.Name(name), nats.InProcessServer(s.ns)}, opts...)
	if s.user != "" {
		opts = append(opts, nats.UserInfo(s.user, s.pass))
	}
	nc, err := nats.Connect("", opts...)
	if err != nil {
		return nil, fmt.Errorf("connect to embedded nats: %w", err)
	}
	return nc, nil
}

// ClientURL returns the nats:// URL of the client listener, or "" when the
// server listens only in-process.
func (s *Server) ClientURL() string {
	addr := s.ns.Addr()
	if addr == nil {
		return ""
	}
	return "nats://" + addr.String()
}

// MonitorURL returns the http:// URL of the monitoring listener, or "".
func (s *Server) MonitorURL() string {
	addr := s.ns.MonitorAddr()
	if addr == nil {
		return ""
	}
	return "http://" + addr.String()
}

// Shutdown stops the server and waits until it has stopped.
func (s *Server) Shutdown() {
	s.ns.Shutdown()
	s.ns.WaitForShutdown()
}

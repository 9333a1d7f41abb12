package bus

import (
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
)

// ConnectOptions says how to reach a NATS server that is not embedded.
type ConnectOptions struct {
	// URL is one or more comma-separated server URLs.
	URL string
	// Name identifies the connection in the server's monitoring.
	Name      string
	User      string
	Password  string
	Token     string
	CredsFile string
	Logger    *slog.Logger
}

// Connect dials NATS and keeps reconnecting for as long as the process
// lives: a worker that gives up on its bus is a worker that silently stops,
// while one that keeps trying reports not-ready until the bus is back.
func Connect(o ConnectOptions) (*nats.Conn, error) {
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	opts := []nats.Option{
		nats.Name(o.Name),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(time.Second),
		nats.RetryOnFailedConnect(false),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			log.Warn("nats disconnected", "error", err)
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info("nats reconnected", "server", nc.ConnectedUrlRedacted())
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subject := ""
			if sub != nil {
				subject = sub.Subject
			}
			log.Warn("nats error", "subject", subject, "error", err)
		}),
	}
	switch {
	case o.CredsFile != "":
		opts = append(opts, nats.UserCredentials(o.CredsFile))
	case o.Token != "":
		opts = append(opts, nats.Token(o.Token))
	case o.User != "":
		opts = append(opts, nats.UserInfo(o.User, o.Password))
	}
	nc, err := nats.Connect(o.URL, opts...)
	if err != nil {
		// The URL may carry credentials; the error from nats.go does not.
		return nil, fmt.Errorf("connect to nats: %w", err)
	}
	return nc, nil
}

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

// SyncQueueLen sizes the buffer of every synchronous subscription of a
// worker's connection. A BulkReader's batched read (jetstreamext, through
// natsext.RequestMany) opens one per request, and nats.go's default buffer
// of 65,536 messages is half a megabyte allocated for at most 256
// answers: at 100,000 partnerships that was a tenth of everything a full
// sync allocated. A message beyond the buffer is dropped as a slow
// consumer's, so it stays well above bulkChunk.
func SyncQueueLen() nats.Option { return nats.SyncQueueLen(4 * bulkChunk) }

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
		SyncQueueLen(),
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

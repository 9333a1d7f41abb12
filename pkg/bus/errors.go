package bus

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// ErrPoison marks a message that can never be processed: it does not decode,
// fails validation, or a handler judged it invalid. The runner moves it to
// the dead-letter subject at once instead of retrying it.
var ErrPoison = errors.New("poison message")

// Poison marks err as terminal for the message being handled.
func Poison(err error) error {
	if err == nil {
		err = errors.New("unspecified")
	}
	return fmt.Errorf("%w: %w", ErrPoison, err)
}

// RetryAfter marks err as transient with a delay the caller knows better
// than the runner's backoff, such as Exchange's throttling back-off.
func RetryAfter(d time.Duration, err error) error {
	return &retryAfterError{delay: d, err: err}
}

type retryAfterError struct {
	delay time.Duration
	err   error
}

func (e *retryAfterError) Error() string {
	return fmt.Sprintf("retry after %s: %v", e.delay, e.err)
}

func (e *retryAfterError) Unwrap() error { return e.err }

// RetryAfter returns the delay asked for.
func (e *retryAfterError) RetryAfter() time.Duration { return e.delay }

// retryAfter is implemented by any error that knows how long to wait; other
// packages can implement it without importing bus.
type retryAfter interface {
	RetryAfter() time.Duration
}

// retryDelay returns the delay an error asks for, if any.
func retryDelay(err error) (time.Duration, bool) {
	var ra retryAfter
	if errors.As(err, &ra) {
		return ra.RetryAfter(), true
	}
	return 0, false
}

// errPublish marks a failure to publish, which a producer must not skip
// over (the event would be lost).
var errPublish = errors.New("publish failed")

// MarkPublishFailure marks err as a failure to publish.
func MarkPublishFailure(err error) error { return fmt.Errorf("%w: %w", errPublish, err) }

// IsPublishFailure reports whether err is a failure to publish.
func IsPublishFailure(err error) bool { return errors.Is(err, errPublish) }

// Unanswered tells a request JetStream did not answer from one it refused:
// a timeout (the request went to a stream leader that died, or a meta
// leader not yet elected), no response from the stream, no responders, or
// the API's "temporarily unavailable" (503). Asked again shortly, such a
// request is usually answered by the new leader; a refusal is final.
func Unanswered(err error) bool {
	var api *jetstream.APIError
	if errors.As(err, &api) {
		return api.Code == http.StatusServiceUnavailable
	}
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders)
}

// unansweredPatience is how long AskAgain goes on asking a stream that
// does not answer before it returns the error: a stream whose leader died
// elects another within seconds (a NATS node killed, a rolling restart),
// and asking again gets the request through within a second of the new
// leader. Returned at once, the error would go to the runner, whose
// redelivery delay grows with each failed delivery (16–32 s by the fifth)
// and which dead-letters the message when its deliveries run out, though
// an election is not the message's fault. The runner's heartbeat keeps
// the message from being redelivered meanwhile (AckWait is 30 s).
const unansweredPatience = 10 * time.Second

// AskAgain calls ask until it returns nil or an error that is not
// Unanswered, ctx ends, or unansweredPatience has passed, waiting 100 ms
// after the first refusal and up to a second between later ones; it
// returns ask's last error. ask must be safe to repeat: a request that
// was carried out although its answer was lost is made again (a publish
// with its message id, a compare-and-set that then finds its own
// revision).
func AskAgain(ctx context.Context, ask func() error) error {
	deadline := time.Now().Add(unansweredPatience)
	wait := 100 * time.Millisecond
	for {
		err := ask()
		if err == nil || !Unanswered(err) || ctx.Err() != nil || time.Now().Add(wait).After(deadline) {
			return err
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		wait = min(2*wait, time.Second)
	}
}

package mdm_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"time"

	"github.com/easguard/easguard/pkg/mdm"
	ev "github.com/easguard/easguard/proto/easguard/v1"
)

// printSink prints what a source delivers.
type printSink struct{ delivered chan struct{} }

func (s printSink) Changed(_ context.Context, changes []mdm.Change) error {
	for _, c := range changes {
		fmt.Printf("%s %s removed=%v compliance=%v\n", c.Device.GetMdmDeviceId(), c.Device.GetEasDeviceId(),
			c.Removed, c.Device.GetComplianceState())
	}
	close(s.delivered)
	return nil
}

func (printSink) Alert(_ context.Context, kind ev.AlertKind, summary string, _ map[string]string) error {
	fmt.Println("alert", kind, summary)
	return nil
}

// A sender signs the timestamp, the event id and the body with the shared
// secret and posts them; this is all an integration has to implement.
func ExampleWebhookSource() {
	secret := []byte("a shared secret of 16+ bytes")
	src, err := mdm.NewWebhookSource("webhook", mdm.WebhookOptions{
		Secret: secret,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		panic(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sink := printSink{delivered: make(chan struct{})}
	go func() { _ = src.Run(ctx, sink) }()
	srv := httptest.NewServer(src)
	defer srv.Close()

	// The sender's side.
	body := []byte(`{"devices":[{"id":"d1","easDeviceId":"ApplF17XK0001","complianceState":"compliant"}]}`)
	ts := strconv.FormatInt(time.Now().Unix(), 10)
	eventID := "0f8fad5b-d9cb-469f-a165-70867728950e"
	for {
		req, _ := http.NewRequest(http.MethodPost, srv.URL+"/mdm/webhook", bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("X-Easguard-Timestamp", ts)
		req.Header.Set("X-Easguard-Event-Id", eventID)
		req.Header.Set("X-Easguard-Signature", mdm.WebhookSignature(secret, ts, eventID, body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			panic(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable { // 503: not running yet, retry
			fmt.Println(resp.StatusCode)
			break
		}
	}
	<-sink.delivered
	// Output:
	// d1 ApplF17XK0001 removed=false compliance=COMPLIANCE_STATE_COMPLIANT
	// 202
}

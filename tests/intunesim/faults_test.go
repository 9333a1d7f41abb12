package intunesim_test

import (
	"context"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/easguard/easguard/tests/intunesim"
)

func TestGraphFaults(t *testing.T) {
	s := intunesim.StartTest(t, intunesim.Config{Extra: 10})
	c, tok := s.HTTPClient(), token(t, s)
	list := s.GraphURL() + "/deviceManagement/managedDevices"
	for _, tc := range []struct {
		fault      intunesim.Fault
		status     int
		code       string
		retryAfter string
	}{
		{intunesim.Fault{Kind: "throttle", Count: 1, RetryAfter: 7}, 429, "TooManyRequests", "7"},
		{intunesim.Fault{Kind: "unavailable", Count: 1}, 503, "ServiceUnavailable", "1"},
		{intunesim.Fault{Kind: "unavailable", Count: 1, RetryAfter: -1}, 503, "ServiceUnavailable", ""},
		{intunesim.Fault{Kind: "error", Count: 1}, 500, "InternalServerError", ""},
	} {
		t.Run(tc.fault.Kind, func(t *testing.T) {
			if err := s.Inject(tc.fault); err != nil {
				t.Fatal(err)
			}
			r := get(t, c, list, tok)
			if r.status != tc.status || r.graphCode(t) != tc.code || r.header.Get("Retry-After") != tc.retryAfter {
				t.Fatalf("%d %q Retry-After %q: %s", r.status, r.graphCode(t), r.header.Get("Retry-After"), r.body)
			}
			rec := s.Recorder.Records("graph")
			if last := rec[len(rec)-1]; last.Fault != tc.fault.Kind || last.Status != tc.status || last.RetryAfter != tc.retryAfter {
				t.Fatalf("record %+v", last)
			}
			// Count 1: the next request is served.
			if r := get(t, c, list, tok); r.status != 200 {
				t.Fatalf("after the fault: %d", r.status)
			}
		})
	}

	t.Run("malformed", func(t *testing.T) {
		if err := s.Inject(intunesim.Fault{Kind: "malformed", Count: 1}); err != nil {
			t.Fatal(err)
		}
		r := get(t, c, list, tok)
		var v any
		if r.status != 200 || json.Unmarshal(r.body, &v) == nil {
			t.Fatalf("malformed page: %d, valid JSON %s", r.status, r.body)
		}
	})

	t.Run("slow", func(t *testing.T) {
		if err := s.Inject(intunesim.Fault{Kind: "slow", DelayMS: 150, Count: 2}); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 3; i++ {
			start := time.Now()
			if r := get(t, c, list, tok); r.status != 200 {
				t.Fatalf("slow page: %d", r.status)
			}
			if took := time.Since(start); (i < 2) != (took >= 150*time.Millisecond) {
				t.Fatalf("request %d took %v", i, took)
			}
		}
	})

	t.Run("until cleared", func(t *testing.T) {
		if err := s.Inject(intunesim.Fault{Kind: "error"}); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 3; i++ {
			if r := get(t, c, list, tok); r.status != 500 {
				t.Fatalf("request %d: %d", i, r.status)
			}
		}
		if f := s.Faults(); len(f) != 1 || f[0].Count != 0 {
			t.Fatalf("faults %+v", f)
		}
		if err := s.Inject(intunesim.Fault{Kind: "clear"}); err != nil {
			t.Fatal(err)
		}
		if r := get(t, c, list, tok); r.status != 200 {
			t.Fatalf("after clear: %d", r.status)
		}
	})

	t.Run("bad faults", func(t *testing.T) {
		for _, f := range []intunesim.Fault{{Kind: "bogus"}, {Kind: "slow"}, {Kind: "token_error", Status: 418}, {Kind: "error", Count: -1}} {
			if err := s.Inject(f); err == nil {
				t.Errorf("fault %+v accepted", f)
			}
		}
	})

	// A 401 is not a throttled request: faults wait for an authenticated one.
	if err := s.Inject(intunesim.Fault{Kind: "throttle", Count: 1}); err != nil {
		t.Fatal(err)
	}
	if r := get(t, c, list, "nope"); r.status != 401 {
		t.Fatalf("bad token under a fault: %d", r.status)
	}
	if r := get(t, c, list, tok); r.status != 429 {
		t.Fatalf("fault not kept for the authenticated request: %d", r.status)
	}
}

// TestFaultAtPage makes a listing fail midway and shows that the failed
// page's nextLink can be retried.
func TestFaultAtPage(t *testing.T) {
	s := intunesim.StartTest(t, intunesim.Config{Extra: 2500})
	c, tok := s.HTTPClient(), token(t, s)
	if err := s.Inject(intunesim.Fault{Kind: "unavailable", AtPage: 2, Count: 1, RetryAfter: 3}); err != nil {
		t.Fatal(err)
	}
	// A single GET is not page 2 of a listing.
	if r := get(t, c, s.GraphURL()+"/deviceManagement/managedDevices/"+s.Devices()[0].ID, tok); r.status != 200 {
		t.Fatalf("single GET: %d", r.status)
	}
	p1 := getPage(t, c, s.GraphURL()+"/deviceManagement/managedDevices?$top=1000", tok)
	r := get(t, c, p1.NextLink, tok)
	if r.status != 503 || r.header.Get("Retry-After") != "3" {
		t.Fatalf("page 2: %d Retry-After %q", r.status, r.header.Get("Retry-After"))
	}
	rest, pages := listAll(t, c, p1.NextLink, tok)
	if pages != 2 || len(p1.Value)+len(rest) != 2500 {
		t.Fatalf("after the retry: %d pages, %d devices", pages, len(p1.Value)+len(rest))
	}
}

// TestRetryAfterIsMeasurable shows how a test asserts that a client
// honoured Retry-After: the recorder stamps every request's arrival.
func TestRetryAfterIsMeasurable(t *testing.T) {
	s := intunesim.StartTest(t, intunesim.Config{Extra: 5})
	c, tok := s.HTTPClient(), token(t, s)
	if err := s.Inject(intunesim.Fault{Kind: "throttle", Count: 1, RetryAfter: 1}); err != nil {
		t.Fatal(err)
	}
	// A well-behaved client: wait Retry-After, then retry.
	url := s.GraphURL() + "/deviceManagement/managedDevices"
	for {
		r := get(t, c, url, tok)
		if r.status == 200 {
			break
		}
		secs, err := strconv.Atoi(r.header.Get("Retry-After"))
		if r.status != 429 || err != nil {
			t.Fatalf("%d Retry-After %q", r.status, r.header.Get("Retry-After"))
		}
		time.Sleep(time.Duration(secs) * time.Second) // the client under test waiting, not test synchronisation
	}
	recs := s.Recorder.Records("graph")
	if len(recs) != 2 || recs[0].Status != 429 || recs[0].RetryAfter != "1" || recs[1].Status != 200 {
		t.Fatalf("records %+v", recs)
	}
	if gap := recs[1].Time.Sub(recs[0].Time); gap < time.Second {
		t.Fatalf("the retry came after %v, before Retry-After", gap)
	}
}

func TestTokenErrorFault(t *testing.T) {
	s := intunesim.StartTest(t, intunesim.Config{})
	for _, tc := range []struct {
		status    int
		code, aad string
	}{{500, "server_error", "AADSTS50000"}, {400, "invalid_request", "AADSTS50000"}, {401, "invalid_client", "AADSTS7000222"}, {503, "temporarily_unavailable", "AADSTS90033"}, {429, "temporarily_unavailable", "AADSTS90055"}} {
		if err := s.Inject(intunesim.Fault{Kind: "token_error", Status: tc.status, Count: 1}); err != nil {
			t.Fatal(err)
		}
		r := postForm(t, s, map[string]string{"grant_type": "client_credentials", "client_id": s.ClientID(), "scope": s.Scope(), "client_secret": s.ClientSecret()})
		entraError(t, r, tc.status, tc.code, tc.aad)
		if (tc.status == 429 || tc.status == 503) != (r.header.Get("Retry-After") == "1") {
			t.Fatalf("status %d Retry-After %q", tc.status, r.header.Get("Retry-After"))
		}
	}
	// Through MSAL: the failure surfaces, the next attempt gets a token.
	if err := s.Inject(intunesim.Fault{Kind: "token_error", Count: 1}); err != nil {
		t.Fatal(err)
	}
	cl := secretClient(t, s, s.ClientSecret())
	if _, err := cl.AcquireTokenByCredential(context.Background(), []string{s.Scope()}); err == nil || !strings.Contains(err.Error(), "500") {
		t.Fatalf("MSAL under token_error: %v", err)
	}
	if _, err := cl.AcquireTokenByCredential(context.Background(), []string{s.Scope()}); err != nil {
		t.Fatalf("MSAL after the fault: %v", err)
	}
	if s.Recorder.Count("token:500") != 2 || s.TokensIssued() != 1 {
		t.Fatalf("counts %v", s.Recorder.Counts())
	}
	// Graph faults leave the token endpoint alone.
	if err := s.Inject(intunesim.Fault{Kind: "error"}); err != nil {
		t.Fatal(err)
	}
	if r := postForm(t, s, map[string]string{"grant_type": "client_credentials", "client_id": s.ClientID(), "scope": s.Scope(), "client_secret": s.ClientSecret()}); r.status != http.StatusOK {
		t.Fatalf("token under a Graph fault: %d", r.status)
	}
}

package easguardv1

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// validPartnership is a partnership every check accepts.
func validPartnership(id string) *EASPartnership {
	return &EASPartnership{DeviceId: id, DeviceType: "iPhone", Mailbox: &Mailbox{Identity: "contoso.com/Users/Alice"}}
}

// validPage is a confirmed page of n partnerships every check accepts.
func validPage(n int) *EASPartnershipsConfirmed {
	page := &EASPartnershipsConfirmed{Org: "contoso", Sync: &SyncRef{SyncId: "full-1", Kind: SyncKind_SYNC_KIND_FULL},
		ObservedAt: timestamppb.New(time.Date(2026, 12, 7, 8, 0, 0, 0, time.UTC)), Page: 1}
	for i := range n {
		page.Partnerships = append(page.Partnerships, validPartnership(fmt.Sprintf("Appl%06d", i)))
	}
	return page
}

// validMatch is a verdict every check accepts: an unknown device.
func validMatch() *DeviceMatched {
	return &DeviceMatched{Org: "contoso", Observed: &EASPartnershipObserved{Partnership: validPartnership("ApplF17XK2")},
		NoMatchReason: NoMatchReason_NO_MATCH_REASON_NO_MDM_RECORD, MatchedAt: timestamppb.Now()}
}

func TestValidateNamesEachProblem(t *testing.T) {
	tests := []struct {
		name string
		msg  interface{ Validate() error }
		want string // the error's text after "invalid event: "; "" for none
	}{
		{"valid page", validPage(3), ""},
		{"page without partnerships", validPage(0), "partnerships is empty"},
		{"page with an empty device id at 2", func() *EASPartnershipsConfirmed {
			p := validPage(3)
			p.Partnerships[2].DeviceId = ""
			return p
		}(), "partnerships[2].device_id is empty"},
		{"page with a missing partnership at 1 and no org", func() *EASPartnershipsConfirmed {
			p := validPage(3)
			p.Org, p.Partnerships[1] = "", nil
			return p
		}(), "org is empty; partnerships[1] is missing"},
		{"page number 0", func() *EASPartnershipsConfirmed { p := validPage(1); p.Page = 0; return p }(), "page is 0"},
		{"partnership without a mailbox", &EASPartnership{DeviceId: "ApplF17XK2"}, "partnership.mailbox.identity is empty"},
		{"device id too long and not UTF-8", validPartnership(strings.Repeat("x", 32) + "\xff"),
			"partnership.device_id is longer than 32 characters; partnership.device_id is not valid UTF-8"},
		{"device id of 32 characters", validPartnership(strings.Repeat("é", 32)), ""},
		{"observation without a change", &EASPartnershipObserved{Org: "contoso", Partnership: validPartnership("a"),
			Sync: &SyncRef{SyncId: "s", Kind: SyncKind_SYNC_KIND_QUICK}, ObservedAt: timestamppb.Now()}, "change is unspecified"},
		{"valid verdict", validMatch(), ""},
		{"verdict with a record and a reason", func() *DeviceMatched {
			m := validMatch()
			m.Mdm, m.Method = &MDMDevice{}, MatchMethod_MATCH_METHOD_EAS_DEVICE_ID
			return m
		}(), "mdm is set together with no_match_reason"},
		{"verdict with neither", func() *DeviceMatched { m := validMatch(); m.NoMatchReason = 0; return m }(), "no mdm record and no no_match_reason"},
		{"userless verdict without its record", func() *DeviceMatched {
			m := validMatch()
			m.NoMatchReason = NoMatchReason_NO_MATCH_REASON_RECORD_WITHOUT_USER
			return m
		}(), "no_match_reason is record_without_user but mdm is missing"},
		{"verdicts with one journey too many", &DevicesMatched{Org: "contoso", Sync: &SyncRef{SyncId: "s"}, Page: 1,
			Matches: []*DeviceMatched{validMatch()}, Journeys: []string{"", ""}}, "2 journeys for 1 matches"},
		{"verdicts of another org", &DevicesMatched{Org: "fabrikam", Sync: &SyncRef{SyncId: "s"}, Page: 1,
			Matches: []*DeviceMatched{validMatch()}}, `matches[0].org is "contoso", not "fabrikam"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.msg.Validate()
			if tc.want == "" {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("Validate() = %v, want an error wrapping ErrInvalid", err)
			}
			if got := strings.TrimPrefix(err.Error(), ErrInvalid.Error()+": "); got != tc.want {
				t.Fatalf("Validate() = %q, want %q", got, tc.want)
			}
		})
	}
}

// TestValidatingAValidPageAllocatesNothing: every hop validates every
// event, a page's hundreds of partnerships included, so a check that
// passes must not build the message it would have reported.
func TestValidatingAValidPageAllocatesNothing(t *testing.T) {
	page := validPage(200)
	verdicts := &DevicesMatched{Org: "contoso", Sync: page.GetSync(), Page: 1}
	for _, p := range page.GetPartnerships() {
		m := proto.Clone(validMatch()).(*DeviceMatched)
		m.Observed.Partnership = p
		verdicts.Matches = append(verdicts.Matches, m)
	}
	for _, msg := range []interface{ Validate() error }{page, verdicts} {
		if err := msg.Validate(); err != nil {
			t.Fatal(err)
		}
		if n := testing.AllocsPerRun(20, func() { _ = msg.Validate() }); n != 0 {
			t.Errorf("%T.Validate of 200 valid entries: %.0f allocations, want 0", msg, n)
		}
	}
}

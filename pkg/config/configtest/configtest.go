// Package configtest checks a worker's settings the way its binary loads
// them, so every worker's table of good and bad environments asserts the
// same contract: good settings load, bad ones stop the worker with an
// error that names the variable.
package configtest

import (
	"errors"
	"strings"
	"testing"

	"github.com/easguard/easguard/pkg/config"
)

// Case is one environment and what loading it must give.
type Case struct {
	Name string
	Env  map[string]string
	// Want is the variable the error must name; "" means the settings
	// are valid.
	Want string
}

// Check loads a fresh S from each case's environment with config.Load. A
// refusal must name Want, and S's own Validate must report it as a
// *config.FieldError, which is how Load learns the variable's name.
func Check[S any, PS interface {
	*S
	Validate() error
}](t *testing.T, cases []Case) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.Name, func(t *testing.T) {
			for k, v := range tc.Env {
				t.Setenv(k, v)
			}
			spec := PS(new(S))
			err := config.Load(spec)
			if tc.Want == "" {
				if err != nil {
					t.Fatalf("valid settings refused: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.Want) {
				t.Fatalf("error %v, want one naming %s", err, tc.Want)
			}
			var fe *config.FieldError
			if verr := spec.Validate(); !errors.As(verr, &fe) {
				t.Fatalf("Validate: %v, want a field error", verr)
			}
		})
	}
}

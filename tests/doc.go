// Package tests holds easguard's end-to-end tests: they build the real
// binaries and drive them against a real NATS JetStream server, as an
// administrator would run them.
package tests

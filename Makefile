# easguard — see README.md. Every target works on a fresh clone with Go;
# `make proto` also needs protoc (Debian: protobuf-compiler libprotobuf-dev).
SHELL   := /bin/bash
GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/easguard/easguard/pkg/service.Version=$(VERSION)
PROTOS  := $(wildcard proto/easguard/v1/*.proto)
# Benchmarks that print `bench <name> <value> <unit>` lines.
BENCH_PKGS ?= ./...

.PHONY: all build test browser-test lint pscheck contract fuzz proto proto-check docs docs-check rules-check helm-check helm-rules bench demo run clean

all: lint build test

## build: every binary into bin/ (easguard, and the exchangesim simulator)
build:
	@mkdir -p bin
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/ ./services/... ./tests/cmd/...

## test: every test, with the race detector (real NATS servers start in-process);
## a failed run ends with the failed tests and their messages, since CI keeps only a log's tail
test:
	@log=$$(mktemp); set -o pipefail; \
	$(GO) test -race -count=1 -timeout 20m ./... 2>&1 | tee $$log; rc=$$?; \
	if [ $$rc -ne 0 ]; then echo; echo "== what failed (from the log above):"; \
		grep -E -- '^\s*--- FAIL|^panic:|^\s+[A-Za-z0-9_]+\.go:[0-9]+: ' $$log | cut -c1-300 | head -80; fi; \
	rm -f $$log; exit $$rc

## browser-test: the console in a real browser (Debian's chromium, driven by chromedp):
## sign in through an OpenID provider, sync, a device's history, approve a held mass revocation,
## a viewer refused; kept out of `make test`, which needs nothing but Go
browser-test:
	$(GO) test -race -count=1 -timeout 10m -tags browser -run 'TestConsoleInABrowser' ./tests/

## lint: gofmt and go vet
lint:
	@files=$$(gofmt -l $$(git ls-files '*.go'; git ls-files --others --exclude-standard '*.go')); \
	if [ -n "$$files" ]; then echo "gofmt would change:"; echo "$$files"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags browser ./tests/

## pscheck: parse the shipped PowerShell scripts with tree-sitter-powershell (needs node and npm),
## and check worker.ps1's contract with the Go side (strict mode: no unguarded read of a field Go may omit)
pscheck:
	bash .ci/pssyntax/run.sh

## contract: rewrite pkg/exchange/worker_contract.json from worker.ps1's syntax tree
contract:
	bash .ci/pssyntax/run.sh --contract

## fuzz: fuzz the path from device ids and identities to Exchange's cmdlet parameters
fuzz:
	$(GO) test ./pkg/exchange -run '^$$' -fuzz FuzzValuesReachExchangeByteForByte -fuzztime 2m

## proto: regenerate the Go code of proto/ with protoc and the pinned protoc-gen-go
proto:
	protoc -I proto --plugin=protoc-gen-go="$$($(GO) tool -n protoc-gen-go)" \
		--go_out=. --go_opt=module=github.com/easguard/easguard $(PROTOS)

## proto-check: fail if the committed generated code is not what make proto produces
proto-check: proto
	@if [ -n "$$(git status --porcelain -- proto/)" ]; then \
		git status --short -- proto/; git --no-pager diff --stat -- proto/; \
		echo "generated code in proto/ is stale: run make proto and commit the result"; exit 1; fi

## docs: regenerate the configuration table in README.md from the config structs
docs:
	$(GO) run ./services/easguard config-doc > .config-doc.tmp
	awk -v doc=.config-doc.tmp 'BEGIN { while ((getline l < doc) > 0) d = d l "\n" } \
		/<!-- config:begin -->/ { print; printf "%s", d; skip = 1; next } \
		/<!-- config:end -->/ { skip = 0 } !skip' README.md > README.md.tmp
	mv README.md.tmp README.md; rm -f .config-doc.tmp

## rules-check: validate deploy/prometheus's alerting rules with Prometheus'
## own promtool (the rules parse, and their unit tests pass); needs promtool
## (Debian's prometheus package, which .ci/run installs)
rules-check:
	promtool check rules deploy/prometheus/easguard.rules.yml
	cd deploy/prometheus && promtool test rules easguard.rules.test.yml

## helm-check: render deploy/helm/easguard with the Helm Go SDK for one and for two organisations
## and decode every manifest strictly into the Kubernetes (and Prometheus Operator) API types;
## its own Go module (deploy/helm/check), so that Helm and client-go stay out of the main go.mod
helm-check:
	cd deploy/helm/check && $(GO) test -count=1 ./...

## helm-rules: copy deploy/prometheus/easguard.rules.yml into the chart (Helm reads only files
## inside the chart); helm-check fails while the copy differs
helm-rules:
	cp deploy/prometheus/easguard.rules.yml deploy/helm/easguard/files/easguard.rules.yml

## docs-check: fail if README.md's configuration table is stale
docs-check: docs
	@git diff --exit-code -- README.md || (echo "README.md is stale: run make docs and commit"; exit 1)

## bench: run the benchmarks and print `bench <name> <value> <unit>` lines
## (one package at a time: two benchmarks sharing the cores skew both; the
## reconcile of 100,000 partnerships in tests/ alone takes most of an hour,
## EASGUARD_BENCH_PARTNERSHIPS=5000 makes it minutes)
bench:
	@mkdir -p bin
	set -o pipefail; $(GO) test -p 1 -run '^$$' -bench . -benchmem -timeout 150m $(BENCH_PKGS) 2>&1 \
		| $(GO) run ./tests/benchreport 2>bin/bench-raw.txt | tee bin/bench.txt

## demo: easguard next to simulated Exchange, Intune (read through Graph) and SMTP
## servers; walks one phone from quarantine to mail, then stays up
## (DEMO_EXIT=1: exit after the walk; DEMO_MDM=file: an inventory file, no Intune)
demo: build
	@./deploy/demo.sh

## run: run the all-in-one binary (EASGUARD_ORG defaults to contoso)
run: build
	EASGUARD_ORG=$${EASGUARD_ORG:-contoso} ./bin/easguard run

clean:
	rm -rf bin data

# easguard — see README.md. Every target works on a fresh clone with Go;
# `make proto` also needs protoc (Debian: protobuf-compiler libprotobuf-dev).
SHELL   := /bin/bash
GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/easguard/easguard/pkg/service.Version=$(VERSION)
PROTOS  := $(wildcard proto/easguard/v1/*.proto)
# Benchmarks that print `bench <name> <value> <unit>` lines.
BENCH_PKGS ?= ./...
# Every build, test and benchmark here uses Go's classic garbage collector,
# not Go 1.26's default Green Tea collector: on easguard's heap (the
# embedded NATS server's subject trees, above all) Green Tea's marking took
# about a fifth more CPU in a steady pass of 100,000 partnerships
# (README, Performance). `GOEXPERIMENT= make …` builds with Green Tea, to
# compare. Go 1.27 removes the opt-out: measure again before upgrading.
export GOEXPERIMENT ?= nogreenteagc

.PHONY: all build tools images compose-up compose-demo compose-down compose-test test browser-test lint pscheck contract fuzz proto proto-check docs docs-check rules-check helm-check helm-rules bench demo run clean

all: lint build test

## build: every binary into bin/ (easguard, and the exchangesim simulator), static (CGO_ENABLED=0)
build:
	@mkdir -p bin
	CGO_ENABLED=0 $(GO) build -ldflags "$(LDFLAGS)" -o bin/ ./services/... ./tests/cmd/...

# The third-party servers of the container set: nats-server at the version
# go.mod pins, Jaeger v2 and Mailpit from their own tool modules under
# deploy/tools (kept out of go.mod, so the project's builds stay fast).
NATS_VERSION    = $(shell $(GO) list -m -f '{{.Version}}' github.com/nats-io/nats-server/v2)
JAEGER_VERSION  = $(shell cd deploy/tools/jaeger && $(GO) list -m -f '{{.Version}}' github.com/jaegertracing/jaeger)
MAILPIT_VERSION = $(shell cd deploy/tools/mailpit && $(GO) list -m -f '{{.Version}}' github.com/axllent/mailpit)
REVISION        = $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
SOURCE          = https://github.com/easguard/easguard
TOOL_BUILD      = CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w

## tools: nats-server, jaeger, mailpit and the images' health-check probe into bin/tools/ (static, stripped)
tools:
	@mkdir -p bin/tools
	$(TOOL_BUILD)" -o bin/tools/nats-server github.com/nats-io/nats-server/v2
	$(TOOL_BUILD)" -o bin/tools/probe ./services/probe
	cd deploy/tools/jaeger && $(TOOL_BUILD)" -o ../../../bin/tools/jaeger github.com/jaegertracing/jaeger/cmd/jaeger
	cd deploy/tools/mailpit && $(TOOL_BUILD) -X github.com/axllent/mailpit/config.Version=$(MAILPIT_VERSION)" \
		-o ../../../bin/tools/mailpit github.com/axllent/mailpit

## images: one image per role, FROM scratch (nothing is pulled), from the binaries of build and tools:
## easguard/{easguard,exchangesim,intunesim,smtpsim,demowalk,nats-server,jaeger,mailpit}:latest
images: build tools
	@start=$$(date +%s); set -e; export PROBE=bin/tools/probe; \
	for b in easguard exchangesim intunesim smtpsim demowalk; do \
		deploy/images/build.sh $$b bin/$$b "$(VERSION)" "$(REVISION)" "$(SOURCE)"; done; \
	deploy/images/build.sh nats-server bin/tools/nats-server "$(NATS_VERSION)" "$(NATS_VERSION)" https://github.com/nats-io/nats-server; \
	deploy/images/build.sh jaeger bin/tools/jaeger "$(JAEGER_VERSION)" "$(JAEGER_VERSION)" https://github.com/jaegertracing/jaeger; \
	deploy/images/build.sh mailpit bin/tools/mailpit "$(MAILPIT_VERSION)" "$(MAILPIT_VERSION)" https://github.com/axllent/mailpit; \
	echo "images: built in $$(( $$(date +%s) - start )) s"

## test: every test, with the race detector (real NATS servers start in-process);
## a failed run ends with the failed tests and their messages, since CI keeps only a log's tail
test:
	@log=$$(mktemp); set -o pipefail; \
	$(GO) test -race -count=1 -timeout 20m ./... 2>&1 | tee $$log; rc=$$?; \
	if [ $$rc -ne 0 ]; then echo; echo "== what failed (from the log above):"; \
		grep -E -- '^\s*--- FAIL|^panic:|^\s+[A-Za-z0-9_]+\.go:[0-9]+: ' $$log | cut -c1-300 | head -80; fi; \
	rm -f $$log; exit $$rc

# The compose command: Compose v2's `docker compose`, else v1's docker-compose.
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
COMPOSE_FILE_ = deploy/compose/docker-compose.yml

## compose-up: the container set of deploy/compose (both organisations, NATS cluster, console,
## Jaeger, Mailpit) from make images, with secrets made by deploy/compose/secrets.sh
compose-up: images
	deploy/compose/secrets.sh
	$(COMPOSE) -f $(COMPOSE_FILE_) -p easguard up -d
	@echo "console http://127.0.0.1:8443 (token: deploy/compose/secrets/console-token), Jaeger http://127.0.0.1:16686, Mailpit http://127.0.0.1:8025"

## compose-demo: compose-up, then each organisation's demo phone through the seed flow; prints where to look
compose-demo: images
	deploy/compose/demo.sh

## compose-down: stop the container set and delete its volumes
compose-down:
	$(COMPOSE) -f $(COMPOSE_FILE_) -p easguard down -v --remove-orphans

## compose-test: tests/compose_test.go (build tag compose) on a compose project of its own: both
## organisations' demo phones through the seed flow and their traces in Jaeger, a wave with a NATS
## node killed, a wave through rolling restarts of every worker, then down -v; needs Docker
compose-test: images
	$(GO) test -count=1 -timeout 20m -tags compose -run 'TestCompose' -v ./tests/

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
	$(GO) vet -tags compose ./tests/

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

## proto: regenerate the Go code of proto/ with protoc, the pinned protoc-gen-go and protoc-gen-go-vtproto (reflection-free decoding and comparison of state records)
proto:
	protoc -I proto --plugin=protoc-gen-go="$$($(GO) tool -n protoc-gen-go)" \
		--plugin=protoc-gen-go-vtproto="$$($(GO) tool -n protoc-gen-go-vtproto)" \
		--go_out=. --go_opt=module=github.com/easguard/easguard \
		--go-vtproto_out=. --go-vtproto_opt=module=github.com/easguard/easguard,features=unmarshal+equal \
		$(PROTOS)

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

//go:build tools

// Package promtool pins the Prometheus release whose promtool checks and unit-tests
// deploy/prometheus/mailroom-rules.yaml and checks the operator's /metrics in the tests.
package promtool

import (
	_ "github.com/prometheus/prometheus/cmd/promtool"
)

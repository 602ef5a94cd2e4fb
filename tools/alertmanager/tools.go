//go:build tools

// Package alertmanager pins the Alertmanager release that the integration tests run in front
// of mailroom's webhook receiver (tests/alertmanager.rs).
package alertmanager

import (
	_ "github.com/prometheus/alertmanager/cmd/alertmanager"
)

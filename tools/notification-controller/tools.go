//go:build tools

// Package notificationcontroller pins the Flux notification-controller release that the
// integration tests run in front of mailroom's Flux receiver (tests/flux.rs; hack/gitops-tools.sh builds it).
package notificationcontroller

import (
	_ "github.com/fluxcd/notification-controller"
)

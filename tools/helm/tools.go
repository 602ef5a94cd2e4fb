//go:build tools

// Package helm pins the Helm release that renders deploy/helm/mailroom in the tests.
package helm

import (
	_ "helm.sh/helm/v4/cmd/helm"
)

//go:build tools

// Package containerd pins the container runtime that the one-node cluster runs: containerd, its
// runc shim and the ctr client.
package containerd

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)

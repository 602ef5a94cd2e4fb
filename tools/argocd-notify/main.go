// Command argocd-notify sends an Argo CD Application's notifications the way Argo CD
// Notifications sends them, with Argo CD's own notifications engine
// (github.com/argoproj/notifications-engine): it parses an argocd-notifications-cm ConfigMap and
// argocd-notifications-secret Secret with the engine's api.ParseConfig, evaluates each named
// trigger with the engine's trigger service, renders the templates the triggers name with the
// engine's template service, and sends them through the engine's webhook service.
//
// The template variables are the ones Argo CD gives the engine (InitGetVars in Argo CD's
// notification settings): `app` (the Application), `context` (the ConfigMap's `context` key)
// and `secrets` (the Secret's data). Argo CD also adds its expression helpers (`repo`, `time`,
// `strings`); mailroom's templates use none of them.
//
// The Argo CD Notifications controller around the engine (state annotations, oncePer,
// informers) is not part of this program: tests/argocd.rs drives the send path only.
//
//	argocd-notify --config cm.yaml --secret secret.yaml --app app.yaml --trigger NAME [--trigger NAME] --service mailroom
//
// For each trigger it prints one JSON line: {"trigger", "triggered", "templates", "error"}.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"runtime/debug"
	"strings"

	"github.com/argoproj/notifications-engine/pkg/api"
	"github.com/argoproj/notifications-engine/pkg/services"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

type triggerNames []string

func (t *triggerNames) String() string     { return strings.Join(*t, ",") }
func (t *triggerNames) Set(v string) error { *t = append(*t, v); return nil }

type outcome struct {
	Trigger   string   `json:"trigger"`
	Triggered bool     `json:"triggered"`
	Templates []string `json:"templates"`
	Error     string   `json:"error,omitempty"`
}

func readYAML(path string, into any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return yaml.Unmarshal(data, into)
}

func engineVersion() string {
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, dep := range info.Deps {
			if dep.Path == "github.com/argoproj/notifications-engine" {
				return dep.Version
			}
		}
	}
	return "unknown"
}

func main() {
	var configPath, secretPath, appPath, service string
	var triggers triggerNames
	version := flag.Bool("version", false, "print the notifications engine's version and exit")
	flag.StringVar(&configPath, "config", "", "the argocd-notifications-cm ConfigMap (YAML)")
	flag.StringVar(&secretPath, "secret", "", "the argocd-notifications-secret Secret (YAML)")
	flag.StringVar(&appPath, "app", "", "the Application (YAML or JSON)")
	flag.StringVar(&service, "service", "mailroom", "the webhook service the notifications go to")
	flag.Var(&triggers, "trigger", "a trigger to evaluate (repeatable)")
	flag.Parse()
	if *version {
		fmt.Printf("argocd-notify (notifications-engine %s)\n", engineVersion())
		return
	}
	if err := run(configPath, secretPath, appPath, service, triggers); err != nil {
		fmt.Fprintln(os.Stderr, "argocd-notify:", err)
		os.Exit(1)
	}
}

func run(configPath, secretPath, appPath, service string, triggers []string) error {
	if configPath == "" || secretPath == "" || appPath == "" || len(triggers) == 0 {
		return fmt.Errorf("--config, --secret, --app and at least one --trigger are required")
	}
	var cm corev1.ConfigMap
	if err := readYAML(configPath, &cm); err != nil {
		return fmt.Errorf("reading %s: %w", configPath, err)
	}
	var secret corev1.Secret
	if err := readYAML(secretPath, &secret); err != nil {
		return fmt.Errorf("reading %s: %w", secretPath, err)
	}
	// A Secret written with stringData, as a person writes it; the API server would move it to data.
	if secret.Data == nil {
		secret.Data = map[string][]byte{}
	}
	for k, v := range secret.StringData {
		secret.Data[k] = []byte(v)
	}
	var app map[string]any
	if err := readYAML(appPath, &app); err != nil {
		return fmt.Errorf("reading %s: %w", appPath, err)
	}
	cfg, err := api.ParseConfig(&cm, &secret)
	if err != nil {
		return fmt.Errorf("parsing the notifications configuration: %w", err)
	}
	context := map[string]string{}
	if text, ok := cm.Data["context"]; ok {
		if err := yaml.Unmarshal([]byte(text), &context); err != nil {
			return fmt.Errorf("parsing the context key: %w", err)
		}
	}
	getVars := func(obj map[string]any, _ services.Destination) map[string]any {
		return map[string]any{"app": obj, "context": context, "secrets": secret.Data}
	}
	engine, err := api.NewAPI(*cfg, getVars)
	if err != nil {
		return fmt.Errorf("starting the notifications engine: %w", err)
	}
	dest := services.Destination{Service: service}
	out := json.NewEncoder(os.Stdout)
	failed := false
	for _, name := range triggers {
		o := outcome{Trigger: name, Templates: []string{}}
		results, err := engine.RunTrigger(name, app)
		if err != nil {
			o.Error = err.Error()
			failed = true
		}
		for _, res := range results {
			if !res.Triggered {
				continue
			}
			o.Triggered = true
			o.Templates = append(o.Templates, res.Templates...)
			if err := engine.Send(app, res.Templates, dest); err != nil {
				o.Error = err.Error()
				failed = true
			}
		}
		if err := out.Encode(o); err != nil {
			return err
		}
	}
	if failed {
		return fmt.Errorf("a trigger or a notification failed (see its line)")
	}
	return nil
}

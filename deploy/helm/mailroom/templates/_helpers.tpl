{{/* The chart's name. */}}
{{- define "mailroom.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the release name, unless it already contains the chart's name. */}}
{{- define "mailroom.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "mailroom.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "mailroom.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mailroom
{{- end }}

{{/* Labels that select the operator's Pods. */}}
{{- define "mailroom.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mailroom.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "mailroom.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mailroom.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image. */}}
{{- define "mailroom.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The ConfigMap holding the extra CA roots, if any. */}}
{{- define "mailroom.caBundleConfigMap" -}}
{{- if .Values.caBundle.pem }}
{{- printf "%s-ca-bundle" (include "mailroom.fullname" .) }}
{{- else }}
{{- .Values.caBundle.configMap.name }}
{{- end }}
{{- end }}

{{/* The key of that ConfigMap. */}}
{{- define "mailroom.caBundleKey" -}}
{{- if .Values.caBundle.pem }}ca.crt{{- else }}{{ .Values.caBundle.configMap.key }}{{- end }}
{{- end }}

{{/* The Secret the notification receiver serves HTTPS with. */}}
{{- define "mailroom.alertsTlsSecret" -}}
{{- default (printf "%s-alerts-tls" (include "mailroom.fullname" .)) .Values.alerts.tls.secretName }}
{{- end }}

{{/* The notification receiver's URL as senders in the cluster reach it (its Service). */}}
{{- define "mailroom.alertsUrl" -}}
{{- printf "%s://%s-alerts.%s.svc:%v" (ternary "https" "http" .Values.alerts.tls.enabled) (include "mailroom.fullname" .) .Release.Namespace .Values.alerts.port }}
{{- end }}

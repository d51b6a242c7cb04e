{{- define "semipd.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "semipd.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "semipd.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "semipd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "semipd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "semipd.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "semipd.rules" -}}
{{ .Files.Get "files/rbac-rules.yaml" | trim }}
{{- if .Values.rbac.podMonitors }}
{{ .Files.Get "files/rbac-podmonitors.yaml" | trim }}
{{- end }}
{{- if .Values.operator.ha.enabled }}
{{- if .Values.operator.watchNamespaces }}
{{ .Files.Get "files/rbac-peering-namespaced.yaml" | trim }}
{{- else }}
{{ .Files.Get "files/rbac-peering-cluster.yaml" | trim }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "semipd.tokenKeySecret" -}}
{{- printf "%s-token-key" (include "semipd.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}


{{/* The operator's one port for /healthz, /readyz and /metrics (livenessPort: its older name). */}}
{{- define "semipd.httpPort" -}}
{{- .Values.operator.httpPort | default .Values.operator.livenessPort | default 8080 -}}
{{- end }}

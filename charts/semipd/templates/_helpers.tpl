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
{{- end -}}

{{- define "semipd.tokenKeySecret" -}}
{{- printf "%s-token-key" (include "semipd.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
